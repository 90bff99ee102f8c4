"""`PrepareSettings`: the `data:` section of a run config, validated once."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# A text longer than this many characters per token of `max_tokens` is refused before it is tokenized:
# no real text comes near it (~4 characters a token), and tokenizing grows ~200 bytes of memory a character.
TEXT_CHARS_PER_TOKEN = 32

# Fields added after datasets were first written with these settings. At their defaults they are left out
# of what the processing hash covers, so a dataset prepared before they existed is still found to have
# been prepared with the same settings (and grows incrementally) instead of being refused.
ADDED_LATER = ("max_record_bytes", "max_file_bytes")


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
    max_record_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1024,
        description="a JSONL line, caption or text document larger is rejected unparsed (record_too_large)",
    )
    max_file_bytes: int = Field(
        2 * 1024 * 1024 * 1024,
        ge=1024,
        description="an image or a JSON array of records larger is rejected unread (file_too_large)",
    )
    shard_max_rows: int = Field(1024, ge=1)
    shard_max_bytes: int = Field(128 * 1024 * 1024, ge=1024)
    distill_text: Literal["corpus", "random"] = Field(
        "random",
        description="stage-1 text: token windows from the text corpora given, or uniform random tokens",
    )
    distill_text_tokens: int = Field(64, ge=1, description="text tokens per stage-1 sample")
    seed: int = 0

    def hashed_forms(self) -> list[dict]:
        """What the processing hash may cover: first the form new datasets are written with (the fields of
        ADDED_LATER left out where they hold their defaults), then every field (how the release that added
        them wrote its datasets)."""
        full = self.model_dump()
        fields = type(self).model_fields
        current = {k: v for k, v in full.items() if not (k in ADDED_LATER and v == fields[k].default)}
        return [current] if current == full else [current, full]

    @property
    def max_text_chars(self) -> int:
        """The longest text (all of a sample's turns together) that is tokenized at all."""
        return TEXT_CHARS_PER_TOKEN * self.max_tokens
