"""What a study asks for, torch-free: study files and their checks, hyperparameters, dataset references,
the project's paths and the one-line errors every command stops with."""

