"""Corpus discovery: an input URI -> its work units, the pieces that one task each reads (`readers.py`).

Cheap: listings, a peek into a JSONL file, a Parquet footer; `discover_units` says which formats are found
and how. Sample ids are stable across runs: ``<id_prefix>/<key>``, the prefix naming the source (and the
file inside it), the key the record's own id, its WebDataset key, its path inside an image folder, or its
line/row position. Image refs are not opened here: preprocess resolves them (`ids.safe_resolve`).
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
from collections.abc import Mapping
from typing import Any

from fsspec import AbstractFileSystem

from pipelines import storage
from pipelines.ids import UnsafePath, join_id, safe_resolve, stable_fraction
from pipelines.manifest import stable_hash
from pipelines.units import IMAGE_EXTENSIONS, SourceError, WorkUnit, parquet_columns

logger = logging.getLogger(__name__)

FILES_PER_UNIT = 256  # average folder files per work unit: units stay coarse (one Ray task reads many)
PEEK_LINE_BYTES = 1024 * 1024  # longer lines are passed over when peeking at a JSONL file's format
META_JSON_MAX_BYTES = 16 * 1024 * 1024  # an InternVL meta JSON names datasets: a few KB in practice


class SourceNotFound(FileNotFoundError):
    """An input URI (or a file a meta JSON names) does not exist."""


# ---- discovery -----------------------------------------------------------------------------------------


def discover_units(
    input_uri: str, *, image_root: str | None = None, files_per_unit: int = FILES_PER_UNIT
) -> list[WorkUnit]:
    """Find the work units of one input (a local path or URI), in a deterministic order (by key).

    A file input is read by its extension: ``.jsonl`` (conversations, or a text corpus when its first
    record has "text" and no "conversations"), ``.json`` (an InternVL meta JSON object -> one unit per
    dataset, whose `root` must lie inside the meta file's folder or be an s3:// URI (`_meta_root`: any
    other root has its records rejected as unsafe_path) and whose `annotation` must be a regular file;
    or a JSON array of conversations), ``.parquet``, ``.tar`` (WebDataset), ``.txt`` (one
    document), an image (one image, with ``x.txt`` beside it as caption).

    A folder input is listed recursively (names starting with "." or "_" skipped) and each file is read
    by the same rules, except: images are paired with the ``.txt`` of the same stem in the same folder
    (caption) or stand alone (image); a ``.txt`` without an image beside it is a text document, unless
    its folder holds images (then it is a caption whose image is missing); loose ``.json`` files are
    ignored (sidecars), as are ``.parquet`` files beside ``.tar`` shards (img2dataset's metadata).
    Images and text documents are grouped into units of about `files_per_unit` files, with boundaries
    chosen by a hash of the file name so that adding a file changes only the unit it lands in.

    Args:
        input_uri: the input as the user gave it.
        image_root: the folder that conversation records' image paths are relative to (default: the
            folder holding the JSONL/JSON file; meta JSON entries give their own `root`).
        files_per_unit: average number of folder files per unit.

    Raises:
        SourceNotFound: the input (or a file a meta JSON names) does not exist.
        SourceError: no supported format was recognised, or a meta JSON is malformed.
    """
    if files_per_unit < 1:
        raise ValueError(f"files_per_unit must be >= 1, got {files_per_unit}")
    fs, path = storage.filesystem(input_uri)
    path = path.rstrip("/") or path
    if not fs.exists(path):
        raise SourceNotFound(f"input {input_uri} does not exist")
    source_name = posixpath.basename(path) or path
    if fs.isdir(path):
        units = _discover_folder(fs, path, input_uri, source_name, image_root, files_per_unit)
    else:
        units = _discover_file(fs, path, fs.info(path), input_uri, source_name, image_root, single=True)
    if not units:
        raise SourceError(
            f"{input_uri}: found nothing to read; expected .jsonl/.json/.parquet/.tar/.txt files or images"
        )
    units.sort(key=lambda unit: unit.key)
    logger.info(
        "%s: %d work unit(s) (%s)", input_uri, len(units), ", ".join(sorted({u.format for u in units}))
    )
    return units


def _extension(path: str) -> str:
    return posixpath.splitext(path)[1].lower().lstrip(".")


def _file_fingerprint(info: Mapping[str, Any]) -> str:
    tag = info.get("ETag") or info.get("etag") or info.get("md5")
    if tag is None:
        tag = info.get("mtime") or info.get("LastModified") or info.get("created")
    return f"{info.get('size')}:" + str(tag).strip('"')  # S3 ETags come quoted


def _peek_jsonl_format(fs: AbstractFileSystem, path: str) -> str:
    """'text_jsonl' when the first parseable record has "text" and no "conversations", else conversations."""
    with fs.open(path, "rb") as f:
        for _, line in zip(range(100), storage.bounded_lines(f, PEEK_LINE_BYTES)):
            if line is None:
                continue
            try:
                record = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                continue
            if isinstance(record, dict):
                is_text = "text" in record and "conversations" not in record
                return "text_jsonl" if is_text else "conversation_jsonl"
    return "conversation_jsonl"


def _file_unit(
    fs: AbstractFileSystem,
    path: str,
    info: Mapping[str, Any],
    source: str,
    id_prefix: str,
    fmt: str,
    root: str,
    also_read: Mapping[str, Any] | None = None,
    **extra: Any,
) -> WorkUnit:
    """A unit reading one file (`info`: its fsspec info; `also_read`: the info of a caption beside it)."""
    uri = storage.to_uri(fs, path)
    file_fingerprints = [_file_fingerprint(info), _file_fingerprint(also_read) if also_read else ""]
    fingerprint = stable_hash([fmt, root, id_prefix, file_fingerprints, extra])[:32]
    return WorkUnit(uri, uri, source, fmt, root, fingerprint, id_prefix, **extra)


def _discover_file(
    fs: AbstractFileSystem,
    path: str,
    info: Mapping[str, Any],
    source: str,
    id_prefix: str,
    image_root: str | None,
    single: bool = False,
) -> list[WorkUnit]:
    """The unit(s) of one file; a file that is not a corpus file gives [] (or SourceError when `single`)."""
    parent = storage.to_uri(fs, posixpath.dirname(path))
    ext = _extension(path)
    if ext == "jsonl":
        fmt = _peek_jsonl_format(fs, path)
        return [_file_unit(fs, path, info, source, id_prefix, fmt, image_root or parent)]
    if ext == "parquet":
        parquet_columns(fs, path)  # fail fast on a Parquet file with nothing to read
        return [_file_unit(fs, path, info, source, id_prefix, "parquet", parent)]
    if ext == "tar":
        return [_file_unit(fs, path, info, source, id_prefix, "webdataset", parent)]
    if ext == "json":
        return _discover_json(fs, path, info, source, id_prefix, image_root)
    if not single:
        return []
    members = (posixpath.basename(path),)
    if ext == "txt":
        return [_file_unit(fs, path, info, source, "", "text_files", parent, members=members)]
    if ext in IMAGE_EXTENSIONS:
        caption = posixpath.splitext(path)[0] + ".txt"
        caption_info = fs.info(caption) if fs.exists(caption) else None
        extra = {"members": members, "companions": (posixpath.basename(caption) if caption_info else "",)}
        return [_file_unit(fs, path, info, source, "", "image_folder", parent, caption_info, **extra)]
    raise SourceError(f"{source}: unsupported file type {ext!r}")


def _discover_json(
    fs: AbstractFileSystem,
    path: str,
    info: Mapping[str, Any],
    source: str,
    id_prefix: str,
    image_root: str | None,
) -> list[WorkUnit]:
    """A JSON array of conversations, or an InternVL meta JSON (one unit per dataset entry), told apart by
    the first byte that is not blank: an array is parsed by its reader (bounded by `max_file_bytes`), a meta
    JSON here, up to META_JSON_MAX_BYTES."""
    base = storage.to_uri(fs, posixpath.dirname(path))
    with fs.open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")  # a UTF-8 byte-order mark, then blanks
    if head.startswith(b"["):
        return [_file_unit(fs, path, info, source, id_prefix, "conversation_json", image_root or base)]
    if (info.get("size") or 0) > META_JSON_MAX_BYTES:  # records in a .json file come as an array
        raise SourceError(f"{source}: too large for an InternVL meta JSON (over {META_JSON_MAX_BYTES} bytes)")
    try:
        document = json.loads(fs.cat_file(path))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SourceError(f"{source}: not valid JSON ({err})") from err
    except RecursionError:
        raise SourceError(f"{source}: not valid JSON (nested too deeply to parse)") from None
    if not isinstance(document, dict) or not document:
        raise SourceError(
            f"{source}: expected an InternVL meta JSON object {{name: {{root, annotation, repeat_time}}}} "
            "or a JSON array of conversation records"
        )
    units = []
    for name in sorted(document):
        entry = document[name]
        if not isinstance(entry, dict) or not isinstance(entry.get("annotation"), str):
            raise SourceError(f"{source}: meta entry {name!r} needs an 'annotation' path (a JSONL file)")
        repeat_time = entry.get("repeat_time", 1.0)
        if not isinstance(repeat_time, (int, float)) or isinstance(repeat_time, bool) or repeat_time < 0:
            raise SourceError(f"{source}: meta entry {name!r}: repeat_time must be a number >= 0")
        annotation = _relative_to(base, entry["annotation"])
        afs, apath = storage.filesystem(annotation)
        if not afs.exists(apath):
            raise SourceNotFound(f"{source}: meta entry {name!r} names {annotation}, which does not exist")
        ainfo = afs.info(apath)
        if ainfo.get("type") != "file":
            raise SourceError(
                f"{source}: meta entry {name!r} names {annotation}, which is not a regular file"
            )
        fmt = "conversation_json" if _extension(apath) == "json" else _peek_jsonl_format(afs, apath)
        root, root_error = _meta_root(base, entry.get("root"), f"{source}: meta entry {name!r}")
        if not root and not root_error:
            root = storage.to_uri(afs, posixpath.dirname(apath))
        prefix, repeat = join_id(id_prefix, name), float(repeat_time)
        fingerprint = stable_hash([fmt, root, root_error, prefix, _file_fingerprint(ainfo), repeat])[:32]
        key = f"{annotation}#{name}"
        extra = {"repeat_time": repeat, "root_error": root_error}
        units.append(WorkUnit(key, annotation, source, fmt, root, fingerprint, prefix, **extra))
    return units


def _meta_root(base: str, root: Any, where: str) -> tuple[str, str]:
    """(root, "") for a meta entry's `root`, or ("", why it is refused); ("", "") when none is given.

    A root is a folder inside the meta file's folder `base` (given relative to it, or as an absolute path
    that lies inside it; checked like an image path, `safe_resolve`: no ``..`` out, no symlink out), or
    an s3:// URI. Any other root (``/``, ``/dev``, ``../..``, ``file://...``) would let a meta JSON read
    any file of the host (``/dev/zero``, ``/etc``): its entry's records are rejected (unsafe_path)
    instead of read.
    """
    if root is None or root == "":
        return "", ""
    if not isinstance(root, str):
        raise SourceError(f"{where}: 'root' must be a path relative to the meta file (or an s3:// URI)")
    if root.startswith(("s3://", "s3a://")):
        return root, ""
    inside = root
    if not storage.is_remote(base) and os.path.isabs(root):
        inside = os.path.relpath(root, base.removeprefix("file://"))
    try:
        safe_resolve(base, inside)
    except UnsafePath as err:
        logger.warning("%s: root %r refused: %s", where, root, err)
        return "", (
            f"{where}: root {root!r} is refused ({err}); a meta root must be a folder inside the meta "
            f"file's folder {base}, given relative to it, or an s3:// URI"
        )
    return _relative_to(base, root), ""


def _relative_to(base: str, path: str) -> str:
    """`path` as given when absolute or a URI, else joined onto `base` (the meta JSON's folder)."""
    if "://" in path or os.path.isabs(path):
        return path
    joined = storage.join(base, path)
    if "://" in joined:
        scheme, _, rest = joined.partition("://")
        return f"{scheme}://{posixpath.normpath(rest)}"
    return os.path.normpath(joined)


def _chunks(entries: list[tuple[str, str]], size: int) -> list[list[tuple[str, str]]]:
    """Content-defined chunking: a chunk ends after an entry whose name hashes under 1/size."""
    chunks: list[list[tuple[str, str]]] = []
    current: list[tuple[str, str]] = []
    for entry in entries:
        current.append(entry)
        if len(current) >= 4 * size or stable_fraction(f"chunk:{entry[0] or entry[1]}") < 1 / size:
            chunks.append(current)
            current = []
    if current:
        chunks.append(current)
    return chunks


def _discover_folder(
    fs: AbstractFileSystem,
    path: str,
    source: str,
    source_name: str,
    image_root: str | None,
    files_per_unit: int,
) -> list[WorkUnit]:
    files: dict[str, Mapping[str, Any]] = {}
    for full, info in fs.find(path, detail=True).items():
        rel = posixpath.relpath(full, path)
        hidden = any(part.startswith((".", "_")) for part in rel.split("/"))
        # symlinks are listed too: where they lead is checked (safe_resolve) and counted, not skipped
        if (info.get("type") == "file" or info.get("islink")) and not hidden:
            files[rel] = info
    by_ext: dict[str, list[str]] = {}
    for rel in sorted(files):
        by_ext.setdefault(_extension(rel), []).append(rel)

    units: list[WorkUnit] = []
    ignored = [rel for ext, rels in by_ext.items() if ext not in _FOLDER_EXTENSIONS for rel in rels]
    for ext in ("jsonl", "tar", "parquet"):
        for rel in by_ext.get(ext, []):
            if ext == "parquet" and by_ext.get("tar"):
                ignored.append(rel)  # img2dataset writes a metadata .parquet beside each .tar shard
                continue
            id_prefix = join_id(source_name, rel)
            units += _discover_file(fs, f"{path}/{rel}", files[rel], source, id_prefix, image_root)
    if ignored:
        logger.info("%s: ignoring %d file(s), e.g. %s", source, len(ignored), sorted(ignored)[:3])

    images = [rel for ext in sorted(IMAGE_EXTENSIONS) for rel in by_ext.get(ext, [])]
    stems = {posixpath.splitext(rel)[0] for rel in images}
    image_dirs = {posixpath.dirname(rel) for rel in images}
    pairs = []  # (image, caption): caption "" = none, image "" = a caption whose image is missing
    for rel in images:
        caption = posixpath.splitext(rel)[0] + ".txt"
        pairs.append((rel, caption if caption in files else ""))
    documents = []
    for rel in by_ext.get("txt", []):
        if posixpath.splitext(rel)[0] in stems:
            continue
        if posixpath.dirname(rel) in image_dirs:
            pairs.append(("", rel))
        else:
            documents.append((rel, ""))

    folder_uri = storage.to_uri(fs, path)
    for fmt, entries in (("image_folder", pairs), ("text_files", documents)):
        entries.sort(key=lambda entry: (posixpath.splitext(entry[0] or entry[1])[0], entry))
        for chunk in _chunks(entries, files_per_unit):
            members = tuple(member for member, _ in chunk)
            companions = tuple(companion for _, companion in chunk) if fmt == "image_folder" else ()
            files_seen = [_file_fingerprint(files[rel]) if rel else "" for pair in chunk for rel in pair]
            fingerprint = stable_hash([fmt, folder_uri, source_name, members, companions, files_seen])[:32]
            key = f"{folder_uri}#{chunk[0][0] or chunk[0][1]}"
            units.append(
                WorkUnit(
                    key, folder_uri, source, fmt, folder_uri, fingerprint, source_name, members, companions
                )
            )
    return units


_FOLDER_EXTENSIONS = frozenset({"jsonl", "tar", "parquet", "txt", *IMAGE_EXTENSIONS})
