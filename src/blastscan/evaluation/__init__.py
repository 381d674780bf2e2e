"""Evaluation: metrics with patient-level confidence intervals, calibration, figures and the report."""
