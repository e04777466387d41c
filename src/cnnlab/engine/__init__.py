"""Training and inference: the one loop, its optimizers, checkpoints, run folders, prediction."""
