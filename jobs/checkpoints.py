"""A training stage's checkpoints: the DeepSpeed engine, the clock, and per rank its data position and RNG.

    save_checkpoint(strategy, stream, clock, step, stage, rank)   every rank; Ray Train merges the folders
    load_checkpoint(checkpoint, strategy, stream, rank)           the engine, this rank's stream and RNG;
                                                                  returns the client state (step, clock)

Resume is exact: the same batches and the same random draws as an uninterrupted run. Nothing is unpickled:
every file loads with `torch.load(weights_only=True)` (the engine's through `jobs.strategy`).

A checkpoint counts only once every rank's files are in the run's storage at their size (`upload_checkpoint`):
pyarrow's S3 upload can return success with files missing when the endpoint goes away mid-upload, and Ray
Train would commit, and later resume from, a half-written folder. Reads are checked too (`checkpoint_folder`).
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from jobs.budget import StageClock
from jobs.strategy import DeepSpeedStrategy
from pipelines.stream import TrainingStream

logger = logging.getLogger("jobs.train")
UPLOAD_ATTEMPTS = 3  # with 1 s, then 2 s between: an endpoint gone for a few seconds is waited out
# A restarted worker group reads the checkpoint right after the failure, often while the endpoint that
# failed the upload is still away: 1, 2, 4 ... 32 s between attempts (about a minute) before the group fails.
DOWNLOAD_ATTEMPTS = 7


class CheckpointDownloadError(OSError):
    """A checkpoint could not be read whole from the run's storage (the worker fails; Ray Train restarts
    the worker group, up to max_failures)."""


class CheckpointUploadError(OSError):
    """A rank's checkpoint files did not all reach the run's storage: the worker fails (Ray Train restarts
    the worker group from the last complete checkpoint) instead of reporting a half-written one."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every generator's state as tensors, numbers and tuples: what `torch.load(weights_only=True)` reads."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    numpy_state = (
        name,
        torch.from_numpy(keys.astype(np.int64)),
        int(position),
        int(has_gauss),
        float(cached),
    )
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def worker_state_file(rank: int) -> str:
    return f"worker_{rank:04d}.pt"


def checkpoint_stage(checkpoint) -> str | None:
    """The stage a Ray Train checkpoint (or None) was saved in, from its folder's name
    (`checkpoint_<stage>_<step>`, `save_checkpoint`'s: one Ray Train run holds every stage)."""
    if checkpoint is None:
        return None
    found = re.fullmatch(r"checkpoint_([a-z]+)_\d+", checkpoint.path.rstrip("/").rsplit("/", 1)[-1])
    return found.group(1) if found else None


def save_checkpoint(
    strategy: DeepSpeedStrategy, stream: TrainingStream, clock: StageClock, step: int, stage: str, rank: int
) -> None:
    """Engine state + step, CPU-seconds and tokens so far, and per rank its data position and RNG in its
    own file (DeepSpeed keeps `client_state` in rank 0's file only below ZeRO-3, and every rank reads the
    data at a different position). Every rank calls it (the clock syncs); Ray merges the ranks' folders."""
    import ray.train

    clock.sync()
    with tempfile.TemporaryDirectory(prefix="hovle-ckpt-") as directory:
        strategy.save(directory, {"step": step, **clock.state_dict()})
        torch.save(
            {"stream": stream.state_dict(), "rng": rng_state()},
            os.path.join(directory, worker_state_file(rank)),
        )
        ray.train.report(
            {"step": step, "stage": stage},
            checkpoint=ray.train.Checkpoint.from_directory(directory),
            checkpoint_dir_name=f"checkpoint_{stage}_{step:07d}",
            checkpoint_upload_fn=upload_checkpoint,
        )
    # Wait until the controller has committed it: a report is registered when the controller next polls
    # the workers, and a worker dying before that poll would lose the checkpoint it just wrote.
    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)


