"""Benchmarks, run from a checkout: `python -m benchmarks`. They use the
experiments, whose extra is checked on import."""
