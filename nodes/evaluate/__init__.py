"""Evaluation: metrics any engine's output is scored with, the Evaluate node, the benchmark runner."""
