"""Frozen towers -> embeddings through the shared feature cache; a run's dataset and features."""
