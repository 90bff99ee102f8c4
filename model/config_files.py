"""A run config's YAML on disk: the presets shipped in the package, safe reading, `extends`.

    document, path = read_run_document("my-run.yaml")   # one mapping, `extends` merged, schema checked

Anything that is not a run config (a folder, a device, a huge or binary file, text that is not YAML, a
list or a scalar, an `extends` loop) is a ConfigError naming the file, never a traceback.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from model.errors import ConfigError

# The presets are package data (model/configs/*.yaml), so a plain, non-editable install (a container image)
# finds them: pyproject.toml's package-data ships them in the wheel.
CONFIG_DIR = Path(str(resources.files("model") / "configs"))


def find_preset(name_or_path: str | Path) -> Path:
    """A YAML path, or the name of a preset shipped in the package (`tiny`, `smollm2-135m`, `hovle-2.6b`,
    `hovle-hd`, ...: model/configs/)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise FileNotFoundError(f"no config file {name_or_path!r} and no preset of that name (presets: {names})")


SCHEMA_VERSION = 1  # of the run config's layout; a later release migrates older versions or names the change
MAX_EXTENDS = 8


def read_run_document(name_or_path: str | Path) -> tuple[dict[str, Any], Path]:
    """A run config's YAML as one mapping, and its file: `extends: <preset or path>` resolved (the base
    document, deep-merged with this one: mappings merge key by key, anything else replaces), and
    `schema_version` checked (missing: the current one).

    Raises:
        FileNotFoundError: no such file or preset.
        ConfigError: not a mapping, an `extends` loop or chain too long, or a schema version this release
            does not read.
    """
    chain: list[Path] = []
    documents: list[dict[str, Any]] = []
    source: str | Path | None = name_or_path
    while source is not None:
        path = find_preset(source) if not chain else _find_base(source, chain[-1])
        if path.resolve() in chain:
            raise ConfigError(f"{chain[0]}: `extends` loops back to {path}")
        if len(chain) >= MAX_EXTENDS:
            raise ConfigError(f"{chain[0]}: `extends` chain longer than {MAX_EXTENDS}")
        chain.append(path.resolve())
        document = _read_yaml(path)
        version = document.get("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise ConfigError(
                f"{path}: schema_version {version!r}: this release reads run configs of schema_version "
                f"{SCHEMA_VERSION}"
                + (
                    " (the file is newer: upgrade hovle-platform)"
                    if isinstance(version, int) and version > SCHEMA_VERSION
                    else ""
                )
            )
        source = document.pop("extends", None)
        if source is not None and not isinstance(source, str):
            raise ConfigError(f"{path}: extends: a preset name or a YAML path, got {type(source).__name__}")
        documents.append(document)
    merged: dict[str, Any] = {}
    for document in reversed(documents):  # the base first, each extension over it
        merged = _deep_merge(merged, document)
    merged["schema_version"] = SCHEMA_VERSION
    return merged, chain[0]


MAX_CONFIG_BYTES = 1 << 20  # a run config is a page of YAML; anything larger is not one


def _read_yaml(path: Path) -> dict[str, Any]:
    """The mapping in the YAML file at `path`; anything else (a folder, a device, a huge or binary file,
    text that is not YAML, a list or a scalar) is a ConfigError naming the file."""
    if not path.is_file():
        raise ConfigError(f"{path}: not a file")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {size} bytes, too large for a run config (at most {MAX_CONFIG_BYTES})")
    try:
        document = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (not UTF-8)") from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"{path}: not YAML{line}: {getattr(err, 'problem', None) or err}") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: a run config is a YAML mapping, got {type(document).__name__}")
    return document


def _find_base(source: str | Path, child: Path) -> Path:
    """`extends:` names a preset, or a YAML path relative to the file that extends it."""
    relative = child.parent / str(source)
    return relative if relative.is_file() else find_preset(source)


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out
