"""Tokenizers for HoVLE: the added image/grounding tokens, the ChatML template, and loaders.

Two sources are supported:

* ``"byte"``: a tiny deterministic byte-level tokenizer built in code (no files, no training). It is meant
  for tests and smoke runs: it round-trips any UTF-8 text and has every token HoVLE needs.
* a local directory (optionally with a ``gguf_file`` inside it) loaded with ``AutoTokenizer``.

Every tokenizer goes through :func:`prepare_tokenizer`, which adds the HoVLE tokens and sets the chat
template: HoVLE's ChatML by default, whose ``{% generation %}`` blocks let transformers return the
assistant-token mask used for labels, or the tokenizer's own or a ``.jinja`` file's
(`model.llm.chat_template`; `model.chat_template` finds the labels and the end of turn of any of them).
"""

from __future__ import annotations

import logging
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from model.chat_template import CHATML, resolve_chat_template

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"

# The 9 tokens HoVLE adds to its LLM's vocabulary (92544 + 9 = 92553 for InternLM2).
HOVLE_SPECIAL_TOKENS: tuple[str, ...] = (
    IMG_START,
    IMG_END,
    IMG_CONTEXT,
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
)

# ChatML. The assistant's content and its closing <|im_end|> sit inside {% generation %} so that
# `apply_chat_template(..., return_assistant_tokens_mask=True)` marks exactly the supervised tokens; the
# newline after <|im_end|> is template glue and stays unsupervised.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\n' }}"
    "{%- generation -%}{{ message['content'] + '<|im_end|>' }}{%- endgeneration -%}"
    "{{ '\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

BYTE_TOKENIZER_SOURCE = "byte"


class TokenizerSourceNotFound(FileNotFoundError):
    """Raised when a tokenizer source is neither ``"byte"`` nor an existing local path."""


def _byte_to_unicode() -> dict[int, str]:
    """Map each byte 0..255 to a printable unicode character (the byte-level BPE alphabet).

    Printable Latin-1 bytes keep their own character; the remaining bytes (controls, space, ...) are
    shifted to code points 256 and up, in byte order. This is the alphabet the ``ByteLevel``
    pre-tokenizer and decoder of the ``tokenizers`` library use.
    """
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    mapping: dict[int, str] = {}
    next_free = 256
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(next_free)
            next_free += 1
    return mapping


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """Build a deterministic byte-level tokenizer in code: 256 byte tokens plus the chat/HoVLE specials.

    Ids 0..255 are the bytes in order, then ``<|endoftext|>`` (pad/unk), ``<|im_start|>``,
    ``<|im_end|>`` (eos: a chat model stops at the end of its turn) and the 9 HoVLE tokens: 268 in all.
    There are no merges, so every byte of ordinary text is one token and any UTF-8 string round-trips
    exactly through ``encode``/``decode(skip_special_tokens=False)``.

    Returns:
        A prepared ``PreTrainedTokenizerFast`` (see :func:`prepare_tokenizer`).
    """
    byte_chars = _byte_to_unicode()
    vocab = {byte_chars[byte]: byte for byte in range(256)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    # No prefix space and no post-processing: the text is encoded exactly as given.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([ENDOFTEXT, IM_START, IM_END, *HOVLE_SPECIAL_TOKENS])

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=ENDOFTEXT,
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 30,
    )
    return prepare_tokenizer(tokenizer)


def prepare_tokenizer(
    tokenizer: PreTrainedTokenizerFast, chat_template: str = CHATML
) -> PreTrainedTokenizerFast:
    """Make a tokenizer HoVLE-ready, in place; calling it again changes nothing.

    Adds :data:`HOVLE_SPECIAL_TOKENS` as extra special tokens (never split by the tokenizer), falls back
    to the eos token for padding when there is no pad token, and sets ``chat_template``.

    Args:
        chat_template: ``"chatml"`` (:data:`CHATML_TEMPLATE`), ``"own"`` (keep the tokenizer's own) or
            the path of a ``.jinja`` file (see `model.chat_template.resolve_chat_template`).

    Returns:
        The same tokenizer object.

    Raises:
        ValueError: if the tokenizer has neither a pad nor an eos token to pad with.
        model.chat_template.ChatTemplateError: the template choice cannot be met.
    """
    missing = [token for token in HOVLE_SPECIAL_TOKENS if token not in tokenizer.extra_special_tokens]
    if missing:
        added = tokenizer.add_special_tokens(
            {"extra_special_tokens": missing}, replace_extra_special_tokens=False
        )
        if added:
            logger.info(
                "added %d HoVLE special tokens to the tokenizer (vocab now %d)", added, len(tokenizer)
            )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                "the tokenizer has neither a pad token nor an eos token; set tokenizer.pad_token before "
                "calling prepare_tokenizer"
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = resolve_chat_template(chat_template, CHATML_TEMPLATE, tokenizer.chat_template)
    return tokenizer


def load_tokenizer(
    source: str, gguf_file: str | None = None, chat_template: str = CHATML
) -> PreTrainedTokenizerFast:
    """Load and prepare a tokenizer from ``"byte"`` or a local path; never touches the network.

    Args:
        source: ``"byte"`` for :func:`build_byte_tokenizer`, a local directory holding tokenizer files
            (or a GGUF file named by ``gguf_file``), or the path of a ``.gguf`` file itself.
        gguf_file: name of a GGUF file inside ``source`` to read the tokenizer from.
        chat_template: ``"chatml"``, ``"own"`` or a ``.jinja`` path (see :func:`prepare_tokenizer`).

    Returns:
        A tokenizer prepared by :func:`prepare_tokenizer`.

    Raises:
        TokenizerSourceNotFound: if the directory or the GGUF file does not exist.
    """
    if source == BYTE_TOKENIZER_SOURCE:
        return prepare_tokenizer(build_byte_tokenizer(), chat_template)
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf" and gguf_file is None:
        path, gguf_file = path.parent, path.name
    if not path.is_dir():
        raise TokenizerSourceNotFound(
            f"tokenizer source {source!r} is not an existing local directory; pass 'byte' for the built-in "
            "byte tokenizer, a directory with tokenizer files, or a directory plus gguf_file"
        )
    if gguf_file is not None and not (path / gguf_file).is_file():
        raise TokenizerSourceNotFound(
            f"GGUF file {gguf_file!r} not found in {str(path)!r}; pass the name of a .gguf file inside the "
            "directory as gguf_file"
        )
    # deferred: AutoTokenizer imports torch, which processes that only tokenize never load
    from transformers import AutoTokenizer

    from model import gguf_cache

    if gguf_file is not None:
        return prepare_tokenizer(gguf_cache.tokenizer(str(path), gguf_file), chat_template)
    return prepare_tokenizer(AutoTokenizer.from_pretrained(str(path), local_files_only=True), chat_template)
