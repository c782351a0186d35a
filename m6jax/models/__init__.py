"""Flax Linen models: one family per file, weight import beside each model."""
