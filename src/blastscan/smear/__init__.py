"""Whole smear fields: find every leukocyte (`find`), frame and score it (`framing`, `analysis`), draw and page the
result (`render`), and score the finder against truth (`detection_metrics`, `field_truth`)."""
