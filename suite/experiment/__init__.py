"""Experiment files: loading and checking them, gate and selection criteria, cost estimates."""
