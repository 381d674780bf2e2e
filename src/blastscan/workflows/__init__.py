"""Workflows: one orchestration module per command (train, evaluate, predict, shortcuts, baselines, experiments,
demo). Each builds what it needs from the layers below (`RunFolder`, `Predictor`, the feature packages) and returns a
result the CLI prints; none prints or exits."""
