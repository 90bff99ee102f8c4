"""The MLflow pyfunc model of a HoVLE (or compositional baseline) export: image + prompt -> answer.

Logged from code (`jobs.registry.log_hovle_model`) with the `model/` and `pipelines/` packages, the Hugging
Face folder as its `hf_model` artifact (a LoRA adapter export's `adapter/` is merged on load). Loading it
(`mlflow.pyfunc.load_model("models:/hovle@champion")`, `mlflow models serve`) needs neither Ray, DeepSpeed
nor the training code: only mlflow, torch, transformers, pillow and fsspec.

Input: at most `MAX_ROWS` rows (a DataFrame or a list of dicts) of `prompt` and an optional image as
`image` (base64; or an absolute path, `file://` or fsspec URI, only under a prefix the deployment allows in
`HOVLE_SERVE_IMAGE_PREFIXES`, checked on the resolved real path) or `image_bytes`; param `max_new_tokens`.
Output: a DataFrame with one `answer` column. A request over a limit (the `MAX_*` constants) or otherwise
refused is `RequestRefused` (HTTP 400, naming the row and limit); any other failure is logged here with its
trace and answered `ModelFailed` (HTTP 500), without the trace or any part of the request.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import os
import warnings
from typing import Any
from urllib.parse import unquote

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE

logger = logging.getLogger(__name__)

HF_ARTIFACT = "hf_model"  # the artifacts key (and folder) that holds the Hugging Face export
IMAGE_PREFIXES_ENV = "HOVLE_SERVE_IMAGE_PREFIXES"
DEFAULT_MAX_NEW_TOKENS = 32
MAX_NEW_TOKENS = 512
MAX_PROMPT_TOKENS = 2048  # prepare's default max_tokens: no training sample was longer
# a longer prompt is refused untokenized (no text is near 32 characters a token)
MAX_PROMPT_CHARS = 32 * MAX_PROMPT_TOKENS
MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_IMAGE_PIXELS = 40_000_000  # prepare's default max_image_pixels (pipelines/settings.py; a test checks)
MAX_ROWS = 16


class ServingError(MlflowException):
    """An error whose HTTP reply is `{"error_code": ..., "message": ...}` and nothing more.

    MLflow's scoring server (3.17, `mlflow/pyfunc/scoring_server`) rewrites the message of an MlflowException
    raised by `predict` to "Failed to predict data '<the request, as pandas prints it>'. Error: ...": the
    message is kept as raised, so no part of a request is echoed back to whoever sent it.
    """

    def __init__(self, message: str, error_code: int) -> None:
        self._kept: str | None = None
        super().__init__(message, error_code=error_code)

    @property
    def message(self) -> str | None:
        return self._kept

    @message.setter
    def message(self, value: str) -> None:
        if self._kept is None:
            self._kept = value


class RequestRefused(ServingError):
    """A request over a limit, an image that is not one, or a path or URI the deployment does not allow."""

    def __init__(self, message: str) -> None:
        super().__init__(message, INVALID_PARAMETER_VALUE)


class ModelFailed(ServingError):
    """The model failed on a request it accepted; the trace is in the server's log, not in the reply."""

    def __init__(self) -> None:
        super().__init__("the model failed on this request; the server's log has the details", INTERNAL_ERROR)


def image_prefixes(setting: str) -> tuple[str, ...]:
    """The allowed prefixes from `HOVLE_SERVE_IMAGE_PREFIXES`'s value: a local folder (absolute, or a
    `file://` URI) becomes its real path ending in a separator; a URI ends in "/" so `https://host` does not
    allow `https://host.evil`.

    Raises:
        ValueError: an entry that is neither an absolute path nor a URI.
    """
    prefixes = []
    for entry in (part.strip() for part in setting.split(",")):
        if not entry:
            continue
        local = _local_path(entry)
        if local is not None:
            if not os.path.isabs(local):
                raise ValueError(f"{IMAGE_PREFIXES_ENV}: {entry!r} is neither an absolute path nor a URI")
            prefixes.append(os.path.join(os.path.realpath(local), ""))
        else:
            prefixes.append(entry if entry.endswith("/") else entry + "/")
    return tuple(prefixes)


