"""Orchestration: declared chains of runs, their report, the demo."""
