"""Faults the tests inject from outside the jobs, through the jobs' hooks (jobs/hooks.py): name one in
HOVLE_HOOKS, e.g. `HOVLE_HOOKS=/path/to/tests/faults.py:kill_last_rank_at_step_3`. Each SIGKILLs its own
process at a point a test can rely on, the way a real crash (OOM, a lost node) arrives."""

import logging
import os
import signal
from pathlib import Path

logger = logging.getLogger("tests.faults")
FILE = Path(__file__).resolve()


def spec(name: str) -> str:
    """The HOVLE_HOOKS entry of the fault `name` of this file."""
    return f"{FILE}:{name}"


class KillLastRank:
    """Training: the last rank SIGKILLs itself after optimizer step `step`, only in a worker group that
    started fresh (the restarted group, resumed from a checkpoint, runs on)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_step(self, at) -> None:
        if at.step == self.step and at.resumed_from_step is None and at.rank == at.world_size - 1:
            logger.warning("fault: SIGKILL rank %d of %s at step %d", at.rank, at.stage, at.step)
            os.kill(os.getpid(), signal.SIGKILL)


class KillAfterUnits:
    """Prepare: the driver SIGKILLs itself once `units` input units are written (its Ray processes go
    with it)."""

    def __init__(self, units: int) -> None:
        self.units = units

    def on_prepare_unit(self, done: int, total: int) -> None:
        if done >= self.units:
            os.kill(os.getpid(), signal.SIGKILL)


kill_last_rank_at_step_2 = KillLastRank(2)
kill_last_rank_at_step_3 = KillLastRank(3)
kill_after_two_units = KillAfterUnits(2)
