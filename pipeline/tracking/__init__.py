"""MLflow only: a study's runs as a listener of trial events, the model registry, the trials table."""
