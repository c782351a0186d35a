"""Pure steps, the K-replica trainers (frozen / fine-tuning), optimizers, checkpoints, folds."""
