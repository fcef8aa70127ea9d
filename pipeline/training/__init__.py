"""Torch only, no Optuna or MLflow: the trainer, models, schedules, checkpoints, reproducibility, latency."""

