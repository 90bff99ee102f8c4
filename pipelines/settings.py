"""`PrepareSettings`: the `data:` section of a run config, validated once."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class PrepareSettings(BaseModel):
    """How raw corpora become shards. Every field can be set in the run config's `data:` section."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(2048, ge=16, description="token budget of one sample")
    overflow: Literal["truncate", "reject"] = Field(
        "reject", description="a sample over max_tokens: cut its text (never inside an image) or reject it"
    )
    val_fraction: float = Field(0.02, ge=0, lt=1, description="share of samples in the validation split")
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="images declaring more pixels are rejected (decompression bombs)"
    )
    shard_max_rows: int = Field(1024, ge=1)
    shard_max_bytes: int = Field(128 * 1024 * 1024, ge=1024)
    distill_text: Literal["corpus", "random"] = Field(
        "random",
        description="stage-1 text: token windows from the text corpora given, or uniform random tokens",
    )
    distill_text_tokens: int = Field(64, ge=1, description="text tokens per stage-1 sample")
    seed: int = 0
