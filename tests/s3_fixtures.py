"""pytest fixtures for a real S3 endpoint on loopback: moto's server, started once per test session.

tests/conftest.py imports them, so every test module can ask for them:

    def test_reads_s3(s3_bucket):
        ...  # s3_bucket == "s3://<fresh bucket>", AWS_* environment set for s3fs/boto3

No mocks: s3fs talks HTTP to the server exactly as it would to S3, with credentials and the endpoint taken
from the environment (`pipelines.storage.storage_options`).
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator

import pytest
import s3fs
from moto.server import ThreadedMotoServer

_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _s3_environment(endpoint: str) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL": endpoint, **_CREDENTIALS}


_CLEARED = ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """The endpoint URL (http://127.0.0.1:<port>) of a moto S3 server that lives for the test session.

    The endpoint and test credentials go into os.environ for the whole session (and are restored after),
    so processes started later - Ray workers above all - inherit them: a Ray runtime started before
    this fixture does not see them, so make a `ray.init` fixture depend on `s3_server`.
    """
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as patch:
        for name, value in _s3_environment(endpoint).items():
            patch.setenv(name, value)
        for name in _CLEARED:
            patch.delenv(name, raising=False)
        try:
            yield endpoint
        finally:
            server.stop()


@pytest.fixture
def s3_bucket(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh empty bucket as "s3://<name>", with AWS_ENDPOINT_URL and test credentials in the env."""
    for name, value in _s3_environment(s3_server).items():
        monkeypatch.setenv(name, value)  # again: a test before this one may have changed them
    for name in _CLEARED:
        monkeypatch.delenv(name, raising=False)
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    fs.mkdir(bucket)
    try:
        yield f"s3://{bucket}"
    finally:
        fs.invalidate_cache()
