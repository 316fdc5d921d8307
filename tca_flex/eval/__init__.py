"""Long-context evaluation: task generators, scorers, baselines (not part of the core API)."""
