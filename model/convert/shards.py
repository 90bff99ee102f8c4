"""Stream a checkpoint's tensors shard by shard, and write converted tensors as size-capped shards.

Reading opens one source shard at a time and yields its tensors one by one; writing buffers tensors
until a shard's worth is held and flushes it. A conversion therefore holds about one shard, never the
model: a 10 GB fp32 checkpoint converts in a few GB of memory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model.convert import ConversionError

logger = logging.getLogger(__name__)

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


def _indexed_files(folder: Path, index_name: str) -> list[Path]:
    try:
        index = json.loads((folder / index_name).read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{folder / index_name}: not JSON ({err})") from err
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConversionError(f"{folder / index_name}: no `weight_map`")
    files = list(dict.fromkeys(weight_map.values()))  # each shard once, in the index's order
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: shards named in {index_name} are missing: {', '.join(missing)}")
    return [folder / name for name in files]


def checkpoint_files(folder: Path) -> list[Path]:
    """The weight files of the checkpoint in `folder`: safetensors (an index's shards, or one file),
    else PyTorch .bin files; FileNotFoundError when there are none."""
    for index, single in ((SAFE_INDEX, SAFE_SINGLE), (BIN_INDEX, BIN_SINGLE)):
        if (folder / index).is_file():
            return _indexed_files(folder, index)
        if (folder / single).is_file():
            return [folder / single]
    raise FileNotFoundError(f"{folder}: no {SAFE_INDEX}, {SAFE_SINGLE}, {BIN_INDEX} or {BIN_SINGLE}")


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A .bin state dict through `torch.load(weights_only=True)`: a pickle that would run code is refused."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (pre-zipfile) format cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ConversionError(
            f"{path}: refused, the pickle holds more than tensors (weights_only load failed: "
            f"{str(err).splitlines()[0]}); convert it to safetensors from a trusted environment first"
        ) from err
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise ConversionError(f"{path}: not a state dict of tensors")
    return state


def iter_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the checkpoint in `folder`, one shard open at a time; each
    tensor is read only when it is reached."""
    for path in checkpoint_files(folder):
        logger.info("reading %s", path.name)
        if path.suffix == ".safetensors":
            try:
                shard = safe_open(str(path), framework="pt")
            except SafetensorError as err:
                raise ConversionError(f"{path}: not a readable safetensors file ({err})") from err
            with shard:
                for name in shard.keys():
                    yield name, shard.get_tensor(name)
        else:
            state = _load_bin(path)
            while state:
                yield state.popitem()
            del state


class ShardWriter:
    """Collects tensors into `folder` as safetensors shards of at most ~`max_shard_bytes` each (a tensor
    larger than that gets a shard of its own), then `close()` names them `model-0000i-of-0000n` and
    writes the index (or one `model.safetensors` when everything fit in one shard).

    `held_bytes` is what the buffer holds now, `peak_bytes` the most it ever held."""

    def __init__(self, folder: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
        self.folder = folder
        self.max_shard_bytes = max_shard_bytes
        self._buffer: dict[str, torch.Tensor] = {}
        self._written: list[tuple[Path, list[str]]] = []
        self._names: set[str] = set()
        self.held_bytes = 0
        self.peak_bytes = 0
        self.total_bytes = 0

    @property
    def names(self) -> set[str]:
        """The names of every tensor added so far."""
        return set(self._names)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ConversionError(f"tensor {name!r} written twice")
        self._names.add(name)
        size = tensor.numel() * tensor.element_size()
        if self._buffer and self.held_bytes + size > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = tensor.contiguous()
        self.held_bytes += size
        self.total_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.held_bytes)

    def _flush(self) -> None:
        path = self.folder / f"shard-{len(self._written):05d}.partial"
        save_file(self._buffer, str(path), metadata={"format": "pt"})
        self._written.append((path, list(self._buffer)))
        self._buffer = {}
        self.held_bytes = 0

    def close(self) -> list[Path]:
        """Flush the last shard, give the shards their final names, write the index; the files written."""
        if self._buffer:
            self._flush()
        if not self._written:
            raise ConversionError("no tensors to write")
        count = len(self._written)
        if count == 1:
            final = self.folder / SAFE_SINGLE
            self._written[0][0].rename(final)
            return [final]
        weight_map: dict[str, str] = {}
        files = []
        for i, (path, names) in enumerate(self._written, start=1):
            final = self.folder / f"model-{i:05d}-of-{count:05d}.safetensors"
            path.rename(final)
            files.append(final)
            weight_map.update(dict.fromkeys(names, final.name))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return files


@contextlib.contextmanager
def atomic_output_folder(dest: Path) -> Iterator[Path]:
    """A temporary folder beside `dest`, renamed to `dest` when the block succeeds and deleted when it
    fails, so a crash never leaves half a checkpoint. `dest` must not exist or be an empty folder."""
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ConversionError(f"{dest} exists and is not an empty folder: choose a new output folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        yield partial
        if dest.exists():
            dest.rmdir()
        partial.rename(dest)
    finally:
        if partial.exists():
            shutil.rmtree(partial)
