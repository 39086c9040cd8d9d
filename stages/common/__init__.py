"""Shared pieces of the stages: typed params, paths, errors, atomic I/O, model loading, prompts and shapes,
generation, metrics, charts and reports."""
