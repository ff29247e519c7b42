"""Evaluation and tools: robustness and k-NN evaluation, export, relation-map pictures."""
