"""Corpus readers: one work unit (`pipelines.units.WorkUnit`) -> raw record rows (schema.RAW_SCHEMA).

    read_unit(unit, settings)  ->  raw rows, one per sample, in file order, never raising for bad data
    read_unit_batches(items)   ->  the same rows as Arrow tables, for Ray Data `map_batches` (prepare)

One reader per `WorkUnit.format` (`_READERS`); `pipelines.sources` finds the units. A row carries its
images as refs (paths relative to the root, resolved later by preprocess with `ids.safe_resolve`) or as
inline bytes. Every read is bounded before it is parsed (`max_record_bytes`, `max_file_bytes`, regular
files only), so no record can hang a reader or exhaust its memory. Nothing here imports torch or
transformers: `read_unit_batches` runs in Ray Data's lightweight read tasks.
"""

from __future__ import annotations

import json
import logging
import posixpath
import tarfile
from collections.abc import Iterator, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.ids import UnsafePath, join_id, repeat_copies, safe_resolve
from pipelines.schema import RAW_SCHEMA, encode_payload, raw_row
from pipelines.settings import PrepareSettings
from pipelines.units import IMAGE_EXTENSIONS, WorkUnit, parquet_columns

logger = logging.getLogger(__name__)

PARQUET_BATCH_ROWS = 256


def read_unit(
    unit: WorkUnit | Mapping[str, Any], settings: PrepareSettings | None = None
) -> Iterator[dict[str, Any]]:
    """Yield the raw rows (schema.RAW_SCHEMA) of one work unit, one per sample, in file order.

    Bad records become rows with `error` and `detail` set; a file that cannot be read on (e.g. a truncated
    tar) ends with one `unreadable_file` row, a reader failing in a way not foreseen with one
    `internal_error` row. A unit whose root was refused (`root_error`) has each record rejected as
    unsafe_path. Meta JSON `repeat_time` is applied here (`repeat_copies`); error rows come once.
    """
    if not isinstance(unit, WorkUnit):
        unit = WorkUnit.from_dict(unit)
    settings = settings or PrepareSettings()
    reader = _READERS[unit.format]
    try:
        for row in reader(unit, settings):
            if unit.root_error and not row["error"]:
                row = {**row, "payload": "", "error": "unsafe_path", "detail": unit.root_error}
            yield row
    except (OSError, EOFError, tarfile.TarError, pa.ArrowException) as err:
        logger.warning("%s: cannot read on: %s", unit.key, err)
        detail = f"{unit.key}: {type(err).__name__}: {err}"
        yield _row(unit, join_id(unit.id_prefix, "#unreadable"), "", error="unreadable_file", detail=detail)
    except Exception as err:  # a hostile record the checks above missed: quarantine it, keep the run
        logger.exception("%s: the reader failed", unit.key)
        detail = f"{unit.key}: the reader failed: {type(err).__name__}: {err}"
        yield _row(unit, join_id(unit.id_prefix, "#failed"), "", error="internal_error", detail=detail)


def read_unit_batches(
    items: Mapping[str, Any], rows_per_batch: int = 64, settings: PrepareSettings | None = None
) -> Iterator[pa.Table]:
    """Ray Data `map_batches` over work units (columns `unit`: WorkUnit JSON, `unit_key`): each unit's raw
    rows (`read_unit` with `settings`) as RAW_SCHEMA tables of at most `rows_per_batch` rows, with a
    `unit_key` column. Kept away from torch and transformers: on a small machine their start-up would
    compete with the preprocessing actors'."""
    for unit_json, key in zip(items["unit"], items["unit_key"]):
        unit = WorkUnit.from_dict(json.loads(unit_json))
        rows: list[dict[str, Any]] = []
        for raw in read_unit(unit, settings):
            rows.append(raw)
            if len(rows) == rows_per_batch:
                yield _raw_table(str(key), rows)
                rows = []
        if rows:
            yield _raw_table(str(key), rows)


def _raw_table(key: str, rows: list[dict[str, Any]]) -> pa.Table:
    table = pa.Table.from_pylist(rows, schema=RAW_SCHEMA)
    return table.append_column("unit_key", pa.array([key] * len(rows), pa.string()))


