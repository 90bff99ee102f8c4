"""URIs (local paths, file://, s3://) through fsspec: listing, reading, atomic writes.

S3 endpoint, region and credentials come from the environment (`AWS_ENDPOINT_URL`, `AWS_*`), never from
code or configs. A local write lands under a temporary name and is renamed into place; an S3 object is
written by one PUT, which S3 makes visible all at once.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from collections.abc import Iterator
from typing import Any, BinaryIO

import fsspec
from fsspec import AbstractFileSystem

# Object storage that cannot be reached or signed for: a configuration error, not a bug (jobs.cli).
try:
    from botocore import exceptions as _boto
except ImportError:  # a served model's environment: no S3 client at all
    UNREACHABLE: tuple[type[Exception], ...] = ()
else:
    UNREACHABLE = (
        _boto.NoCredentialsError,
        _boto.PartialCredentialsError,
        _boto.EndpointConnectionError,
        _boto.ConnectTimeoutError,
    )
UNREACHABLE_HINT = (
    "S3: set AWS_ENDPOINT_URL for an S3-compatible store, and credentials: AWS_ACCESS_KEY_ID and "
    "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance role"
)


def storage_options(uri: str) -> dict[str, Any]:
    """fsspec options for `uri`: the S3 endpoint from AWS_ENDPOINT_URL(_S3) when one is set."""
    if uri.startswith(("s3://", "s3a://")):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}
    return {}


def filesystem(uri: str) -> tuple[AbstractFileSystem, str]:
    """(filesystem, path inside it) for a URI or a local path."""
    return fsspec.core.url_to_fs(uri, **storage_options(uri))


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI or local path."""
    if "://" in uri:
        scheme, _, rest = uri.partition("://")
        return f"{scheme}://{posixpath.join(rest, *parts)}"
    return os.path.join(uri, *parts)


def to_uri(fs: AbstractFileSystem, path: str) -> str:
    """The URI of `path` inside `fs` (inverse of `filesystem`)."""
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    if protocol in ("file", "local"):
        return path
    return f"{protocol}://{path}"


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


class NotRegularFile(ValueError):
    """A path names a folder, FIFO, device or socket where a regular file was expected."""


class FileTooLarge(ValueError):
    """A file is larger than the limit it was read with."""


def read_bytes(uri: str, limit: int | None = None) -> bytes:
    """The file's bytes. With `limit`: only a regular file (not a folder, FIFO or device) of at most
    `limit` bytes, else NotRegularFile or FileTooLarge (ValueErrors), so a hostile path cannot hang or
    exhaust the reader."""
    fs, path = filesystem(uri)
    if limit is not None and fs.info(path).get("type") != "file":
        raise NotRegularFile(f"{uri}: not a regular file")
    with fs.open(path, "rb") as f:
        data = f.read() if limit is None else f.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise FileTooLarge(f"{uri}: larger than {limit} bytes")
    return data


_LINE_CHUNK = 1024 * 1024


def bounded_lines(f: BinaryIO, limit: int) -> Iterator[bytes | None]:
    """Each line of an open binary file (without its newline), in order; a line over `limit` bytes comes
    back as None, read past in chunks but never held whole, so one huge line costs no memory."""
    pending: list[bytes] = []  # the current line's pieces so far
    size, oversized = 0, False
    while chunk := f.read(_LINE_CHUNK):
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            piece = chunk[start:end]
            yield None if oversized or size + len(piece) > limit else b"".join(pending) + piece
            pending, size, oversized = [], 0, False
            start = end + 1
        if not oversized:
            size += len(chunk) - start
            oversized = size > limit
            pending = [] if oversized else pending + [chunk[start:]]
    if oversized:
        yield None
    elif size:
        yield b"".join(pending)


def read_text(uri: str, limit: int | None = None) -> str:
    """UTF-8 text (UnicodeDecodeError, a ValueError, when it is not); `limit` as read_bytes."""
    return read_bytes(uri, limit).decode("utf-8")


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write `data` so that readers see either the old object or the whole new one, never a part."""
    fs, path = filesystem(uri)
    parent = posixpath.dirname(path) if is_remote(uri) else os.path.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if is_remote(uri):
        fs.pipe_file(path, data)
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text_atomic(uri: str, text: str) -> None:
    write_bytes_atomic(uri, text.encode("utf-8"))


def remove(uri: str, recursive: bool = False) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def put_directory(local_dir: str, uri: str) -> None:
    """Copy a local folder's files to `uri` (a folder; created as needed), keeping relative paths."""
    fs, path = filesystem(uri)
    paths = posixpath if is_remote(uri) else os.path
    for root, _, files in os.walk(local_dir):
        for name in files:
            source = os.path.join(root, name)
            target = paths.join(path, os.path.relpath(source, local_dir).replace(os.sep, "/"))
            fs.makedirs(paths.dirname(target), exist_ok=True)
            fs.put_file(source, target)


def get_directory(uri: str, local_dir: str) -> None:
    """Copy the files under `uri` (a folder) into `local_dir`, keeping relative paths."""
    fs, path = filesystem(uri)
    root = path.rstrip("/")
    for remote in fs.find(root):
        relative = remote[len(root) :].lstrip("/")
        target = os.path.join(local_dir, *relative.split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fs.get_file(remote, target)
