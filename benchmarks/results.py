"""Where benchmarks put their figures: results/<name>.json, with the machine they were measured on."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent.parent / "results"


def default_output(name: str) -> Path:
    return RESULTS_DIR / f"{name}.json"


def machine() -> dict[str, Any]:
    """What the figures depend on besides the code: cores, architecture, Python."""
    return {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()}


def save(path: Path, result: dict[str, Any]) -> None:
    """Write `result` (machine info added) as indented JSON and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**result, **machine()}, indent=2) + "\n")
    print(f"wrote {path}")
