"""Benchmarks: each module is runnable with `python -m eval.bench.<name>` and writes a JSON result."""
