"""Sequence packing: several tokenized samples share one row of exactly `max_tokens` tokens.

A packed row is the samples' tokens back to back, then padding. Nothing marks the boundaries except
`position_ids`, which restart at 0 for every sample (and for the padding): with `attention_mask=None`
transformers' `create_causal_mask` (and `model.embedding._same_segment` for the post-shuffle embedding)
read a restart as "new sequence" and block attention across it, so a packed sample computes exactly what
it computes alone. The first label of every sample is -100 so no token learns to predict the next
sample's first token. Samples are atomic: an image's `<IMG_CONTEXT>` run is never split across rows.
The model must run with `use_cache=False`: transformers looks for packed sequences only without a KV
cache, and a Llama LLM makes one whenever `use_cache` is left to its config (True).

`pack_sequences` packs with a `StreamPacker`, a streaming first-fit whose whole state is the positions its
open packs hold, so a stream can stop after any pack and resume exactly (`pipelines.stream.TrainingStream`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch

from model.processor import IGNORE_INDEX, pad_batch

logger = logging.getLogger(__name__)

# Open packs of look-ahead. Short samples pack tightly with any buffer (0.977 at 2048 tokens for ~100-token
# samples even with 1); samples of 150..1500 tokens need more: 0.75 with 1, 0.93 with 8, 0.95 with 16.
DEFAULT_MAX_OPEN = 16


class PackOverflow(ValueError):
    """A pack holds more tokens than `max_tokens` (a single sample over the budget reached collation)."""


class StreamPacker:
    """Streaming first-fit: samples arrive one at a time and leave in closed packs.

    A sample goes into the first open pack (oldest first) with room for it, else it opens a new pack;
    when more than `max_open` packs are open, the oldest is closed. `flush` closes the rest, oldest
    first. Each pack's positions are ascending; the packs depend only on the lengths, in order.

    A sample longer than `max_tokens` cannot be packed without cutting it (and maybe an image's token run).
    Prepare enforces the budget (`data.max_tokens`, overflow truncate/reject), so such a sample is a
    broken contract: with `oversize="alone"` it is closed at once in a pack of its own and
    `collate_packed` raises `PackOverflow` for it; with `oversize="raise"` it fails here.

    Args:
        max_tokens: the row length (None: no limit, for padding one sample per row with `max_open=0`).
        max_open: the look-ahead buffer, in open packs (>= 0; 0 closes every pack at once).
        oversize: "alone" or "raise", see above.
    """

    def __init__(
        self,
        max_tokens: int | None,
        max_open: int = DEFAULT_MAX_OPEN,
        oversize: Literal["alone", "raise"] = "alone",
    ) -> None:
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if max_open < 0:
            raise ValueError(f"max_open must be >= 0, got {max_open}")
        if oversize not in ("alone", "raise"):
            raise ValueError(f"oversize must be 'alone' or 'raise', got {oversize!r}")
        self.max_tokens, self.max_open, self.oversize = max_tokens, max_open, oversize
        self._limit = math.inf if max_tokens is None else max_tokens
        self._packs: list[list[int]] = []
        self._room: list[float] = []

    @property
    def open_packs(self) -> list[list[int]]:
        """The positions in each open pack, oldest first: with their lengths, the packer's whole state."""
        return [list(pack) for pack in self._packs]

    def restore(self, open_packs: Sequence[Sequence[int]], lengths: Mapping[int, int]) -> None:
        """Reopen the packs of `open_packs` (from an earlier `open_packs`); `lengths[position]` is known."""
        self._packs = [list(pack) for pack in open_packs]
        self._room = [self._limit - sum(lengths[p] for p in pack) for pack in open_packs]

    def add(self, position: int, length: int) -> list[list[int]]:
        """Place one sample; returns the packs this closed (oldest first), usually none."""
        if length < 1:
            raise ValueError(f"sample {position} has {length} tokens; every sample needs at least one")
        if length > self._limit:
            if self.oversize == "raise":
                raise PackOverflow(
                    f"sample {position} has {length} tokens, more than max_tokens={self.max_tokens}; "
                    "prepare the data with data.max_tokens <= the training max_tokens"
                )
            logger.warning(
                "sample %d: %d tokens > max_tokens=%d, packed alone", position, length, self._limit
            )
            return [[position]]
        for slot, room in enumerate(self._room):
            if room >= length:
                self._packs[slot].append(position)
                self._room[slot] = room - length
                break
        else:
            self._packs.append([position])
            self._room.append(self._limit - length)
        closed = []
        while len(self._packs) > self.max_open:
            closed.append(self._packs.pop(0))
            self._room.pop(0)
        return closed

    def close_oldest(self) -> list[int] | None:
        """Close and return the oldest open pack (None when none is open): `flush` one pack at a time."""
        if not self._packs:
            return None
        self._room.pop(0)
        return self._packs.pop(0)

    def flush(self) -> list[list[int]]:
        """Close every open pack, oldest first."""
        closed, self._packs, self._room = self._packs, [], []
        return closed


def pack_sequences(
    lengths: Sequence[int],
    max_tokens: int,
    max_open: int = DEFAULT_MAX_OPEN,
    oversize: Literal["alone", "raise"] = "alone",
) -> list[list[int]]:
    """Group sample indices into packs of at most `max_tokens` tokens with a `StreamPacker`.

    Args:
        lengths: token count of each sample (>= 1), in stream order.
        max_tokens: the row length.
        max_open: look-ahead buffer in open packs; more packs tighter (see benchmarks/bench_packing.py).
        oversize: "alone" (a pack of its own; `collate_packed` will refuse it) or "raise" (fail here).

    Returns:
        Indices into `lengths`, one list per pack in closing order; every index appears exactly once.

    Raises:
        ValueError: a non-positive length, `max_tokens` or negative `max_open`.
        PackOverflow: a sample over `max_tokens` when `oversize="raise"`.
    """
    packer = StreamPacker(max_tokens, max_open, oversize)
    packs = [pack for index, length in enumerate(lengths) for pack in packer.add(index, int(length))]
    return packs + packer.flush()


def _flat(values: Any) -> torch.Tensor:
    """A sample's token ids (list, numpy array or tensor of any shape with one row) as a 1-D long tensor."""
    return torch.as_tensor(values, dtype=torch.long).reshape(-1)


def _pixels(sample: Mapping[str, Any]) -> torch.Tensor | None:
    pixels = sample.get("pixel_values")
    if pixels is None:
        return None
    pixels = torch.as_tensor(pixels)
    return pixels if pixels.shape[0] > 0 else None


def collate_packed(
    samples: Sequence[Mapping[str, Any]],
    max_tokens: int,
    pad_token_id: int,
    packs: Sequence[Sequence[int]] | None = None,
) -> dict[str, torch.Tensor]:
    """Pack samples into rows of exactly `max_tokens` tokens.

    Args:
        samples: dicts with `input_ids` and `labels` ([L] or [1, L]; list, array or tensor) and optionally
            `pixel_values` float [n_tiles, 3, S, S] (the sample's tiles in slot order) or None.
        max_tokens: T, the row length.
        pad_token_id: token id of the padding.
        packs: which samples share a row (indices into `samples`, in row order); default
            `pack_sequences` over all samples at once.

    Returns:
        `input_ids` long [b, T]: samples back to back, then `pad_token_id`;
        `labels` long [b, T]: the samples' labels, -100 on each sample's first token and on padding;
        `position_ids` long [b, T]: 0, 1, ... restarting at every sample and at the padding;
        `pixel_values` float [tiles, 3, S, S] in slot order (rows top to bottom, samples left to right),
        or None when no sample has tiles;
        `num_samples` long []: samples in the batch; `num_tokens` long []: non-padding tokens.
        No `attention_mask`, and the model must run with `use_cache=False`: see the module docstring.

    Raises:
        PackOverflow: a pack holds more than `max_tokens` tokens.
        ValueError: no samples, a sample missing from / repeated in `packs`, or mismatched lengths.
    """
    if not samples:
        raise ValueError("collate_packed needs at least one sample")
    ids = [_flat(sample["input_ids"]) for sample in samples]
    labels = [_flat(sample["labels"]) for sample in samples]
    for index, (tokens, target) in enumerate(zip(ids, labels)):
        if tokens.numel() != target.numel() or tokens.numel() == 0:
            raise ValueError(
                f"sample {index}: {tokens.numel()} input_ids but {target.numel()} labels (need equal, > 0)"
            )
    if packs is None:
        packs = pack_sequences([t.numel() for t in ids], max_tokens, max_open=len(samples))
    used = sorted(i for pack in packs for i in pack)
    if used != list(range(len(samples))):
        raise ValueError(f"packs must use every sample exactly once, got {list(map(list, packs))}")

    batch_ids = torch.full((len(packs), max_tokens), pad_token_id, dtype=torch.long)
    batch_labels = torch.full((len(packs), max_tokens), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(packs), max_tokens), dtype=torch.long)
    pixels: list[torch.Tensor] = []
    for row, pack in enumerate(packs):
        total = sum(ids[i].numel() for i in pack)
        if total > max_tokens:
            raise PackOverflow(
                f"pack {row} (samples {list(pack)}) has {total} tokens, more than max_tokens={max_tokens}; "
                "prepare the data with data.max_tokens <= the training max_tokens"
            )
        cursor = 0
        for i in pack:
            length = ids[i].numel()
            batch_ids[row, cursor : cursor + length] = ids[i]
            batch_labels[row, cursor : cursor + length] = labels[i]
            batch_labels[row, cursor] = IGNORE_INDEX  # its logits come from the previous sample
            positions[row, cursor : cursor + length] = torch.arange(length)
            cursor += length
            sample_pixels = _pixels(samples[i])
            if sample_pixels is not None:
                pixels.append(sample_pixels)
        positions[row, cursor:] = torch.arange(max_tokens - cursor)  # padding is a sequence of its own
    return {
        "input_ids": batch_ids,
        "labels": batch_labels,
        "position_ids": positions,
        "pixel_values": torch.cat(pixels).to(torch.float32) if pixels else None,
        "num_samples": torch.tensor(len(samples)),
        "num_tokens": torch.tensor(sum(t.numel() for t in ids)),
    }


