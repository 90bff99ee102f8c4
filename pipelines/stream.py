"""Training batches: one worker's shard rows -> decode -> pack or pad -> batches, resumable exactly.

    iter(TrainingStream(source, ...))  ->  the rest of the epoch as batches (collated by `pipelines.packing`)
    endless(stream)                    ->  batches across epochs (what a training loop draws from)
    state_dict() / load_state_dict()   ->  the position (`StreamPosition`) after the last yielded batch

The source (`RowSource`, in training `pipelines.ingest.ShardSource`) gives an epoch's rows in a fixed order
from any position, so the position (`StreamPosition`) is all a checkpoint needs. With every rank's token
counts up front (`RowSource.lengths`), all ranks take the same number of steps (`pipelines.ingest`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from pipelines.ingest import ShardMismatch
from pipelines.packing import DEFAULT_MAX_OPEN, StreamPacker, collate_packed, collate_padded

logger = logging.getLogger(__name__)


# ---- what the stream reads ------------------------------------------------------------------------------
class RowSource(Protocol):
    """What `TrainingStream` reads: one worker's rows of an epoch, from any position, in a fixed order."""

    rank: int

    def rows(self, epoch: int, start: int) -> Iterable[dict[str, Any]]:
        """The rows of `epoch` from position `start` on (the same rows in the same order every time)."""

    def prepare(self, row: dict[str, Any]) -> dict[str, Any]:
        """A row -> a sample for collation (see `decode_sample`); called only for rows that are batched."""

    def lengths(self, epoch: int) -> list[np.ndarray] | None:
        """Every rank's token counts in its order (so all ranks agree on the step count), or None."""


# ---- batches with a resumable position -----------------------------------------------------------------
@dataclass
class StreamPosition:
    """Where an epoch stands after the last yielded batch.

    Rows are numbered by their position in the worker's order of the epoch. `next` is the first row not
    yet given to the packer; `open` lists the rows waiting in the packer's open packs. Every other row
    before `next` has been yielded. Resuming reads the source again from the first waiting row, reopens
    those packs and goes on from `next`: the packs and batches are the ones the uninterrupted run makes.
    """

    epoch: int = 0
    step: int = 0  # batches yielded in this epoch
    next: int = 0
    open: list[list[int]] = field(default_factory=list)
    rows: int = 0  # rows yielded in this epoch (reporting)


