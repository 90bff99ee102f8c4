"""Raw record rows -> shard rows (schema.SHARD_SCHEMA) or reject rows (schema.REJECT_SCHEMA), per stage.

    preprocess_row(raw, ctx)  ->  (shard_row, None)  |  (None, reject_row)

Per row: the text bounded before it is tokenized (`max_text_chars`); images resolved inside the dataset
root, read bounded and validated (`pipelines.validate`); tiled (tiles stored as PNG); the stage's token
sequence built (`distill`: image block and/or text tokens, nothing supervised; `align`: a caption as the
answer; `instruct`: the conversation, labels on assistant turns); the token budget applied. No Ray here,
so the same code runs in a Ray actor or a test.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
from PIL import Image

from model.images import dynamic_tiles
from model.processor import IGNORE_INDEX, HoVLEProcessor
from model.tokenizer import IMAGE_PLACEHOLDER, IMG_CONTEXT, IMG_END, IMG_START
from pipelines.ids import split_repeat, stable_fraction
from pipelines.manifest import stable_hash
from pipelines.settings import TEXT_CHARS_PER_TOKEN, PrepareSettings
from pipelines.validate import RejectedSample, check_text, load_image, parse_conversation

logger = logging.getLogger(__name__)


# The user turn of an `align` sample: `<image>` + one of these, picked by a stable hash of the sample id.
ALIGN_PROMPTS = (
    "Describe the image briefly.",
    "Write a short caption for this image.",
    "What does this image show? Answer in a few words.",
    "Give a brief description of the picture.",
    "Summarize the image in one sentence.",
)


# PNG is lossless at every level; level 1 encodes several times faster than the default 6 and the shard
# grows by a few percent only.
PNG_COMPRESS_LEVEL = 1


@dataclass
class PrepareContext:
    """What every row of one prepare run needs: the stage, the settings and the processor.

    The driver builds it once and ships it to the preprocessing actors. `config_hash` identifies the
    model config the processor was built from (recorded in the manifest; "" when unknown).
    """

    stage: str
    settings: PrepareSettings
    processor: HoVLEProcessor
    config_hash: str = ""
    ordinary_token_ids: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        from model.stages import STAGE_NAMES  # deferred: the actors that unpickle a context never need torch

        if self.stage not in STAGE_NAMES:
            raise ValueError(f"unknown stage {self.stage!r}; expected one of {STAGE_NAMES}")
        tokenizer = self.processor.tokenizer
        special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
        ordinary = sorted(set(tokenizer.get_vocab().values()) - special)
        self.ordinary_token_ids = np.asarray(ordinary, dtype=np.int64)

    @cached_property
    def processor_hash(self) -> str:
        """sha256 of what the processor does to a sample: its settings, vocabulary and special tokens."""
        tokenizer = self.processor.tokenizer
        return stable_hash(
            {
                "processor": self.processor.config,
                "vocab": sorted(tokenizer.get_vocab().items()),
                "special": sorted(tokenizer.all_special_tokens),
            }
        )

    @property
    def image_token_ids(self) -> tuple[int, int, int]:
        """Ids of (<img>, <IMG_CONTEXT>, </img>)."""
        ids = self.processor.image_token_ids
        return ids[IMG_START], ids[IMG_CONTEXT], ids[IMG_END]


@dataclass
class _Sample:
    """A sample before the token budget: its tokens, its images' tiles and what identifies its content."""

    input_ids: list[int]
    labels: list[int]
    tiles: list[list[Image.Image]]  # per image
    image_digests: list[bytes]  # sha256 of each image's original bytes
    text_key: str  # the sample's text, for dedup_key
    supervised: bool  # False for distill


# ---- public API ----------------------------------------------------------------------------------------