def collate_padded(
    samples: Sequence[Mapping[str, Any]],
    pad_token_id: int,
    padding_side: Literal["right", "left"] = "right",
) -> dict[str, torch.Tensor]:
    """The baseline: one sample per row, padded to the longest sample of the batch.

    Args:
        samples: as for `collate_packed`.
        pad_token_id: token id of the padding.
        padding_side: "right" (training) or "left" (generation).

    Returns:
        `input_ids` long [b, L_max], `attention_mask` long [b, L_max] (0 on padding), `labels` long
        [b, L_max] (-100 on padding), `pixel_values` float [tiles, 3, S, S] in sample order or None,
        `num_samples` long [], `num_tokens` long [] (non-padding tokens).

    Raises:
        ValueError: no samples, an unknown padding side or mismatched lengths.
    """
    batch = pad_batch(samples, pad_token_id, padding_side)
    if batch["pixel_values"] is not None:
        batch["pixel_values"] = batch["pixel_values"].to(torch.float32)
    return {**batch, "num_samples": torch.tensor(len(samples)), "num_tokens": batch["attention_mask"].sum()}


def packing_efficiency(batches: Iterable[Mapping[str, Any]]) -> float:
    """Non-padding tokens / all tokens over batches from `collate_packed` or `collate_padded`.

    Non-padding tokens are `num_tokens` when present, else `attention_mask.sum()`; all tokens are
    `input_ids.numel()`.

    Raises:
        ValueError: if the batches hold no tokens at all.
    """
    real = total = 0
    for batch in batches:
        real += int(batch["num_tokens"] if "num_tokens" in batch else batch["attention_mask"].sum())
        total += batch["input_ids"].numel()
    if total == 0:
        raise ValueError("packing_efficiency needs at least one non-empty batch")
    return real / total