def _local_path(value: str) -> str | None:
    """The local path `value` names (a path or a file:// URI), or None for another URI."""
    if "://" not in value:
        return value
    scheme, _, rest = value.partition("://")
    return rest if scheme.lower() == "file" else None


def allowed_location(value: str, prefixes: tuple[str, ...]) -> str | None:
    """What to read for `value` (its real path, or the URI) when it is under an allowed prefix, else None.
    A path is checked after resolving symlinks and `..`; a URI holding a `..` segment is never allowed."""
    if not prefixes or len(value) > 4096 or "\x00" in value:
        return None
    local = _local_path(value)
    if local is None:
        if ".." in unquote(value.partition("://")[2]).split("/"):
            return None
        return value if value.startswith(prefixes) else None
    if not os.path.isabs(local):
        return None
    real = os.path.realpath(local)
    return real if os.path.join(real, "").startswith(prefixes) else None


def read_image(value: Any, prefixes: tuple[str, ...] = ()):
    """An RGB PIL image from bytes, base64 text, or a path or URI under `prefixes`; None for no image.

    Raises:
        RequestRefused: over `MAX_IMAGE_BYTES` or `MAX_IMAGE_PIXELS`, not an image, or text that is neither
            base64 nor an allowed path or URI (the same message whether or not such a file exists).
    """
    if value is None or (isinstance(value, float) and value != value) or value == "":  # NaN: a missing cell
        return None
    if isinstance(value, (bytes, bytearray)):
        return decode_image(bytes(value))
    if not isinstance(value, str):
        raise RequestRefused(f"image: expected base64 text or bytes, got {type(value).__name__}")
    location = allowed_location(value, prefixes)
    if location is not None:
        return decode_image(_read_allowed(location))
    if len(value) > (MAX_IMAGE_BYTES + 2) // 3 * 4:
        raise RequestRefused(f"image: larger than {MAX_IMAGE_BYTES} bytes")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RequestRefused(
            "image: not base64 image data, nor a path or URI under a prefix this server allows "
            f"({IMAGE_PREFIXES_ENV}); send the image's bytes as base64"
        ) from None
    return decode_image(data)


def _read_allowed(location: str) -> bytes:
    from pipelines.storage import read_bytes

    try:
        return read_bytes(location, limit=MAX_IMAGE_BYTES)
    except FileNotFoundError:
        raise RequestRefused("image: no file at that path or URI") from None
    except ValueError:  # a folder, device or FIFO, or too large
        raise RequestRefused(f"image: not a regular file of at most {MAX_IMAGE_BYTES} bytes") from None
    except OSError:
        logger.warning("reading an allowed image failed", exc_info=True)
        raise RequestRefused("image: that path or URI cannot be read") from None


def decode_image(data: bytes):
    """Image bytes -> an RGB PIL image; the declared size is checked before any pixel is decoded.

    Raises:
        RequestRefused: over `MAX_IMAGE_BYTES` or `MAX_IMAGE_PIXELS`, or not an image Pillow reads.
    """
    from PIL import Image, UnidentifiedImageError

    from model.images import to_rgb

    if len(data) > MAX_IMAGE_BYTES:
        raise RequestRefused(f"image: larger than {MAX_IMAGE_BYTES} bytes")
    too_large = RequestRefused(f"image: more than {MAX_IMAGE_PIXELS} pixels; send a smaller image")
    try:
        with warnings.catch_warnings():
            # our own limit decides; Pillow's warning threshold is a global we must not rely on
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise too_large
            image.load()
            return to_rgb(image)
    except Image.DecompressionBombError:
        raise too_large from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, IndexError):
        raise RequestRefused("image: not an image Pillow can read (PNG, JPEG, WebP, ...)") from None