def upload_checkpoint(checkpoint, dir_name: str):
    """Ray Train's upload of this rank's checkpoint folder to `<run>/<dir_name>`, checked: every file must
    be there at its local size. Retried (`UPLOAD_ATTEMPTS`); returns the persisted `ray.train.Checkpoint`.

    Raises:
        CheckpointUploadError: files still missing or short after the last attempt.
    """
    import ray.train

    storage = ray.train.get_context().get_storage()
    expected = {}
    for folder, _, names in os.walk(checkpoint.path):
        for name in names:
            path = os.path.join(folder, name)
            expected[os.path.relpath(path, checkpoint.path)] = os.path.getsize(path)
    for attempt in range(1, UPLOAD_ATTEMPTS + 1):
        try:
            persisted = storage.persist_current_checkpoint(checkpoint, dir_name)
            missing = _missing_files(storage.storage_filesystem, persisted.path, expected)
            problem = "missing or short in storage"
        except OSError as err:  # pyarrow's S3 errors are OSErrors
            missing, problem = sorted(expected), f"{type(err).__name__}: {err}"
        if not missing:
            return persisted
        logger.warning(
            "checkpoint %s: upload attempt %d/%d failed: %s %s",
            dir_name, attempt, UPLOAD_ATTEMPTS, ", ".join(missing), problem,
        )  # fmt: skip
        if attempt < UPLOAD_ATTEMPTS:
            time.sleep(2 ** (attempt - 1))
    raise CheckpointUploadError(
        f"checkpoint {dir_name}: {len(missing)} of {len(expected)} files did not reach the run's storage "
        f"after {UPLOAD_ATTEMPTS} attempts ({', '.join(missing)}); is the storage endpoint reachable?"
    )


def _missing_files(fs, root: str, expected: dict[str, int]) -> list[str]:
    """The files of `expected` ({relative path: size}) absent under `root` of the pyarrow `fs`, or short."""
    import pyarrow.fs

    names = sorted(expected)
    infos = fs.get_file_info([f"{root}/{name}" for name in names])
    return [
        name
        for name, info in zip(names, infos, strict=True)
        if info.type != pyarrow.fs.FileType.File or info.size != expected[name]
    ]


@contextmanager
def checkpoint_folder(checkpoint) -> Iterator[str]:
    """A local folder holding the whole checkpoint: its own path on a local filesystem, else a download
    checked file by file against the store's listing and retried (`DOWNLOAD_ATTEMPTS`): pyarrow's S3
    download, like its upload, can come back without error and without files.

    Raises:
        CheckpointDownloadError: the listing or the files still failed after the last attempt.
    """
    import pyarrow.fs

    fs, root = checkpoint.filesystem, checkpoint.path
    if isinstance(fs, pyarrow.fs.LocalFileSystem):
        yield root
        return
    with tempfile.TemporaryDirectory(prefix="hovle-resume-") as local:
        for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
            expected, target = {}, os.path.join(local, f"attempt-{attempt}")
            try:
                listed = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True))
                expected = {
                    info.path[len(root) :].lstrip("/"): info.size
                    for info in listed
                    if info.type == pyarrow.fs.FileType.File
                }
                checkpoint.to_directory(target)
                missing = _missing_files(pyarrow.fs.LocalFileSystem(), target, expected)
                problem = "missing or short after the download" if expected else "no files listed"
            except OSError as err:  # pyarrow's S3 errors are OSErrors
                missing, problem = ["(listing)"], f"{type(err).__name__}: {err}"
            if expected and not missing:
                break
            logger.warning(
                "checkpoint %s: read attempt %d/%d failed: %s %s",
                root, attempt, DOWNLOAD_ATTEMPTS, ", ".join(missing[:5]), problem,
            )  # fmt: skip
            if attempt == DOWNLOAD_ATTEMPTS:
                raise CheckpointDownloadError(
                    f"checkpoint {root}: could not be read whole after {DOWNLOAD_ATTEMPTS} attempts "
                    f"({problem}); is the storage endpoint reachable?"
                )
            shutil.rmtree(target, ignore_errors=True)
            time.sleep(2 ** (attempt - 1))
        yield target


def read_worker_state(directory: str, rank: int) -> dict[str, Any]:
    """Rank `rank`'s data position and RNG from a checkpoint folder; tensors and plain values only
    (`weights_only=True`: a planted pickle raises `pickle.UnpicklingError` instead of running)."""
    return torch.load(os.path.join(directory, worker_state_file(rank)), weights_only=True)


def load_checkpoint(
    checkpoint, strategy: DeepSpeedStrategy, stream: TrainingStream, rank: int
) -> dict[str, Any]:
    """Restore the engine from a Ray Train checkpoint, and this rank's data position and RNG; returns the
    client state saved with it (`step` and the clock's)."""
    with checkpoint_folder(checkpoint) as directory:
        client_state = strategy.load(directory)
        mine = read_worker_state(directory, rank)
    stream.load_state_dict(mine["stream"])
    set_rng_state(mine["rng"])
    return client_state
