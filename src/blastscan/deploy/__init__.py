"""Deployment: the HTTP service and its web page, built on the Predictor and the smear analysis.

`create_app(analyzer, card, limits)` builds the FastAPI application (`service`); uploads are decoded and checked
in `uploads`; `blastscan serve` (workflows.serve) loads the model and runs it under uvicorn.
"""
