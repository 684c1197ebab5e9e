"""Benchmarks: `mmmamba bench` (decode latency, prefill, memory vs context; Table 2; batch sweep) in `run.py`;
other scripts run with `python -m mmmamba.bench.<name>`."""
