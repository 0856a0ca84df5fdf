"""Offline evaluation: splits, metrics, baselines and benchmarks. Import as `from eval.x import y`, never bare."""
