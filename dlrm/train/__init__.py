"""Training: the trainer, the model, sharding, optimizers, checkpoints and resume across
plans, evaluation (in training and offline), early stopping, preemption, process groups."""
