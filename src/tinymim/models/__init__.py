"""Models and weights: ViTs, TinyMIM*-T's classifier, the segmenter, checkpoints, distillation in your own loop."""
