"""Training without Ray: the data, the study's model, its optimizers, the Trainer and its checkpoints."""
