"""Metrics and intervals, results, training curves, the feasibility study, the label audit."""
