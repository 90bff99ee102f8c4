"""A local cache of what transformers converts out of a GGUF file: the LLM's config and its tokenizer.

transformers reads a GGUF file whole to build either one: 2.9 s for SmolLM2-135M's config and 2.5 s for its
tokenizer on 2 cores, paid by every process that builds a preset's processor (each `prepare`, training
worker and evaluation). The conversion's results are plain files (`config.json`, the tokenizer's files),
so they are kept, like Hugging Face's own cache, under ``$HOVLE_CACHE_DIR`` (default
``$XDG_CACHE_HOME/hovle``, else ``~/.cache/hovle``) in a folder keyed by the GGUF file (resolved path,
size, modification time) and the transformers version. ``HOVLE_CACHE_DIR=off`` turns the cache off.

An entry is written to a temporary folder and renamed into place, so a reader never sees half of one;
concurrent writers race harmlessly (the first rename wins). A cache that cannot be written is skipped
with a warning: the conversion result is used as it is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import transformers
from transformers import CONFIG_MAPPING, AutoConfig, AutoTokenizer, PreTrainedConfig, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

CACHE_ENV = "HOVLE_CACHE_DIR"
CACHE_OFF = "off"
_FORMAT = 1  # bump when what an entry holds changes
_CONFIG_FILE = "config.json"
_TOKENIZER_DIR = "tokenizer"


def cache_root() -> Path | None:
    """Where entries live, or None when ``HOVLE_CACHE_DIR=off``."""
    configured = os.environ.get(CACHE_ENV)
    if configured == CACHE_OFF:
        return None
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hovle"


def entry_dir(gguf_path: Path) -> Path | None:
    """The cache folder for one GGUF file as it is now (a changed file gets a new folder)."""
    root = cache_root()
    if root is None:
        return None
    resolved = gguf_path.resolve()
    stat = resolved.stat()
    key = json.dumps(
        [_FORMAT, str(resolved), stat.st_size, stat.st_mtime_ns, transformers.__version__]
    ).encode("utf-8")
    return root / "gguf" / f"{resolved.stem}-{hashlib.sha256(key).hexdigest()[:16]}"


def text_config(directory: str, gguf_file: str) -> PreTrainedConfig:
    """`AutoConfig.from_pretrained(directory, gguf_file=...)`, converted once per GGUF file."""
    entry = entry_dir(Path(directory) / gguf_file)
    cached = entry / _CONFIG_FILE if entry is not None else None
    if cached is not None and cached.is_file():
        values = json.loads(cached.read_text())
        config = CONFIG_MAPPING[values.pop("model_type")].from_dict(values)
        config._name_or_path = directory  # as from_pretrained sets it
        return config
    config = AutoConfig.from_pretrained(directory, gguf_file=gguf_file)
    if entry is not None:
        _publish(entry, _CONFIG_FILE, lambda target: target.write_text(config.to_json_string()))
    return config


def tokenizer(directory: str, gguf_file: str) -> PreTrainedTokenizerFast:
    """`AutoTokenizer.from_pretrained(directory, gguf_file=...)`, converted once per GGUF file."""
    entry = entry_dir(Path(directory) / gguf_file)
    cached = entry / _TOKENIZER_DIR if entry is not None else None
    if cached is not None and cached.is_dir():
        return AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
    converted = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file, local_files_only=True)
    if entry is not None:
        _publish(entry, _TOKENIZER_DIR, lambda target: converted.save_pretrained(str(target)))
    return converted


def _publish(entry: Path, name: str, write) -> None:
    """Write `entry/name` through a temporary sibling and one rename; warn and go on if that fails."""
    try:
        entry.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=entry))
        try:
            write(staging / name)
            os.rename(staging / name, entry / name)
        except OSError:
            if not (entry / name).exists():  # losing the race to another writer is fine
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as error:
        logger.warning("GGUF cache %s not written (%s); converting again next time", entry, error)
