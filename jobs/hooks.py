"""Hooks: code a deployment (or a test) runs at named points of a job, without changing the job.

`HOVLE_HOOKS` (in the environment of the command that starts the job) lists hooks, comma-separated, each
`module.path:name` or `/path/to/file.py:name`. A hook is any object with one or more of these methods:

    on_train_step(step: TrainStep)          every training worker, after each optimizer step
    on_prepare_unit(done: int, total: int)  the `prepare` driver, after each input unit is written

Uses: alerts, extra metrics, and fault tests (tests/faults.py kills a worker at a chosen step from a hook,
so no crash branch lives in the jobs). A training job hands its hooks to its Ray workers by name, so on a
cluster the module must be importable (or the file present) on every node.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.config import ConfigError

ENV = "HOVLE_HOOKS"
EVENTS = ("on_train_step", "on_prepare_unit")


@dataclass(frozen=True)
class TrainStep:
    """What `on_train_step` sees: the stage, the step just taken, this worker's rank, and the checkpoint
    step this worker group resumed from (None: it started fresh)."""

    stage: str
    step: int
    rank: int
    world_size: int
    resumed_from_step: int | None


def from_env() -> list[str]:
    """The hook specs named in $HOVLE_HOOKS (empty when unset)."""
    return [spec.strip() for spec in os.environ.get(ENV, "").split(",") if spec.strip()]


def _import(spec: str) -> Any:
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise ConfigError(f"{ENV}: {spec!r} is not `module.path:name` or `/path/file.py:name`")
    try:
        if where.endswith(".py"):
            module = _import_file(Path(where).resolve())
        else:
            module = importlib.import_module(where)
    except ImportError as err:
        raise ConfigError(f"{ENV}: cannot import {where!r} for hook {spec!r}: {err}") from err
    if not hasattr(module, name):
        raise ConfigError(f"{ENV}: {where!r} has no {name!r} (hook {spec!r})")
    hook = getattr(module, name)
    if not any(callable(getattr(hook, event, None)) for event in EVENTS):
        raise ConfigError(f"{ENV}: hook {spec!r} has none of the methods {', '.join(EVENTS)}")
    return hook


def _import_file(path: Path) -> Any:
    """The module of the file at `path`, loaded once per process (hooks of one file share it)."""
    name = f"hovle_hooks_{path.stem}_{abs(hash(str(path))):x}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None or not path.is_file():
        raise ImportError(f"no Python file at {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


class Hooks:
    """The loaded hooks of one process; `emit` calls each one's method for the event, in order."""

    def __init__(self, specs: list[str]) -> None:
        self.specs = list(specs)
        self._hooks = [_import(spec) for spec in self.specs]

    def emit(self, event: str, *args: Any) -> None:
        if event not in EVENTS:
            raise ValueError(f"unknown hook event {event!r}: expected one of {EVENTS}")
        for hook in self._hooks:
            method = getattr(hook, event, None)
            if callable(method):
                method(*args)
