"""Hyperparameter search and experiment tracking for PyTorch image classifiers."""
