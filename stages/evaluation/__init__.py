"""evaluate_adapter's helpers: its charts and its baselines."""
