"""The one training engine: optimizer, schedule, loop, evaluation, checkpoints, metrics."""
