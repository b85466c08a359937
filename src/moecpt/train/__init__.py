"""Continual pre-training: configuration, the training loop, optimizer and schedule, checkpoints, metrics."""
