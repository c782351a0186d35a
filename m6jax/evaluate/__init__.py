"""The evaluations of a trained run (config.evals: evals.py) and their parts: metrics, results
files, training curves, the feasibility study; the label audit."""
