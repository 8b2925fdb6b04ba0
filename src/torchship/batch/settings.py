"""Settings of a batch job (``torchship batch``, ``TORCHSHIP_*`` env vars, a YAML file)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from torchship.preprocessing import DEFAULT_MAX_PIXELS
from torchship.settings import Settings

DEFAULT_BATCH_SIZE = 64
DEFAULT_CHUNK_SIZE = 1024
DEFAULT_COMMIT_INTERVAL_S = 10.0


class BatchSettings(Settings):
    """Everything ``torchship batch`` can be told besides the model, inputs and output."""

    batch_size: int = Field(DEFAULT_BATCH_SIZE, ge=1, description="Items per model call.")
    num_workers: int | Literal["auto"] = Field(
        "auto",
        description="DataLoader processes (local) or actors (ray); 'auto': measured and "
        "chosen per job (local), one actor per `threads` CPUs (ray).",
    )
    top_k: int = Field(3, ge=1, description="Labels (with probabilities) per output row.")
    engine: Literal["local", "ray"] = Field("local", description="Who runs the pipeline.")
    ray_address: str | None = Field(
        None, description="Existing Ray cluster ('auto' or host:port); none starts a local one."
    )
    amp: bool = Field(False, description="float16 autocast on CUDA (ignored on the CPU).")
    chunk_size: int = Field(
        DEFAULT_CHUNK_SIZE, ge=1, description="Rows per committed chunk (what a crash can lose)."
    )
    commit_interval_s: float = Field(
        DEFAULT_COMMIT_INTERVAL_S, gt=0, description="Commit at least this often, in seconds."
    )
    max_image_pixels: int = Field(
        DEFAULT_MAX_PIXELS, ge=1, description="Larger images become failure rows."
    )
