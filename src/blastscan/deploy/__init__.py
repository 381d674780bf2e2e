"""Deployment: the HTTP service and its web page, built on the Predictor and the smear analysis."""
