"""Experiment launcher (``python -m experiments``): sweeps, Optuna studies and reports over tracked runs."""