def _row(unit: WorkUnit, sample_id: str, kind: str, **fields: Any) -> dict[str, Any]:
    """A raw row of `unit`; a row with an `error` carries no payload."""
    if fields.get("error"):
        fields["payload"] = ""
    return raw_row(id=sample_id, source=unit.source, unit=unit.key, root=unit.root, kind=kind, **fields)


class _Ids:
    """Sample ids of one unit: the record's own key when it has one, made unique within the unit."""

    def __init__(self, unit: WorkUnit) -> None:
        self.prefix = unit.id_prefix
        self.seen: set[str] = set()

    def __call__(self, own: Any, position: str) -> str:
        key = str(own) if isinstance(own, (str, int)) and not isinstance(own, bool) and str(own) else position
        if key in self.seen:
            key = f"{key}@{position}"
        self.seen.add(key)
        return join_id(self.prefix, key)


def _json_lines(unit: WorkUnit, settings: PrepareSettings) -> Iterator[tuple[str, Any, str, str]]:
    """(position, record, error, detail) per non-blank line; position is "L<line number>". A line over
    `max_record_bytes` is skipped unparsed (record_too_large)."""
    fs, path = storage.filesystem(unit.uri)
    limit = settings.max_record_bytes
    with fs.open(path, "rb") as f:
        for number, line in enumerate(storage.bounded_lines(f, limit), 1):
            if line is None:
                detail = f"line {number}: over max_record_bytes ({limit} bytes)"
                yield f"L{number}", None, "record_too_large", detail
                continue
            if number == 1:
                line = line.removeprefix(b"\xef\xbb\xbf")
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as err:
                yield f"L{number}", None, "invalid_utf8", f"line {number}: {err}"
                continue
            yield f"L{number}", *_parse_json(text, f"line {number}")


def _parse_json(text: str | bytes, where: str) -> tuple[Any, str, str]:
    """(document, error, detail): invalid_json also for nesting too deep for the parser."""
    try:
        return json.loads(text), "", ""
    except json.JSONDecodeError as err:
        return None, "invalid_json", f"{where}: {err.msg} (line {err.lineno}, column {err.colno})"
    except RecursionError:
        return None, "invalid_json", f"{where}: nested too deeply to parse"


def _json_array(unit: WorkUnit, settings: PrepareSettings) -> Iterator[tuple[str, Any, str, str]]:
    data, error, detail = _read_whole(unit.uri, settings.max_file_bytes, "file_too_large")
    if not error:
        try:
            document, error, detail = _parse_json(data.decode("utf-8"), unit.uri)
        except UnicodeDecodeError as err:
            error, detail = "invalid_utf8", f"{unit.uri}: {err}"
    if error:
        yield "file", None, error, detail
        return
    if not isinstance(document, list):
        yield "file", None, "invalid_record", f"{unit.uri}: expected a JSON array of records"
        return
    for index, record in enumerate(document):
        yield f"i{index}", record, "", ""


def _read_whole(uri: str, limit: int, too_large: str) -> tuple[bytes, str, str]:
    """(bytes, error, detail) of a file read whole: a regular file (else not_a_file) of at most `limit`
    bytes (else the reason `too_large`)."""
    try:
        return storage.read_bytes(uri, limit), "", ""
    except storage.NotRegularFile as err:
        return b"", "not_a_file", str(err)
    except storage.FileTooLarge as err:
        return b"", too_large, str(err)


