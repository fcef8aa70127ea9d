"""Optuna's side of a study: the objective, the trial loop, samplers and pruners, the champion phase,
the Pareto front, trial events and the worker processes."""
