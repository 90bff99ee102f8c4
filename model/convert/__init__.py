"""Checkpoint importers: a released checkpoint's layout -> one transformers loads natively (no remote code).

`shards` streams safetensors shard by shard; `internlm2` maps InternLM2 (fused `wqkv`) onto Llama.
"""

import json
from pathlib import Path
from typing import Any


class ConversionError(ValueError):
    """A source checkpoint this importer cannot convert (wrong model type, unsafe pickle, bad layout)."""


def read_json_object(path: Path) -> dict[str, Any]:
    """A config file's JSON object (ConversionError when it is not JSON or not an object)."""
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path}: not JSON ({err})") from err
    if not isinstance(config, dict):
        raise ConversionError(f"{path}: not a config object")
    return config
