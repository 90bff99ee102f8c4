"""`StageClock`: how far one stage has come, by optimizer steps or by the CPU-seconds its workers spent.

    clock = StageClock(settings.steps, settings.cpu_seconds)
    clock.resume(client_state)          # a checkpoint's `cpu_seconds` and `tokens` (next to `step`)
    clock.start()
    while not clock.done(step):
        ...one optimizer step...; clock.count(tokens); step += 1
        clock.tick()                    # every rank: all-reduces the CPU-seconds when there is a budget
    clock.progress(step)                # what the LR schedule and De-focus's drop path follow

Without a CPU budget (`cpu_seconds` None) a stage is `steps` optimizer steps, progress step / steps. With
one, it trains until its workers have spent `cpu_seconds` (`steps` is an upper bound) and progress is the
share spent: budgets compare variants that differ in speed per step at equal compute on a shared machine.
A rank's CPU-seconds are `time.process_time()` deltas since the loop started (every torch thread, and the
`local` reader's data work; Ray Data's read tasks run elsewhere). Not counted: building the model and
engine (the same for any budget) and bookkeeping (`paused`: metrics, logging, checkpoints, whose cost
depends on how often they are asked for). After every step the ranks' totals are all-reduced with MAX, so
every rank takes the same LR and stops at the same step (no collective waits for a rank that left).
Tokens are summed over the ranks. Both totals go into the checkpoint (`state_dict`) and back (`resume`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist


class StageClock:
    """The stage's step bound, its optional CPU-seconds budget and what it has spent (see module doc)."""

    def __init__(
        self, steps: int, cpu_seconds: float | None = None, device: torch.device | None = None
    ) -> None:
        self.steps, self.budget = steps, cpu_seconds
        self.device = device or torch.device("cpu")  # where collectives run (NCCL wants CUDA tensors)
        self.spent = 0.0  # CPU-seconds, the MAX over ranks as of the last sync
        self.tokens = 0  # tokens seen, summed over ranks as of the last sync
        self._local = 0.0  # this rank's CPU-seconds (including what a resumed run had spent)
        self._tokens_before = 0  # the stage's tokens up to the checkpoint it resumed from
        self._tokens_local = 0  # this rank's tokens since this attempt started
        self._mark: float | None = None
        self._paused = False

    # ---- state ----------------------------------------------------------------------------------------
    def resume(self, client_state: dict[str, Any]) -> None:
        """Continue from a checkpoint's client state (a checkpoint written before budgets counts from 0)."""
        self.spent = self._local = float(client_state.get("cpu_seconds", 0.0))
        self.tokens = self._tokens_before = int(client_state.get("tokens", 0))
        self._tokens_local = 0

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps (call `sync` first: the totals of the last sync are saved)."""
        return {"cpu_seconds": self.spent, "tokens": self.tokens}

    # ---- counting ----------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start counting this process's CPU time (right before the loop)."""
        self._mark = time.process_time()

    def count(self, tokens: int) -> None:
        """Tokens of one micro-batch this rank trained on."""
        self._tokens_local += int(tokens)

    def _measure(self) -> None:
        if self._mark is None:
            raise RuntimeError("StageClock.start() was not called before the loop")
        now = time.process_time()
        if not self._paused:
            self._local += now - self._mark
        self._mark = now

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Bookkeeping that is not training (metrics, logging, checkpoints): its CPU time is not counted."""
        self._measure()
        self._paused = True
        try:
            yield
        finally:
            self._paused = False
            self._mark = time.process_time()

    def tick(self) -> None:
        """After each optimizer step, on every rank: with a budget, measure and sync the CPU-seconds (the
        decision to stop must be the same on every rank); without one, nothing (no collective)."""
        if self.budget is not None:
            self._measure()
            self.spent = self._all_reduce(self._local, dist.ReduceOp.MAX)

    def sync(self) -> None:
        """Measure and all-reduce the CPU-seconds (MAX) and tokens (SUM); every rank must call it."""
        self._measure()
        self.spent = self._all_reduce(self._local, dist.ReduceOp.MAX)
        tokens = self._all_reduce(float(self._tokens_local), dist.ReduceOp.SUM)
        self.tokens = self._tokens_before + int(tokens)

    # ---- progress ----------------------------------------------------------------------------------------
    def progress(self, step: int) -> float:
        """The share of the stage done, in [0, 1]: CPU-seconds over the budget, else step / steps."""
        return min(1.0, step / self.steps) if self.budget is None else self.fraction()

    def fraction(self) -> float:
        """`progress` of the CPU budget as of the last sync (what the LR schedule reads), 0 without one."""
        return 0.0 if self.budget is None else min(1.0, self.spent / self.budget)

    def done(self, step: int) -> bool:
        """True once `steps` are taken or, with a budget, the budget is spent."""
        return step >= self.steps or (self.budget is not None and self.spent >= self.budget)

    @property
    def stopped_by(self) -> str:
        """Why the stage ended: "cpu_seconds" (the budget was spent) or "steps" (the bound was reached)."""
        return "cpu_seconds" if self.budget is not None and self.spent >= self.budget else "steps"

    def _all_reduce(self, value: float, op) -> float:
        if not (dist.is_available() and dist.is_initialized()):
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=op)
        return float(tensor.item())