def _read_conversations(unit: WorkUnit, settings: PrepareSettings) -> Iterator[dict[str, Any]]:
    ids = _Ids(unit)
    records = (_json_array if unit.format == "conversation_json" else _json_lines)(unit, settings)
    for position, record, error, detail in records:
        own = record.get("id") if isinstance(record, dict) else None
        sample_id = ids(own, position)
        if error:
            yield _row(unit, sample_id, "conversation", error=error, detail=detail)
            continue
        images = record.get("image", record.get("images")) if isinstance(record, dict) else None
        images = [] if images is None or images == "" else [images] if isinstance(images, str) else images
        # image-only records ({"id", "image"}) are stage 1's unpaired images; stages 2-3 reject them later
        unpaired = isinstance(record, dict) and "conversations" not in record and bool(images)
        if not isinstance(record, dict) or not (unpaired or isinstance(record.get("conversations"), list)):
            problem = "a 'conversations' list (or, for unpaired images, an 'image')"
        elif not isinstance(images, list) or not all(isinstance(i, str) and i for i in images):
            problem = "'image' as a path or a list of paths"
        else:
            payload = encode_payload(conversations=record.get("conversations"))
            for copy_id in repeat_copies(sample_id, unit.repeat_time):
                yield _row(unit, copy_id, "conversation", payload=payload, image_refs=images)
            continue
        yield _row(
            unit, sample_id, "conversation", error="invalid_record", detail=f"{position}: needs {problem}"
        )


def _read_text_jsonl(unit: WorkUnit, settings: PrepareSettings) -> Iterator[dict[str, Any]]:
    ids = _Ids(unit)
    for position, record, error, detail in _json_lines(unit, settings):
        sample_id = ids(record.get("id") if isinstance(record, dict) else None, position)
        text = record.get("text") if isinstance(record, dict) else None
        if not error and not isinstance(text, str):
            error, detail = "invalid_record", f"{position}: needs a string 'text' field"
        yield _row(unit, sample_id, "text", payload=encode_payload(text=text), error=error, detail=detail)


def _read_member_text(unit: WorkUnit, rel: str, settings: PrepareSettings) -> tuple[str | None, str, str]:
    """(text, error, detail) of a .txt file inside the unit's root, of at most max_record_bytes."""
    try:
        uri = safe_resolve(unit.root, rel)
        data, error, detail = _read_whole(uri, settings.max_record_bytes, "record_too_large")
    except UnsafePath as err:
        return None, "unsafe_path", str(err)
    except FileNotFoundError as err:
        return None, "unreadable_file", f"{rel} disappeared after it was listed: {err}"
    if error:
        return None, error, detail
    try:
        return data.decode("utf-8").removeprefix("\ufeff"), "", ""
    except UnicodeDecodeError as err:
        return None, "invalid_utf8", f"{rel}: {err}"


def _read_image_folder(unit: WorkUnit, settings: PrepareSettings) -> Iterator[dict[str, Any]]:
    for image, caption_file in zip(unit.members, unit.companions):
        sample_id = join_id(unit.id_prefix, image or caption_file)
        if not image:
            detail = f"caption {caption_file} has no image of the same name beside it"
            yield _row(unit, sample_id, "caption", error="missing_image", detail=detail)
        elif not caption_file:
            yield _row(unit, sample_id, "image", payload=_caption_payload(None), image_refs=[image])
        else:
            caption, error, detail = _read_member_text(unit, caption_file, settings)
            payload = _caption_payload(caption)
            yield _row(
                unit, sample_id, "caption", payload=payload, image_refs=[image], error=error, detail=detail
            )


def _read_text_files(unit: WorkUnit, settings: PrepareSettings) -> Iterator[dict[str, Any]]:
    for rel in unit.members:
        text, error, detail = _read_member_text(unit, rel, settings)
        payload = encode_payload(text=text)
        yield _row(unit, join_id(unit.id_prefix, rel), "text", payload=payload, error=error, detail=detail)


def _tar_samples(
    unit: WorkUnit, settings: PrepareSettings
) -> Iterator[tuple[str, dict[str, bytes], tuple[str, str]]]:
    """(key, {extension: bytes}, (error, detail)) per WebDataset sample: consecutive files whose names
    agree up to a dot. A member over its bound (text: max_record_bytes, else max_file_bytes) is passed
    over unread and makes the sample's error (record_too_large or file_too_large)."""
    fs, path = storage.filesystem(unit.uri)
    key, files, error = None, {}, ("", "")
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            directory, base = posixpath.split(member.name)
            if base.startswith("."):
                continue
            stem, _, extension = base.partition(".")
            member_key = join_id(directory, stem)
            if member_key != key and key is not None:
                yield key, files, error
                files, error = {}, ("", "")
            key = member_key
            is_text = extension.lower() in ("txt", "json")
            limit = settings.max_record_bytes if is_text else settings.max_file_bytes
            if member.size > limit:
                reason = "record_too_large" if is_text else "file_too_large"
                error = error if error[0] else (reason, f"{member.name}: {member.size} bytes > {limit}")
                continue
            handle = tar.extractfile(member)
            files[extension.lower()] = handle.read() if handle else b""
    if key is not None:
        yield key, files, error