def max_new_tokens(params: dict[str, Any] | None) -> int:
    """The `max_new_tokens` param, checked against `MAX_NEW_TOKENS` (RequestRefused when outside 1..max)."""
    value = (params or {}).get("max_new_tokens")
    if value is None:
        return DEFAULT_MAX_NEW_TOKENS
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_NEW_TOKENS:
        raise RequestRefused(f"max_new_tokens: must be an integer from 1 to {MAX_NEW_TOKENS}")
    return value


class HoVLEPyfunc(mlflow.pyfunc.PythonModel):
    """Answers a prompt about an image with the HoVLE model in the `hf_model` artifact."""

    def load_context(self, context) -> None:
        import torch

        from model import HoVLEProcessor, load_pretrained

        # a bad setting stops the server at start-up, not at the first request
        self.image_prefixes = image_prefixes(os.environ.get(IMAGE_PREFIXES_ENV, ""))
        folder = context.artifacts[HF_ARTIFACT]
        # HoVLE or the compositional baseline, by the folder's model_type
        self.model = load_pretrained(folder, dtype=torch.float32).eval()
        self.processor = HoVLEProcessor.from_pretrained(folder)

    # the hint is what MLflow hands over (its signature turns a list of dicts into a DataFrame); pandas'
    # types are hints MLflow infers no schema from, so it neither warns for a missing hint nor re-validates
    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None):
        try:
            rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
            if len(rows) > MAX_ROWS:
                raise RequestRefused(f"{len(rows)} rows; at most {MAX_ROWS} in one request")
            limit = max_new_tokens(params)
            answers = []
            for index, row in enumerate(rows):
                try:
                    answers.append(self._answer(row, limit))
                except RequestRefused as refused:
                    raise RequestRefused(f"row {index}: {refused.message}") from None
        except ServingError:
            raise
        except Exception:
            logger.exception("the model failed on a request")
            raise ModelFailed() from None
        return pd.DataFrame({"answer": answers})

    def _answer(self, row: dict[str, Any], limit: int) -> str:
        import torch

        from model.processor import ImagePlaceholderMismatch
        from model.tokenizer import IMG_CONTEXT, IMG_END, IMG_START

        prompt = row.get("prompt")
        prompt = "" if prompt is None or (isinstance(prompt, float) and prompt != prompt) else prompt
        if not isinstance(prompt, str):
            raise RequestRefused(f"prompt: expected text, got {type(prompt).__name__}")
        if any(token in prompt for token in (IMG_START, IMG_END, IMG_CONTEXT)):
            raise RequestRefused(
                f"prompt: holds a reserved image token ({IMG_START}, {IMG_CONTEXT}, {IMG_END})"
            )
        if (
            len(prompt) > MAX_PROMPT_CHARS
            or len(self.processor.tokenizer(prompt, add_special_tokens=False)["input_ids"])
            > MAX_PROMPT_TOKENS
        ):
            raise RequestRefused(
                f"prompt: more than {MAX_PROMPT_TOKENS} tokens (or {MAX_PROMPT_CHARS} characters)"
            )
        image = read_image(row.get("image_bytes"), self.image_prefixes) or read_image(
            row.get("image"), self.image_prefixes
        )
        content = f"<image>\n{prompt}" if image is not None and "<image>" not in prompt else prompt
        try:
            inputs = self.processor(
                [{"role": "user", "content": content}],
                images=[image] if image is not None else None,
                add_generation_prompt=True,
            )
        except ImagePlaceholderMismatch as err:
            raise RequestRefused(f"prompt: {err}") from None
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                pixel_values=inputs.get("pixel_values"),
                max_new_tokens=limit,
            )
        return self.processor.decode(out[0, inputs["input_ids"].shape[1] :]).strip()


set_model(HoVLEPyfunc())
