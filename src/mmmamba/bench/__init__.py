"""Benchmarks (scripts run with `python -m mmmamba.bench.<name>`)."""
