"""Regression gating: compare, confirm by A/B re-measurement, rebuild at a commit, history, CI output."""
