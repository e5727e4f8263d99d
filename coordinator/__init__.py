"""The coordinator: membership, synchronous rounds, aggregation, evaluation, checkpoints, metrics."""
