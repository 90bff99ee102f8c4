"""Tokenizers for HoVLE: the added image/grounding tokens, the ChatML template, and loaders.

A tokenizer comes from ``"byte"`` (a tiny deterministic byte-level tokenizer built in code, for tests and
smoke runs) or a local directory (optionally a ``gguf_file`` in it), and always goes through
:func:`prepare_tokenizer`: HoVLE's tokens added, the chat template set (HoVLE's ChatML by default, whose
``{% generation %}`` blocks give the assistant-token mask for labels; `model.chat_template` handles others).
"""

from __future__ import annotations

import logging
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

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


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """A deterministic byte-level tokenizer built in code, prepared (:func:`prepare_tokenizer`).

    Ids 0..255 are the bytes, then ``<|endoftext|>`` (pad/unk), ``<|im_start|>``, ``<|im_end|>`` (eos: a
    chat model stops at the end of its turn) and the 9 HoVLE tokens: 268 in all. No merges: any UTF-8
    string round-trips exactly through ``encode``/``decode(skip_special_tokens=False)``.
    """
    byte_chars = bytes_to_unicode()  # the byte-level BPE alphabet of tokenizers' ByteLevel
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
    """Make a tokenizer HoVLE-ready, in place (idempotent), and return it: adds :data:`HOVLE_SPECIAL_TOKENS`
    as extra special tokens (never split), pads with eos when there is no pad token (ValueError without
    either) and sets the chat template: ``"chatml"``, ``"own"`` or a ``.jinja`` path
    (`model.chat_template.resolve_chat_template`; ChatTemplateError when it cannot be met)."""
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
    """A tokenizer prepared by :func:`prepare_tokenizer`, never from the network: ``source`` is ``"byte"``
    (:func:`build_byte_tokenizer`), a local directory of tokenizer files (or holding the GGUF file
    ``gguf_file``) or a ``.gguf`` file's path. TokenizerSourceNotFound when the folder or file is missing."""
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
