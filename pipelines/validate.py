"""Validation: is a raw record's image an image, is its conversation a conversation? The reject reasons.

    decode_image(data, max_pixels)       image bytes -> an upright RGB image, or RejectedSample
    load_image(ref, data, root, ...)     a record's image (its bytes, or a path inside its root) -> the same
    parse_conversation(turns, n_images)  LLaVA-style turns -> chat messages, or RejectedSample

Training (`pipelines.preprocess`) and evaluation (`jobs.evaluate`) read records with these, so a record
means the same to both. Every refusal is a `RejectedSample` with a reason of `schema.REJECT_REASONS`.
"""

from __future__ import annotations

import io
import logging
import warnings
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from model.images import to_rgb
from model.tokenizer import IMAGE_PLACEHOLDER, IMG_CONTEXT, IMG_END, IMG_START
from pipelines import storage
from pipelines.ids import UnsafePath, safe_resolve
from pipelines.schema import REJECT_REASONS

logger = logging.getLogger(__name__)

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

# Signatures of the formats Pillow reads: bytes that start like an image but fail to open are corrupt
# images, anything else is not an image at all.
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


class RejectedSample(Exception):
    """A record that cannot become a training sample; `reason` is a key of schema.REJECT_REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown reject reason {reason!r}; add it to schema.REJECT_REASONS")
        self.reason = reason
        self.detail = detail or REJECT_REASONS[reason]
        super().__init__(f"{reason}: {self.detail}")


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Validate and decode image bytes into an upright 8-bit RGB image.

    The declared size is checked against `max_pixels` from the header, before any pixel is decoded.
    EXIF orientation is applied; CMYK, 16-bit, palette, alpha and greyscale images become RGB
    (`model.images.to_rgb`: transparency over white).

    Raises:
        RejectedSample: empty_file, not_an_image, corrupt_image, truncated_image or decompression_bomb.
    """
    if not data:
        raise RejectedSample("empty_file")
    try:
        with warnings.catch_warnings():
            # our own limit decides; Pillow's warning threshold is a global we must not rely on
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise RejectedSample("decompression_bomb", str(err)) from err
    except UnidentifiedImageError as err:
        reason = "corrupt_image" if data.startswith(_IMAGE_MAGIC) or _is_webp(data) else "not_an_image"
        raise RejectedSample(reason, "Pillow cannot identify the image data") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise RejectedSample("corrupt_image", f"{type(err).__name__}: {err}") from err
    width, height = image.size
    if width * height > max_pixels:
        raise RejectedSample(
            "decompression_bomb",
            f"{width}x{height} = {width * height} pixels > max_image_pixels {max_pixels}",
        )
    if width <= 0 or height <= 0:
        raise RejectedSample("corrupt_image", f"declared size {width}x{height}")
    image_format = image.format
    try:
        image.load()
    except Image.DecompressionBombError as err:
        raise RejectedSample("decompression_bomb", str(err)) from err
    except OSError as err:
        reason = (
            "truncated_image" if "truncated" in str(err) and "image file" in str(err) else "corrupt_image"
        )
        raise RejectedSample(reason, f"{type(err).__name__}: {err}") from err
    except (SyntaxError, ValueError, EOFError, IndexError) as err:
        raise RejectedSample("corrupt_image", f"{type(err).__name__}: {err}") from err
    if _missing_end_marker(image_format, data):
        raise RejectedSample("truncated_image", f"the {image_format} data stops before its end marker")
    try:
        image = ImageOps.exif_transpose(image)
    except (OSError, ValueError, KeyError, TypeError, SyntaxError) as err:
        logger.warning("ignoring unreadable EXIF orientation (%s); keeping the image as stored", err)
    try:
        return to_rgb(image)
    except (ValueError, OSError) as err:
        raise RejectedSample("corrupt_image", f"cannot convert mode {image.mode} to RGB: {err}") from err


