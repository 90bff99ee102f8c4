"""Entrypoints a person or a scheduler runs: `python -m jobs.<name>` or `hovle <name>`."""

import os
import sys

# tqdm reads TQDM_* once, when it is first imported (transformers and MLflow import it early, before a job
# parses its arguments): a job is quiet unless asked to be verbose (jobs/logging_setup.py), so no
# GGUF-conversion or artifact-download bars
if os.environ.get("HOVLE_VERBOSE", "") in ("", "0") and "--verbose" not in sys.argv:
    os.environ.setdefault("TQDM_DISABLE", "1")
