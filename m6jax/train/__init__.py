"""Pure steps, the K-replica trainers (frozen / fine-tuning), the one prediction path,
optimizers, checkpoints, folds."""