def _read_webdataset(unit: WorkUnit, settings: PrepareSettings) -> Iterator[dict[str, Any]]:
    ids = _Ids(unit)
    for key, files, (too_large, why) in _tar_samples(unit, settings):
        sample_id = ids(key, key)
        if too_large:
            yield _row(unit, sample_id, "caption", error=too_large, detail=why)
            continue
        image_ext = next((ext for ext in sorted(files) if ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS), None)
        if image_ext is None:
            detail = f"sample {key} has no image file (.jpg, .png, ...)"
            yield _row(unit, sample_id, "caption", error="missing_image", detail=detail)
            continue
        caption, error, detail = None, "", ""
        if "txt" in files:
            try:
                caption = files["txt"].decode("utf-8")
            except UnicodeDecodeError as err:
                error, detail = "invalid_utf8", f"{key}.txt: {err}"
        elif "json" in files:
            try:
                meta, error, detail = _parse_json(files["json"], f"{key}.json")
            except UnicodeDecodeError as err:
                meta, error, detail = None, "invalid_json", f"{key}.json: {err}"
            if isinstance(meta, dict) and isinstance(meta.get("caption"), str):
                caption = meta["caption"]
        kind, payload = "image" if caption is None else "caption", _caption_payload(caption)
        yield _row(
            unit, sample_id, kind, payload=payload, image_bytes=[files[image_ext]], error=error, detail=detail
        )


def _read_parquet(unit: WorkUnit, settings: PrepareSettings) -> Iterator[dict[str, Any]]:
    fs, path = storage.filesystem(unit.uri)
    ident, image_column, text_column = parquet_columns(fs, path)
    columns = [name for name in (ident, image_column, text_column) if name]
    ids, position, limit = _Ids(unit), 0, settings.max_record_bytes
    with fs.open(path, "rb") as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
            for record in batch.to_pylist():
                sample_id = ids(record.get(ident) if ident else None, str(position))
                position += 1
                yield _parquet_row(unit, sample_id, record, image_column, text_column, limit)


def _parquet_row(
    unit: WorkUnit, sample_id: str, record: dict, image_column: str | None, text_column: str | None, cap: int
) -> dict[str, Any]:
    text = record.get(text_column) if text_column else None
    value = record.get(image_column) if image_column else None
    blob, ref = (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (value, None)
    kind = "text" if image_column is None else "image" if text is None else "caption"
    size = len(blob or b"") + len(ref or "") + len(text or "")
    if size > cap:  # left here: a record this large would travel through Ray's object store
        detail = f"the record's image and text are {size} bytes > max_record_bytes {cap}"
        return _row(unit, sample_id, kind, error="record_too_large", detail=detail)
    if image_column is None:
        if text is None:
            return _row(unit, sample_id, "text", error="invalid_record", detail=f"{text_column} is null")
        return _row(unit, sample_id, "text", payload=encode_payload(text=text))
    payload = _caption_payload(text)
    if blob:
        return _row(unit, sample_id, kind, payload=payload, image_bytes=[blob])
    if ref:
        return _row(unit, sample_id, kind, payload=payload, image_refs=[ref])
    error = "missing_image" if blob is None else "empty_file"
    return _row(unit, sample_id, kind, error=error, detail=f"column {image_column!r} holds no image bytes")


def _caption_payload(caption: str | None) -> str:
    """The payload of an image with its caption (stripped), or of an image alone."""
    return encode_payload() if caption is None else encode_payload(caption=caption.strip())


_READERS = {
    "conversation_jsonl": _read_conversations,
    "conversation_json": _read_conversations,
    "text_jsonl": _read_text_jsonl,
    "webdataset": _read_webdataset,
    "parquet": _read_parquet,
    "image_folder": _read_image_folder,
    "text_files": _read_text_files,
}
