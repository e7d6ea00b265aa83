"""Robustness report of a study: load (MLflow -> records), stats, figures, report (files)."""
