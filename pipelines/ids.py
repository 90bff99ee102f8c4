"""Sample ids and the dataset-root boundary, shared by discovery, the readers and preprocess.

join_id("src", "file.jsonl", "17")   -> "src/file.jsonl/17"      stable ids of samples
repeat_copies / split_repeat          InternVL's `repeat_time`: the copies of a record, and back
stable_fraction(text)                 a number in [0, 1) from a stable hash (splits, prompts, repeats)
safe_resolve(root, ref)               an image or caption path inside its dataset root, or UnsafePath
"""

from __future__ import annotations

import hashlib
import os

from pipelines import storage

REPEAT_SEPARATOR = "#rep"  # id suffix of the extra copies that meta JSON `repeat_time` > 1 makes


class UnsafePath(ValueError):
    """A record's file path points outside its dataset root."""


def join_id(*parts: str) -> str:
    """The non-empty parts joined by "/": a sample id from its source, file and key."""
    return "/".join(part for part in parts if part)


def stable_fraction(text: str) -> float:
    """A number in [0, 1) from a stable hash of `text` (blake2b; the same on every machine and run)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def repeat_copies(base_id: str, repeat_time: float) -> list[str]:
    """The sample ids one record becomes under InternVL's `repeat_time`.

    The integer part gives that many copies (the first keeps `base_id`, copy k >= 1 is
    ``base_id#rep<k>``); the fractional part adds one more copy to that share of records, chosen by a
    stable hash of `base_id`. So 0.3 keeps ~30% of the records, 2.5 doubles them and adds a third copy
    to ~half: the same records on every run.
    """
    whole = int(repeat_time)
    extra = 1 if stable_fraction(f"repeat:{base_id}") < repeat_time - whole else 0
    return [base_id if k == 0 else f"{base_id}{REPEAT_SEPARATOR}{k}" for k in range(whole + extra)]


def split_repeat(sample_id: str) -> tuple[str, int]:
    """(base id, copy index) of a sample id made by `repeat_copies`; copy 0 for ordinary ids."""
    base, separator, copy = sample_id.rpartition(REPEAT_SEPARATOR)
    if separator and copy.isdigit():
        return base, int(copy)
    return sample_id, 0


def safe_resolve(root: str, ref: str) -> str:
    """The URI of `ref` (a path relative to `root`), refusing anything that leaves `root`.

    Local roots: absolute refs are refused, and the real path (symlinks followed) must lie inside the
    root's real path, so ``../x`` and links pointing out are caught. Remote roots (s3://) have no symlinks:
    absolute refs, URIs and any ``..`` component are refused.

    Raises:
        UnsafePath: with what was wrong.
    """
    if not root:
        raise UnsafePath(f"image path {ref!r} has no dataset root to resolve against")
    if not ref or "\x00" in ref:
        raise UnsafePath(f"invalid file path {ref!r}")
    if "://" in ref:
        raise UnsafePath(f"{ref!r} is a URI; records may only name files relative to the dataset root")
    if storage.is_remote(root):
        parts = ref.replace("\\", "/").split("/")
        if ref.startswith(("/", "\\")) or ".." in parts:
            raise UnsafePath(f"{ref!r} escapes the dataset root {root}")
        return storage.join(root, "/".join(part for part in parts if part not in ("", ".")))
    local_root = root.removeprefix("file://")
    if os.path.isabs(ref):
        raise UnsafePath(f"{ref!r} is an absolute path; records may only name files inside {root}")
    real_root = os.path.realpath(local_root)
    candidate = os.path.realpath(os.path.join(local_root, ref))
    if os.path.commonpath([real_root, candidate]) != real_root:
        raise UnsafePath(f"{ref!r} resolves to {candidate}, outside the dataset root {real_root}")
    return candidate
