"""Benchmarks that print figures (not timed tests). Each needs a finished pipeline: run `make demo` first."""
