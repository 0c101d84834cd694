"""Gradient-based hyperparameter optimisation: the library behind the DVC stages."""
