"""Long-context evaluation: task generators, scorers, baselines (not part of the core API).

``python -m tca_flex.eval --help`` runs the suite; ``run_suite`` and the
``methods`` registry are the programmatic entry points.
"""
