"""The contracts between the pipeline's steps: raw records, reject reasons, and the shard schema.

    readers (readers.py)  ->  raw record rows (RAW_SCHEMA)
    preprocess            ->  shard rows (SHARD_SCHEMA)  or  reject rows (REJECT_SCHEMA)
    training ingest       <-  shard rows

Every field is a plain Arrow type (no Python objects), so rows move through Ray Data blocks and land in
Parquet unchanged. Empty string / empty list mean "absent" (Arrow columns keep one type).
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

SCHEMA_VERSION = 1

# ---- raw records: what a reader yields, one row per sample ------------------------------------------
# kind: "conversation" (LLaVA/InternVL turns), "caption" (image + caption), "image" (image alone),
#       "text" (a plain-text document).
# payload: JSON text of the sample's text part: {"conversations": [{"from", "value"}, ...]} |
#          {"caption": str} | {"text": str} | {} ; a reader that could not parse the record leaves it
#          "" and sets `error`.
# image_refs: paths of images relative to `root` (JSONL, folders) - resolved and security-checked later;
# image_bytes: inline image bytes (WebDataset tars, Parquet), aligned with image_refs ("" ref = inline).
RAW_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),  # the input URI the user gave
        ("unit", pa.string()),  # the file (work unit) the record came from
        ("root", pa.string()),  # the folder image refs are relative to
        ("kind", pa.string()),
        ("payload", pa.string()),
        ("image_refs", pa.list_(pa.string())),
        ("image_bytes", pa.list_(pa.binary())),
        ("error", pa.string()),  # a reject reason found while reading ("" = none)
        ("detail", pa.string()),  # a human-readable explanation for `error`
    ]
)

# ---- reject reasons ---------------------------------------------------------------------------------
REJECT_REASONS = {
    "invalid_json": "the line or file is not valid JSON",
    "invalid_utf8": "the bytes are not valid UTF-8",
    "invalid_record": "a required field is missing or has the wrong type",
    "missing_image": "an image file named by the record does not exist",
    "unsafe_path": (
        "security: an image path escapes the dataset root (../, absolute path or symlink out), or a meta "
        "JSON root leaves the meta file's folder"
    ),
    "not_a_file": "a path names a folder, FIFO, device or socket, not a regular file",
    "record_too_large": "a JSONL line, caption or text document over data.max_record_bytes (left unparsed)",
    "file_too_large": "an image or JSON array file over data.max_file_bytes (left unread)",
    "text_too_long": "the text is over 32 characters per token of max_tokens (refused before tokenizing)",
    "empty_file": "the image file is empty (0 bytes)",
    "not_an_image": "the file is not an image format Pillow can identify",
    "corrupt_image": "the image data is corrupt and cannot be decoded",
    "truncated_image": "the image file is truncated",
    "decompression_bomb": "the image declares more pixels than the configured limit",
    "unknown_role": "a turn has a role other than human/gpt/system (user/assistant accepted)",
    "empty_turn": "a turn has no text",
    "bad_turn_order": "the conversation has no assistant answer to supervise",
    "image_count_mismatch": "the number of <image> placeholders differs from the number of images",
    "too_long": "the sample exceeds the token budget (overflow policy: reject)",
    "no_content": "the sample has nothing to train on",
    "duplicate": "an exact duplicate (same image bytes and text) of a sample already kept",
    "unreadable_file": "an input file could not be read to its end (I/O error, or a cut-off tar/Parquet)",
    "internal_error": "reading or preprocessing the record raised an unexpected error (the detail names it)",
    "worker_crashed": "the process preprocessing this record died (a crash in a decoder or the tokenizer, or "
    "killed for memory); the record was run alone to find it and skipped",
}

REJECT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("unit", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)

# ---- shards: one row per training sample ------------------------------------------------------------
# tiles: each tile (and the thumbnail) as PNG bytes at tile_size x tile_size, RGB, in the processor's
#        order; normalisation happens at ingest. tiles_per_image: the split of `tiles` per image.
# labels: -100 where not supervised. For `distill` every label is -100.
SHARD_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("split", pa.string()),  # "train" | "val", from a stable hash of `id`
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("num_tokens", pa.int32()),
        ("tiles", pa.list_(pa.binary())),
        ("tiles_per_image", pa.list_(pa.int32())),
        ("truncated", pa.bool_()),
        ("dedup_key", pa.string()),  # sha256 of image bytes + text: exact duplicates share it
    ]
)


def encode_payload(**fields: Any) -> str:
    return json.dumps(fields, ensure_ascii=False, separators=(",", ":"))


def raw_row(
    *,
    id: str,
    source: str,
    unit: str,
    root: str = "",
    kind: str,
    payload: str = "",
    image_refs: list[str] | None = None,
    image_bytes: list[bytes] | None = None,
    error: str = "",
    detail: str = "",
) -> dict[str, Any]:
    """One raw record with every RAW_SCHEMA field present (image_refs and image_bytes aligned)."""
    refs, blobs = list(image_refs or []), list(image_bytes or [])
    refs = refs or [""] * len(blobs)
    blobs = blobs or [b""] * len(refs)
    if error and error not in REJECT_REASONS:
        raise ValueError(f"unknown reject reason {error!r}; add it to REJECT_REASONS")
    return {
        "id": id,
        "source": source,
        "unit": unit,
        "root": root,
        "kind": kind,
        "payload": payload,
        "image_refs": refs,
        "image_bytes": blobs,
        "error": error,
        "detail": detail,
    }