def load_image(
    ref: str | None, data: bytes | None, root: str, max_bytes: int, max_pixels: int, index: int = 0
) -> tuple[Image.Image, bytes]:
    """(decoded RGB image, original bytes) of a record's image: `data` itself, or the file `ref` names,
    resolved inside `root` and read only if it is a regular file of at most `max_bytes`."""
    if ref and not data:
        try:
            uri = safe_resolve(root, ref)
        except UnsafePath as err:
            raise RejectedSample("unsafe_path", str(err)) from err
        try:
            data = storage.read_bytes(uri, limit=max_bytes)
        except FileNotFoundError as err:
            raise RejectedSample("missing_image", f"{ref} not found under {root}") from err
        except storage.NotRegularFile as err:  # a FIFO would block the reader forever, a device never end
            raise RejectedSample("not_a_file", f"{ref} is not a regular file") from err
        except storage.FileTooLarge as err:
            raise RejectedSample("file_too_large", f"{ref}: {err} (max_file_bytes)") from err
        except PermissionError as err:
            raise RejectedSample("unreadable_file", f"{ref}: {err}") from err
    try:
        return decode_image(data, max_pixels), data
    except RejectedSample as rejected:
        raise RejectedSample(rejected.reason, f"{ref or f'image {index}'}: {rejected.detail}") from None


def _is_webp(data: bytes) -> bool:
    return data[:4] == b"RIFF" and data[8:12] == b"WEBP"


def _missing_end_marker(image_format: str | None, data: bytes) -> bool:
    """A JPEG without its EOI marker or a PNG without IEND was cut off, even where Pillow decodes it."""
    if image_format == "JPEG":
        return data.rfind(b"\xff\xd9") < 0
    if image_format == "PNG":
        return data.rfind(b"IEND") < 0
    return False


def check_text(text: str, where: str) -> None:
    """Refuse text holding a reserved image token (the model scatters image features into those slots)."""
    for token in (IMG_START, IMG_END, IMG_CONTEXT):
        if token in text:
            raise RejectedSample("invalid_record", f"{where} contains the reserved image token {token}")


def parse_conversation(turns: Any, num_images: int) -> list[dict[str, str]]:
    """Chat messages (role user/assistant/system) from LLaVA-style turns (`from`/`value` or `role`/`content`)
    with exactly one `<image>` per image: a single image left implicit goes before the first question, as
    LLaVA data often leaves it and InternVL places it. Training and evaluation read conversations with this.

    Raises:
        RejectedSample: not a list of turns, an unknown role, an empty turn, a reserved image token in the
            text, or a placeholder count that differs from the image count.
    """
    if not isinstance(turns, list) or not turns:
        raise RejectedSample("invalid_record", "'conversations' must be a non-empty list of turns")
    messages = []
    for index, turn in enumerate(turns):
        role = turn.get("from", turn.get("role")) if isinstance(turn, dict) else None
        content = turn.get("value", turn.get("content")) if isinstance(turn, dict) else None
        if not isinstance(role, str) or not isinstance(content, str):
            raise RejectedSample("invalid_record", f"turn {index} needs string 'from' and 'value'")
        if role.strip().lower() not in ROLES:
            raise RejectedSample("unknown_role", f"turn {index} has role {role!r}")
        if not content.strip():
            raise RejectedSample("empty_turn", f"turn {index} ({role}) has no text")
        check_text(content, f"turn {index}")
        messages.append({"role": ROLES[role.strip().lower()], "content": content})

    placeholders = sum(message["content"].count(IMAGE_PLACEHOLDER) for message in messages)
    if num_images == 1 and placeholders == 0:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise RejectedSample("image_count_mismatch", "one image but no human turn to place it in")
        first_user["content"] = f"{IMAGE_PLACEHOLDER}\n{first_user['content']}"
    elif placeholders != num_images:
        raise RejectedSample(
            "image_count_mismatch",
            f"{placeholders} {IMAGE_PLACEHOLDER} placeholder(s) for {num_images} image(s)",
        )
    return messages
