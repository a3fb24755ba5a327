"""Markdown reports, plots, analysis, selection and export of stored results."""