class TrainingStream:
    """Turns a `RowSource` into packed or padded batches; `state_dict()` is the exact position.

    Iterating yields the rest of the current epoch, then the position moves to the next epoch. A batch is
    counted as consumed once it is yielded, so a checkpoint taken after training on it resumes at the next.
    Rows wait in the packer undecoded; a row's tiles are decoded (`source.prepare`) when its batch is
    collated.

    Args:
        source: `ShardSource` (training) or any `RowSource`.
        batch_size: rows per batch: packs of `max_tokens` when packing, samples when padding.
        pad_token_id: the tokenizer's pad id.
        max_tokens: pack into rows of this many tokens (`collate_packed`); None pads each batch to its
            longest sample (`collate_padded`, the baseline).
        max_open: the packer's look-ahead buffer, in open packs (see `pipelines.packing.StreamPacker`).

    Batches are the collate functions' dicts plus `ids` (list[str], the samples in slot order), which
    the training loop must not pass to the model (nor `num_samples`/`num_tokens`, which are for metrics).
    """

    def __init__(
        self,
        source: RowSource,
        *,
        batch_size: int,
        pad_token_id: int,
        max_tokens: int | None = None,
        max_open: int = DEFAULT_MAX_OPEN,
    ) -> None:
        if batch_size < 1 or max_open < 0 or (max_tokens is not None and max_tokens < 1):
            raise ValueError(
                f"need batch_size >= 1, max_open >= 0, max_tokens >= 1 or None; got {batch_size}, "
                f"{max_open}, {max_tokens}"
            )
        self.source, self.batch_size, self.pad_token_id = source, batch_size, pad_token_id
        self.max_tokens, self.max_open = max_tokens, max_open
        self.position = StreamPosition()

    def _packer(self) -> StreamPacker:
        if self.max_tokens is None:
            return StreamPacker(None, max_open=0)  # padding: every sample is its own "pack"
        return StreamPacker(self.max_tokens, self.max_open, oversize="raise")

    def steps_in_epoch(self, epoch: int) -> int | None:
        """Batches every rank yields in `epoch` (the smallest rank's count), or None when unknown.

        Raises:
            PackOverflow: a row longer than `max_tokens` (found before any batch is made).
        """
        lengths = self.source.lengths(epoch)
        if lengths is None:
            return None
        steps = []
        for rank_lengths in lengths:
            packer = self._packer()
            packs = sum(len(packer.add(i, int(n))) for i, n in enumerate(rank_lengths)) + len(packer.flush())
            steps.append(math.ceil(packs / self.batch_size))
        if min(steps) != max(steps):
            logger.info(
                "epoch %d: ranks would take %d..%d steps; all take %d (this rank drops %d)",
                epoch,
                min(steps),
                max(steps),
                min(steps),
                steps[self.source.rank] - min(steps),
            )
        return min(steps)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        start = self.position
        epoch, limit = start.epoch, self.steps_in_epoch(start.epoch)
        logger.info(
            "epoch %d: from step %d (row %d, %d open packs), %s steps",
            epoch,
            start.step,
            start.next,
            len(start.open),
            limit,
        )
        if limit is not None and start.step >= limit:  # saved right after the epoch's last batch
            self.position = StreamPosition(epoch=epoch + 1)
            return
        waiting = {p for pack in start.open for p in pack}
        first = min(waiting | {start.next})
        source_rows = iter(self.source.rows(epoch, first))
        rows: dict[int, dict[str, Any]] = {}
        for position in range(first, start.next):  # read the waiting rows again
            row = next(source_rows, None)
            if row is None:
                raise ShardMismatch(
                    f"the source ended at row {position}, before the saved position {start.next}"
                )
            if position in waiting:
                rows[position] = row
        packer = self._packer()
        packer.restore(start.open, {p: len(rows[p]["input_ids"]) for p in waiting})

        given = start.next  # rows given to the packer

        def closed_packs() -> Iterator[list[int]]:
            """Packs as they close: while rows come, then the open ones, oldest first."""
            nonlocal given
            for row in source_rows:
                rows[given] = row
                given += 1
                yield from packer.add(given - 1, len(row["input_ids"]))
            while (pack := packer.close_oldest()) is not None:
                yield pack

        pending: list[list[int]] = []
        for pack in closed_packs():
            pending.append(pack)
            if len(pending) == self.batch_size:
                yield self._emit(pending, rows, given, packer.open_packs)
                pending = []
                if limit is not None and self.position.step >= limit:
                    break
        else:
            if pending:
                yield self._emit(pending, rows, given, [])
        self.position = StreamPosition(epoch=epoch + 1)

    def _emit(
        self, packs: list[list[int]], rows: dict[int, dict[str, Any]], nxt: int, still_open: list[list[int]]
    ) -> dict[str, Any]:
        samples = [self.source.prepare(rows.pop(p)) for pack in packs for p in pack]
        if self.max_tokens is None:
            batch = collate_padded(samples, self.pad_token_id)
        else:
            bounds = np.cumsum([0, *(len(pack) for pack in packs)])
            layout = [list(range(bounds[i], bounds[i + 1])) for i in range(len(packs))]
            batch = collate_packed(samples, self.max_tokens, self.pad_token_id, packs=layout)
        batch["ids"] = [sample["id"] for sample in samples]
        p = self.position
        self.position = StreamPosition(p.epoch, p.step + 1, nxt, still_open, p.rows + len(samples))
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The position after the last yielded batch: {epoch, step, next, open, rows} (JSON-able)."""
        return dataclasses.asdict(self.position)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()`: the next batch is the one that followed it.

        Raises:
            ValueError: a state without the position fields.
        """
        try:
            self.position = StreamPosition(
                epoch=int(state["epoch"]),
                step=int(state["step"]),
                next=int(state["next"]),
                open=[[int(p) for p in pack] for pack in state["open"]],
                rows=int(state["rows"]),
            )
        except (KeyError, TypeError) as err:
            raise ValueError(f"not a TrainingStream state ({err!r}): {state!r}") from None


def endless(stream: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Batches across epochs. A stream resumed right after its epoch's last batch yields nothing before it
    moves on to the next epoch; two passes in a row without a batch mean no data, and raise (instead of
    looping forever)."""
    empty = 0
    while True:
        yielded = False
        for batch in stream:
            yielded = True
            yield batch
        empty = 0 if yielded else empty + 1
        if empty == 2:
            raise RuntimeError("the training data yields no batches for this worker: prepare more samples")
