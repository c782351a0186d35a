"""A finished run's bundle, its restore, the predict CLI and the MLflow pyfunc model."""
