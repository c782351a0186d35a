"""Tracking: the per-run writer (metrics.jsonl, MLflow), its store, sweeps and their comparison."""