def preprocess_row(raw: Mapping[str, Any], ctx: PrepareContext) -> tuple[dict | None, dict | None]:
    """Turn one raw row (schema.RAW_SCHEMA) into (shard row, None) or (None, reject row).

    Never raises for bad data: what the checks do not foresee (an error inside Pillow or the tokenizer,
    a tokenizer panic, MemoryError) is quarantined as `internal_error` with the error named, so one
    record cannot end the run. Storage errors (OSError) other than a missing or unreadable file
    propagate (so a Ray task retries them instead of quarantining good records).
    """
    raw = _normalise(raw)
    try:
        if raw["error"]:
            raise RejectedSample(raw["error"], raw["detail"])
        payload = _payload(raw)
        if ctx.stage == "distill":
            sample = _distill_sample(raw, payload, ctx)
        else:
            sample = _chat_sample(raw, payload, ctx)
        return _shard_row(raw, sample, ctx), None
    except RejectedSample as rejected:
        return None, _reject(raw, rejected.reason, rejected.detail)
    except (OSError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # BaseException: the tokenizers' Rust panics (PyO3) are not Exceptions
        logger.exception("%s: preprocessing failed; quarantined as internal_error", raw["id"])
        return None, _reject(raw, "internal_error", f"{type(err).__name__}: {err}"[:2000])


def _reject(raw: dict[str, Any], reason: str, detail: str) -> dict[str, str]:
    return {"id": raw["id"], "source": raw["source"], "unit": raw["unit"], "reason": reason, "detail": detail}


def align_prompt(sample_id: str) -> str:
    """The `align` instruction for a sample: one of ALIGN_PROMPTS by a stable hash of its base id."""
    base_id, _ = split_repeat(sample_id)
    return ALIGN_PROMPTS[int(stable_fraction(f"prompt:{base_id}") * len(ALIGN_PROMPTS))]


def assign_split(sample_id: str, val_fraction: float) -> str:
    """'val' for a stable `val_fraction` share of base ids (repeat copies follow their record)."""
    base_id, _ = split_repeat(sample_id)
    return "val" if stable_fraction(f"split:{base_id}") < val_fraction else "train"


# ---- raw rows ------------------------------------------------------------------------------------------


def _as_list(values: Any) -> list[Any]:
    if values is None:
        return []
    return values.tolist() if hasattr(values, "tolist") else list(values)


def _normalise(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Plain Python values for every RAW_SCHEMA field (Ray batches may hand numpy arrays and None)."""
    text_fields = ("id", "source", "unit", "root", "kind", "payload", "error", "detail")
    row = {name: str(raw.get(name) or "") for name in text_fields}
    row["image_refs"] = [str(ref or "") for ref in _as_list(raw.get("image_refs"))]
    blobs = [bytes(blob) if blob is not None else b"" for blob in _as_list(raw.get("image_bytes"))]
    row["image_bytes"] = blobs + [b""] * (len(row["image_refs"]) - len(blobs))
    row["image_refs"] += [""] * (len(row["image_bytes"]) - len(row["image_refs"]))
    return row


def _payload(raw: dict[str, Any]) -> dict[str, Any]:
    try:
        payload = json.loads(raw["payload"]) if raw["payload"] else {}
    except json.JSONDecodeError as err:
        raise RejectedSample("invalid_json", f"payload: {err}") from err
    if not isinstance(payload, dict):
        raise RejectedSample("invalid_record", "the payload is not a JSON object")
    return payload


def _load_image(raw: dict[str, Any], index: int, ctx: PrepareContext) -> tuple[Image.Image, bytes]:
    """(decoded RGB image, original bytes) of the row's `index`-th image."""
    ref, data = raw["image_refs"][index], raw["image_bytes"][index]
    settings = ctx.settings
    return load_image(ref, data, raw["root"], settings.max_file_bytes, settings.max_image_pixels, index)


def _image_tiles(image: Image.Image, processor: HoVLEProcessor) -> list[Image.Image]:
    return dynamic_tiles(
        image, processor.tile_size, processor.min_tiles, processor.max_tiles, processor.use_thumbnail
    )


# ---- distill: image block and/or text tokens, nothing supervised ---------------------------------------


def _distill_sample(raw: dict[str, Any], payload: dict[str, Any], ctx: PrepareContext) -> _Sample:
    """Stage 1: the record's first image as one image block, then text tokens (the record's text ignored).

    Text tokens: `distill_text == "random"`: `distill_text_tokens` ids drawn uniformly from the ordinary
    (non-special) vocabulary, seeded by (seed, sample id); `"corpus"`: a window of that many tokens from
    a text record, its start seeded the same way (image records then carry no text).
    """
    settings = ctx.settings
    rng = np.random.default_rng([settings.seed, int(stable_fraction(f"distill:{raw['id']}") * 2**62)])
    text_ids: list[int] = []
    if settings.distill_text == "random":
        draws = rng.integers(0, len(ctx.ordinary_token_ids), settings.distill_text_tokens)
        text_ids = ctx.ordinary_token_ids[draws].tolist()
    elif raw["kind"] == "text":
        text = payload.get("text")
        if not isinstance(text, str):
            raise RejectedSample("invalid_record", "a text record needs a string 'text'")
        if not text.strip():
            raise RejectedSample("no_content", "the document is empty")
        if len(text) > settings.max_text_chars:  # a window of the document: tokenizing all of it is unbounded
            start = int(rng.integers(0, len(text) - settings.max_text_chars + 1))
            text = text[start : start + settings.max_text_chars]
        tokens = ctx.processor.tokenizer(text, add_special_tokens=False, split_special_tokens=True)
        ids, window = tokens["input_ids"], settings.distill_text_tokens
        start = int(rng.integers(0, len(ids) - window + 1)) if len(ids) > window else 0
        text_ids = ids[start : start + window]

    tiles: list[list[Image.Image]] = []
    digests: list[bytes] = []
    block: list[int] = []
    if raw["kind"] != "text" and raw["image_refs"]:
        image, data = _load_image(raw, 0, ctx)
        tiles = [_image_tiles(image, ctx.processor)]
        digests = [hashlib.sha256(data).digest()]
        start_id, context_id, end_id = ctx.image_token_ids
        block = [start_id] + [context_id] * (ctx.processor.image_tokens_per_tile * len(tiles[0])) + [end_id]
    if not block and not text_ids:
        raise RejectedSample("no_content", f"a {raw['kind'] or 'record'} without image or corpus text")
    input_ids = block + text_ids
    return _Sample(
        input_ids=input_ids,
        labels=[IGNORE_INDEX] * len(input_ids),
        tiles=tiles,
        image_digests=digests,
        text_key=json.dumps(text_ids),
        supervised=False,
    )


# ---- align / instruct: chat samples --------------------------------------------------------------------


def _caption_messages(payload: dict[str, Any], sample_id: str) -> list[dict[str, str]]:
    caption = payload.get("caption")
    if not isinstance(caption, str):
        raise RejectedSample("invalid_record", "a caption record needs a string 'caption'")
    caption = caption.strip()
    if not caption:
        raise RejectedSample("empty_turn", "the caption is empty")
    check_text(caption, "the caption")
    return [
        {"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{align_prompt(sample_id)}"},
        {"role": "assistant", "content": caption},
    ]


def _chat_sample(raw: dict[str, Any], payload: dict[str, Any], ctx: PrepareContext) -> _Sample:
    """Stages 2-3: a caption record becomes `<image>` + instruction -> caption; a conversation stays one."""
    kind, num_images = raw["kind"], len(raw["image_refs"])
    if kind == "caption":
        if num_images != 1:
            raise RejectedSample("image_count_mismatch", f"a caption record with {num_images} images")
        messages = _caption_messages(payload, raw["id"])
    elif kind == "conversation":
        messages = parse_conversation(payload.get("conversations"), num_images)
        if not any(message["role"] == "assistant" for message in messages):
            raise RejectedSample("bad_turn_order", "no gpt/assistant turn to learn from")
    else:
        raise RejectedSample(
            "no_content", f"a {kind or 'record'} record has no text to supervise in {ctx.stage}"
        )

    characters = sum(len(message["content"]) for message in messages)
    if characters > ctx.settings.max_text_chars:  # refused before the tokenizer sees it (memory, time)
        raise RejectedSample(
            "text_too_long",
            f"{characters} characters > {ctx.settings.max_text_chars} "
            f"({TEXT_CHARS_PER_TOKEN} per token of max_tokens {ctx.settings.max_tokens})",
        )
    # text problems are found above, before any image is read
    loaded = [_load_image(raw, index, ctx) for index in range(num_images)]
    tiles = [_image_tiles(image, ctx.processor) for image, _ in loaded]
    expanded, first = [], 0
    for message in messages:
        count = message["content"].count(IMAGE_PLACEHOLDER)
        tiles_per_image = [len(image_tiles) for image_tiles in tiles[first : first + count]]
        content = ctx.processor.expand_image_placeholders(message["content"], tiles_per_image)
        expanded.append({**message, "content": content})
        first += count
    input_ids, labels = ctx.processor.tokenize(expanded)  # placeholders expanded: it tokenizes and labels
    return _Sample(
        input_ids=input_ids,
        labels=labels,
        tiles=tiles,
        image_digests=[hashlib.sha256(data).digest() for _, data in loaded],
        text_key=json.dumps(messages, ensure_ascii=False, sort_keys=True),
        supervised=True,
    )


# ---- budget, split, dedup ------------------------------------------------------------------------------


def _image_spans(input_ids: list[int], start_id: int, end_id: int) -> list[tuple[int, int]]:
    """(position of <img>, position of </img>) of every image block, in order."""
    spans, start = [], None
    for position, token in enumerate(input_ids):
        if token == start_id:
            start = position
        elif token == end_id and start is not None:
            spans.append((start, position))
            start = None
    return spans


def _fit_budget(sample: _Sample, ctx: PrepareContext) -> tuple[list[int], list[int], int, bool]:
    """(input_ids, labels, images kept, truncated) within settings.max_tokens, or RejectedSample(too_long).

    Truncation cuts the tail, moving the cut before an image block it would split (the image is then
    dropped with its tiles); a sample left without tokens, or (align/instruct) without a supervised
    token, is rejected instead.
    """
    length, budget = len(sample.input_ids), ctx.settings.max_tokens
    spans = _image_spans(sample.input_ids, ctx.image_token_ids[0], ctx.image_token_ids[2])
    if length <= budget:
        return sample.input_ids, sample.labels, len(spans), False
    if ctx.settings.overflow == "reject":
        raise RejectedSample("too_long", f"{length} tokens > max_tokens {budget}")
    cut = budget
    for start, end in spans:
        if start < cut <= end:
            cut = start
    kept_images = sum(1 for _, end in spans if end < cut)
    input_ids, labels = sample.input_ids[:cut], sample.labels[:cut]
    if not input_ids or (sample.supervised and all(label == IGNORE_INDEX for label in labels)):
        raise RejectedSample(
            "too_long",
            f"{length} tokens > max_tokens {budget}, and cutting to fit leaves nothing to train on",
        )
    return input_ids, labels, kept_images, True


def _encode_png(tile: Image.Image) -> bytes:
    buffer = io.BytesIO()
    tile.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def _dedup_key(sample: _Sample, copy: int) -> str:
    """sha256 over each image's original file bytes (as sha256 digests, in order) and the sample's text
    (chat: the messages with `<image>` placeholders; distill: the text token ids). Extra repeat copies
    (meta JSON repeat_time) mix in their copy index so that de-duplication keeps them."""
    digest = hashlib.sha256()
    for image_digest in sample.image_digests:
        digest.update(b"image:" + image_digest)
    digest.update(b"text:" + sample.text_key.encode("utf-8"))
    if copy:
        digest.update(f"copy:{copy}".encode())
    return digest.hexdigest()


def _shard_row(raw: dict[str, Any], sample: _Sample, ctx: PrepareContext) -> dict[str, Any]:
    input_ids, labels, kept_images, truncated = _fit_budget(sample, ctx)
    kept_tiles = sample.tiles[:kept_images]
    _, copy = split_repeat(raw["id"])
    return {
        "id": raw["id"],
        "source": raw["source"],
        "split": assign_split(raw["id"], ctx.settings.val_fraction),
        "input_ids": input_ids,
        "labels": labels,
        "num_tokens": len(input_ids),
        "tiles": [_encode_png(tile) for image_tiles in kept_tiles for tile in image_tiles],
        "tiles_per_image": [len(image_tiles) for image_tiles in kept_tiles],
        "truncated": truncated,
        "dedup_key": _dedup_key(sample, copy),
    }
