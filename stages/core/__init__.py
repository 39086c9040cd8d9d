"""Shared pieces of the stages: typed params, paths, atomic I/O, model loading, prompts, metrics, charts,
reports and MLflow tracking."""
