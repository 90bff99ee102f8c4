"""Work units: what discovery (`pipelines.sources`) hands the readers (`pipelines.readers`).

A `WorkUnit` is one piece of an input that one task reads (a file, one meta JSON entry, or a chunk of a
folder) and names the format (`FORMATS`) it is read as. The format facts that both sides must read alike
live here too: which extensions are images, and which Parquet columns hold ids, images and text
(`parquet_columns`). Discovery and the readers each import this module and never each other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"})
PARQUET_TEXT_COLUMNS = ("text", "caption", "txt", "sentence")
PARQUET_IMAGE_COLUMNS = ("image", "img", "jpg", "jpeg", "png", "webp", "image_bytes")
PARQUET_ID_COLUMNS = ("id", "key")

FORMATS = (
    "conversation_jsonl",  # one LLaVA/InternVL record per line
    "conversation_json",  # a JSON array of such records (LLaVA's original release)
    "text_jsonl",  # one {"text": ...} per line
    "webdataset",  # a tar of key.jpg + key.txt / key.json samples
    "parquet",  # an image column (struct{bytes, path} or binary) and/or a text column
    "image_folder",  # images (members) with optional caption .txt beside them (companions)
    "text_files",  # one document per .txt file (members)
)


class SourceError(ValueError):
    """An input cannot be read as any supported corpus format."""


@dataclass(frozen=True)
class WorkUnit:
    """One piece of an input that one task reads: a file, one meta JSON entry, or a chunk of a folder.

    Attributes:
        key: unique name of the unit inside a run; raw rows carry it as `unit`.
        uri: the file read (for folder chunks: the folder).
        source: the input URI the user gave.
        format: one of `FORMATS`.
        root: folder (URI) that the records' relative file paths resolve against.
        fingerprint: changes whenever the content or the way it is read changes (file size + ETag or
            mtime of every file, root, repeat_time, members).
        id_prefix: first part of every sample id from this unit.
        members: folder chunks: paths relative to `root` (images, or .txt documents; "" = no image).
        companions: image folder chunks: caption .txt path beside each member ("" = none).
        repeat_time: InternVL meta JSON sampling factor (see `repeat_copies`).
        root_error: why the unit's root was refused (a meta JSON root outside the meta file's folder):
            then `root` is "" and every record of the unit is rejected as unsafe_path with this detail.
    """

    key: str
    uri: str
    source: str
    format: str
    root: str
    fingerprint: str
    id_prefix: str
    members: tuple[str, ...] = ()
    companions: tuple[str, ...] = ()
    repeat_time: float = 1.0
    root_error: str = ""

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"unknown work unit format {self.format!r}; expected one of {FORMATS}")

    def to_dict(self) -> dict[str, Any]:
        """Plain values only (lists for tuples), fit for a Ray Data row or JSON."""
        row = dataclasses.asdict(self)
        row["members"] = list(self.members)
        row["companions"] = list(self.companions)
        return row

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> WorkUnit:
        """Inverse of `to_dict`; accepts list-likes (numpy arrays from Ray batches) and ignores extra keys."""
        values = {field.name: row[field.name] for field in dataclasses.fields(cls) if field.name in row}
        for name in ("members", "companions"):
            items = values.get(name)
            values[name] = () if items is None else tuple(str(item) for item in items)
        values["repeat_time"] = float(values.get("repeat_time", 1.0))
        return cls(**values)


def parquet_columns(fs: AbstractFileSystem, path: str) -> tuple[str | None, str | None, str | None]:
    """(id column, image column, text column) of a Parquet file, by name and type.

    Raises:
        SourceError: when the file has neither an image nor a text column.
    """
    with fs.open(path, "rb") as f:
        schema = pq.read_schema(f)
    names = {name.lower(): name for name in schema.names}

    def is_image(name: str) -> bool:
        kind = schema.field(name).type
        if pa.types.is_struct(kind):
            return kind.get_field_index("bytes") >= 0
        return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)

    def is_text(name: str) -> bool:
        return pa.types.is_string(kind := schema.field(name).type) or pa.types.is_large_string(kind)

    image_candidates = [names[c] for c in PARQUET_IMAGE_COLUMNS if c in names] + list(schema.names)
    image = next((name for name in image_candidates if is_image(name)), None)
    text = next((names[c] for c in PARQUET_TEXT_COLUMNS if c in names and is_text(names[c])), None)
    ident = next((names[c] for c in PARQUET_ID_COLUMNS if c in names), None)
    if image is None and text is None:
        raise SourceError(
            f"{path}: no image column (struct{{bytes, path}} or binary) and no text column "
            f"({', '.join(PARQUET_TEXT_COLUMNS)}); columns are {schema.names}"
        )
    return ident, image, text
