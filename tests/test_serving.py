"""The served model (jobs/serving.py) under hostile requests: it reads only what the deployment allows, within
limits, and its errors are one line with no stack trace and no echo of the request.

The checks in-process, then one `mlflow models serve` on loopback (a tiny random model) for every request.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import pytest

from jobs import serving
from jobs.serving import (
    MAX_IMAGE_PIXELS,
    MAX_NEW_TOKENS,
    ModelFailed,
    RequestRefused,
    allowed_location,
    image_prefixes,
    read_image,
)
from tests.helpers import shapes_image

# what MLflow puts in an error reply besides the message: codes, never a stack_trace
REPLY_FIELDS = {"error_code", "message", "error_class", "sqlstate"}
NOT_ALLOWED = "image: not base64 image data, nor a path or URI under a prefix this server allows"


def png_base64(width: int = 56, height: int = 56) -> str:
    buffer = io.BytesIO()
    shapes_image(width, height).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def declared_png(width: int, height: int) -> bytes:
    """A few bytes of PNG that declare `width` x `height` pixels (a decompression bomb's header)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def allowed(tmp_path_factory) -> Path:
    """A folder to allow, holding an image, a link out of it, and a link to a device."""
    root = tmp_path_factory.mktemp("allowed")
    shapes_image(56, 56).save(root / "shapes.png")
    (root / "passwd").symlink_to("/etc/passwd")
    (root / "zero.png").symlink_to("/dev/zero")
    (root / "images").mkdir()
    return root


def test_the_limits_are_prepares_defaults():
    from pipelines.settings import PrepareSettings

    assert serving.MAX_IMAGE_PIXELS == PrepareSettings().max_image_pixels
    assert serving.MAX_PROMPT_TOKENS == PrepareSettings().max_tokens


def test_by_default_no_path_or_uri_is_read_and_a_refusal_does_not_tell_whether_a_file_exists():
    messages = set()
    named = (
        "/etc/passwd",
        "file:///etc/passwd",
        "/etc/no-such-file",
        "file:///dev/zero",
        "http://127.0.0.1:9/x.png",
        "s3://bucket/x.png",
        "shapes.png",
    )
    for value in named:
        with pytest.raises(RequestRefused) as refused:
            read_image(value)
        messages.add(refused.value.message)
    assert len(messages) == 1 and next(iter(messages)).startswith(NOT_ALLOWED)


def test_only_real_paths_under_an_allowed_prefix_are_read(allowed):
    prefixes = image_prefixes(f" {allowed}/images , file://{allowed}, https://images.example.com")
    assert prefixes == (f"{allowed}/images/", f"{allowed}/", "https://images.example.com/")
    assert read_image(str(allowed / "shapes.png"), prefixes).size == (56, 56)
    assert read_image(f"file://{allowed}/images/../shapes.png", prefixes).size == (56, 56)
    escapes = (
        f"{allowed}/passwd",  # a link out of the folder
        f"{allowed}/../../etc/passwd",
        f"file://{allowed}/images/../../x",
        f"{allowed}-sibling/x.png",
        "file:///etc/passwd",
        "https://images.example.com.evil.net/x.png",
        "https://images.example.com/a/%2e%2e/x.png",
        "https://other.example.com/x.png",
    )
    for escape in escapes:
        assert allowed_location(escape, prefixes) is None, escape
    assert (
        allowed_location("https://images.example.com/a/b.png", prefixes)
        == "https://images.example.com/a/b.png"
    )
    with pytest.raises(RequestRefused, match="not a regular file"):
        read_image(str(allowed / "zero.png"), (f"{allowed}/", "/dev/"))  # a device, even where allowed
    with pytest.raises(RequestRefused, match="no file at that path"):
        read_image(str(allowed / "missing.png"), prefixes)
    with pytest.raises(ValueError, match="neither an absolute path nor a URI"):
        image_prefixes("images/")


def test_images_over_the_limits_or_not_images_are_refused():
    with pytest.raises(RequestRefused, match=f"more than {MAX_IMAGE_PIXELS} pixels"):
        read_image(declared_png(12_000, 12_000))
    with pytest.raises(RequestRefused, match=f"more than {MAX_IMAGE_PIXELS} pixels"):
        read_image(base64.b64encode(declared_png(100_000, 100_000)).decode())  # past Pillow's own bomb error
    with pytest.raises(RequestRefused, match="larger than"):
        read_image("A" * (serving.MAX_IMAGE_BYTES * 2))
    with pytest.raises(RequestRefused, match="not an image"):
        read_image(base64.b64encode(b"hello, not an image").decode())
    assert read_image(png_base64()).mode == "RGB"


def test_max_new_tokens_is_bounded():
    assert serving.max_new_tokens(None) == serving.DEFAULT_MAX_NEW_TOKENS
    assert serving.max_new_tokens({"max_new_tokens": MAX_NEW_TOKENS}) == MAX_NEW_TOKENS
    for bad in (0, -1, MAX_NEW_TOKENS + 1, 100_000, True, "8", 2.5):
        with pytest.raises(RequestRefused, match=f"from 1 to {MAX_NEW_TOKENS}"):
            serving.max_new_tokens({"max_new_tokens": bad})


def test_a_serving_error_keeps_its_message_when_mlflow_prefixes_the_request():
    refused = RequestRefused("image: too large")
    refused.message = (
        f"Failed to predict data '{'x' * 50}'. \nError: {refused.message}"  # as scoring_server does
    )
    reply = json.loads(refused.serialize_as_json())
    assert reply["message"] == "image: too large" and set(reply) <= REPLY_FIELDS
    assert refused.get_http_status_code() == 400 and ModelFailed().get_http_status_code() == 500


def test_a_model_failure_is_logged_here_and_answered_without_its_trace(caplog):
    from tests.helpers import tiny_model

    class FailingModel:  # a model that fails cannot be had on demand: this one raises what a GPU might
        def generate(self, **inputs):
            raise RuntimeError("CUDA out of memory while running /srv/secret/model.py")

    served = serving.HoVLEPyfunc()
    served.image_prefixes, served.processor = (), tiny_model()[1]
    served.model = FailingModel()
    with pytest.raises(ModelFailed) as failed:
        served.predict(None, [{"prompt": "Hi", "image": png_base64()}])
    assert "secret" not in failed.value.serialize_as_json() and "secret" in caplog.text


# --- over HTTP: one server for every request ---


@pytest.fixture(scope="module")
def server(tmp_path_factory, allowed):
    """The base URL of `mlflow models serve` for a tiny logged model, allowing `allowed`'s images."""
    import mlflow

    from jobs.export import write_export
    from jobs.registry import log_hovle_model
    from tests.helpers import tiny_model

    root = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    model, processor = tiny_model(init_std=0.5)
    write_export(model, processor, model.state_dict(), str(root / "export"), {"stage": "instruct"})
    client = mlflow.MlflowClient(uri)
    run = client.create_run(client.create_experiment("serving", artifact_location=str(root / "artifacts")))
    model_uri = log_hovle_model(str(root / "export"), run.info.run_id, uri)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    bin_dir = Path(sys.executable).parent  # the serve command runs `uvicorn` from the PATH, as when activated
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        serving.IMAGE_PREFIXES_ENV: str(allowed),
    }
    process = subprocess.Popen(
        [str(bin_dir / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=10):
                    break
            except OSError:
                assert process.poll() is None, process.stderr.read()[-3000:]
                assert time.monotonic() < deadline, "the model server did not come up in 180 s"
                time.sleep(1)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)


def post(base: str, body: bytes | dict) -> tuple[int, str]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{base}/invocations", data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def ask(base: str, image: str = "", prompt: str = "What is this?", **params) -> tuple[int, str]:
    body = {
        "dataframe_records": [{"prompt": prompt, "image": image}],
        "params": {"max_new_tokens": 3, **params},
    }
    return post(base, body)


def refusal(reply: tuple[int, str]) -> str:
    """The message of a 400 reply, checked to carry nothing but an error code and the message."""
    status, text = reply
    assert status == 400, reply
    body = json.loads(text)
    assert body["error_code"] == "INVALID_PARAMETER_VALUE" and set(body) <= REPLY_FIELDS, body
    assert "Traceback" not in text and "Failed to predict data" not in text
    return body["message"]


@pytest.mark.slow
def test_mlflow_models_serve_answers_an_http_request(server, allowed):
    status, text = ask(server, png_base64())
    assert status == 200, text
    [answer] = json.loads(text)["predictions"]
    assert isinstance(answer["answer"], str)
    status, text = ask(server, str(allowed / "shapes.png"))  # under HOVLE_SERVE_IMAGE_PREFIXES
    assert status == 200, text


@pytest.mark.slow
def test_the_server_reads_no_file_or_url_the_caller_names(server, allowed):
    port = server.rsplit(":", 1)[1]
    named = (
        "file:///etc/passwd",
        "/etc/passwd",
        "/etc/no-such-file",
        "file:///dev/zero",
        f"http://127.0.0.1:{port}/ping",
        f"{allowed}/passwd",  # links out of the allowed folder
        f"{allowed}/zero.png",
        f"{allowed}/../../etc/passwd",
    )
    for image in named:
        assert refusal(ask(server, image)).startswith(f"row 0: {NOT_ALLOWED}"), image
    assert refusal(ask(server, str(allowed / "missing.png"))) == "row 0: image: no file at that path or URI"


@pytest.mark.slow
def test_the_server_refuses_requests_over_its_limits_quickly(server):
    bomb = base64.b64encode(declared_png(12_000, 12_000)).decode()
    assert f"more than {MAX_IMAGE_PIXELS} pixels" in refusal(ask(server, bomb))
    started = time.monotonic()
    assert "more than 2048 tokens" in refusal(ask(server, "", prompt="How many? " * 10_000))  # untokenized
    assert "more than 2048 tokens" in refusal(ask(server, "", prompt="How many? " * 1_000))  # counted
    assert time.monotonic() - started < 10
    assert f"from 1 to {MAX_NEW_TOKENS}" in refusal(ask(server, "", max_new_tokens=100_000))
    assert "reserved image token" in refusal(ask(server, "", prompt="<IMG_CONTEXT> hi"))
    assert "not an image" in refusal(ask(server, base64.b64encode(b"%PDF-1.4").decode()))
    rows = [{"prompt": "hi", "image": ""}] * (serving.MAX_ROWS + 1)
    assert "at most 16 in one request" in refusal(post(server, {"dataframe_records": rows}))


@pytest.mark.slow
def test_mlflows_own_parse_errors_carry_no_stack_trace(server):
    """MLflow answers a body it cannot parse itself (documented in README.md: it quotes the body back)."""
    for body in (b"{not json", json.dumps({"dataframe_records": [{"image": 3}]}).encode()):
        status, text = post(server, body)
        assert 400 <= status < 500 and "stack_trace" not in json.loads(text), text
