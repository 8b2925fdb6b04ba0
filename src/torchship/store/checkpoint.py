"""Training checkpoints (placeholder until written)."""


class CheckpointManager:
    pass
