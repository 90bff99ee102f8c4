"""Entrypoints a person or a scheduler runs: `python -m jobs.<name>` or `hovle <name>`."""

import contextlib
import os
import sys
from collections.abc import Iterator

# tqdm reads TQDM_* once, on first import (transformers and MLflow import it before a job parses its
# arguments): a job is quiet unless verbose (jobs/logging_setup.py), so no GGUF-conversion or download bars
if os.environ.get("HOVLE_VERBOSE", "") in ("", "0") and "--verbose" not in sys.argv:
    os.environ.setdefault("TQDM_DISABLE", "1")


@contextlib.contextmanager
def environ_set(name: str, value: str) -> Iterator[None]:
    """`os.environ[name] = value` inside the block only: the previous value, or its absence, comes back."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous
