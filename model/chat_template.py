"""Chat templates of any LLM family: which one to use, where an assistant turn ends, which tokens it owns.

`model.llm.chat_template` picks the template (:func:`resolve_chat_template`): ``chatml`` (HoVLE's own,
the default), ``own`` (the one the LLM's tokenizer ships) or the path of a ``.jinja`` file.

Labels need the assistant's tokens. A template with ``{% generation %}`` blocks (HoVLE's ChatML) marks them
itself. Most families' (Llama 3, Qwen, Mistral, Gemma) do not, so :func:`assistant_char_spans` renders the
conversation twice, once with each assistant turn's content swapped for one private-use character: the
texts differ exactly on that content. The labelled span is the content plus the end-of-turn marker right
after it, read off the template by :func:`analyse_template` (the run of added tokens after a probe
answer: `<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `</s>`; generation stops at its first token). Neither
the role header, what a template writes before the content (Qwen 3's empty think block), nor the glue
after the end-of-turn token is labelled: the model never writes the glue, the template does.

A template that refuses a system message (Gemma 1 and 2) gets the system text folded into the first user
turn after a blank line, as Gemma 3's own template does (:meth:`TemplateTurns.fold_system`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError

logger = logging.getLogger(__name__)

CHATML = "chatml"
OWN = "own"
GENERATION_BLOCK = "{% generation %}"
_PROBE_ANSWER = "HoVLE probe answer"
_STAND_IN = "\ue000"  # a private-use character: no real content starts or ends with it


class ChatTemplateError(ValueError):
    """`model.llm.chat_template` names no usable template; the message says which value was wrong."""


def resolve_chat_template(choice: str, chatml: str, own: Any = None) -> str:
    """The template text for `model.llm.chat_template` ``choice``: ``"chatml"`` (the text `chatml`),
    ``"own"`` (the tokenizer's `own`: a string, or named templates holding ``"default"``) or a ``.jinja``
    file's path. ChatTemplateError for ``"own"`` without a template, or a missing or non-``.jinja`` path."""
    if choice == CHATML:
        return chatml
    if choice == OWN:
        if isinstance(own, dict):
            own = own.get("default")
        if not isinstance(own, str) or not own.strip():
            raise ChatTemplateError(
                "model.llm.chat_template='own' but the tokenizer has no chat template of its own; use "
                "'chatml' or the path of a .jinja file"
            )
        return own
    path = Path(choice).expanduser()
    if path.suffix != ".jinja":
        raise ChatTemplateError(
            f"model.llm.chat_template={choice!r}: expected 'chatml', 'own' or the path of a .jinja file"
        )
    if not path.is_file():
        raise ChatTemplateError(f"model.llm.chat_template={choice!r}: no such file")
    return path.read_text(encoding="utf-8")


def render(tokenizer, template: str, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """The conversation as the template writes it (special tokens such as bos included as text)."""
    return tokenizer.apply_chat_template(
        messages, chat_template=template, add_generation_prompt=add_generation_prompt, tokenize=False
    )


@dataclass(frozen=True)
class TemplateTurns:
    """What HoVLE reads off a chat template once (see the module docstring).

    generation_blocks: the template marks assistant tokens with ``{% generation %}`` itself.
    end_of_turn: the text written right after an assistant's content that ends its turn (leading
        whitespace and a run of added tokens), "" when the template writes no added token there.
    end_of_turn_ids: the token ids of that run.
    system_role: the template accepts a system message.
    """

    generation_blocks: bool
    end_of_turn: str
    end_of_turn_ids: tuple[int, ...]
    system_role: bool

    def fold_system(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """The messages unchanged, or, for a template without a system role, the leading system message
        folded into the first user message as ``system + "\\n\\n" + user`` (an empty one dropped).

        Raises:
            ValueError: a system message that is not first, or one without a user message after it.
        """
        if self.system_role or not any(m["role"] == "system" for m in messages):
            return messages
        if messages[0]["role"] != "system" or any(m["role"] == "system" for m in messages[1:]):
            raise ValueError(
                "this chat template has no system role: only one system message, the first, can be folded "
                "into the first user turn"
            )
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise ValueError(
                "this chat template has no system role and the system message is not followed by a user "
                "message to fold it into"
            )
        if not messages[0]["content"].strip():  # nothing to fold
            return messages[1:]
        user = {**messages[1], "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
        return [user, *messages[2:]]


def analyse_template(tokenizer, template: str) -> TemplateTurns:
    """Read a template's end-of-turn marker and whether it takes a system message.

    Raises:
        ValueError: the template does not render an assistant's content, or (without generation blocks)
            writes no added token after it, so that neither labels nor a stop token can be found.
    """
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE_ANSWER}]
    text = render(tokenizer, template, probe, False)
    at = text.rfind(_PROBE_ANSWER)
    if at < 0:
        raise ValueError("the chat template does not write the assistant's message content")
    after = text[at + len(_PROBE_ANSWER) :]
    blank = len(after) - len(after.lstrip())
    added = set(tokenizer.added_tokens_decoder)
    encoded = tokenizer(after[blank:], add_special_tokens=False, return_offsets_mapping=True)
    run: list[int] = []
    end = blank
    for token, (_, stop) in zip(encoded["input_ids"], encoded["offset_mapping"]):
        if token not in added:
            break
        run.append(token)
        end = blank + stop
    generation_blocks = GENERATION_BLOCK in template.replace("{%-", "{%").replace("-%}", "%}")
    if not run and not generation_blocks:
        raise ValueError(
            f"the chat template writes {after[:20]!r} after an assistant's content, not an end-of-turn "
            "token, so HoVLE cannot tell where a turn ends; use a template whose turns end with a special "
            "token, or one with {% generation %} blocks"
        )
    try:
        render(
            tokenizer, template, [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}], True
        )
        system_role = True
    except TemplateError:
        system_role = False
    return TemplateTurns(generation_blocks, after[:end] if run else "", tuple(run), system_role)


def assistant_char_spans(
    tokenizer,
    template: str,
    messages: list[dict[str, str]],
    add_generation_prompt: bool,
    turns: TemplateTurns,
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of each assistant turn's content + end of turn.

    Raises:
        ValueError: the template changes more than the content when the content changes, or writes no
            end-of-turn marker right after an assistant's content.
    """
    text = render(tokenizer, template, messages, add_generation_prompt)
    spans: list[tuple[int, int]] = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        swapped = [*messages[:index], {**message, "content": _STAND_IN}, *messages[index + 1 :]]
        other = render(tokenizer, template, swapped, add_generation_prompt)
        start = _common_prefix(text, other)
        tail = _common_prefix(text[start:][::-1], other[start:][::-1])
        end = len(text) - tail
        if other[start : len(other) - tail] != _STAND_IN:
            raise ValueError(
                f"message {index}: the chat template renders more than the assistant's content differently "
                "when the content changes, so its tokens cannot be found; use 'chatml' or a template with "
                "{% generation %} blocks"
            )
        if not text.startswith(turns.end_of_turn, end):
            raise ValueError(
                f"message {index}: the chat template writes {text[end : end + 20]!r} after the assistant's "
                f"content instead of its end-of-turn marker {turns.end_of_turn!r}"
            )
        spans.append((start, end + len(turns.end_of_turn)))
    return text, spans


def _common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix (a binary search over slice comparisons, which run in C)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def token_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Per token (its character offsets), whether it overlaps one of `spans`."""
    return [any(a < end and b > start for start, end in spans) for a, b in offsets]


__all__ = [
    "CHATML",
    "OWN",
    "ChatTemplateError",
    "TemplateTurns",
    "analyse_template",
    "assistant_char_spans",
    "render",
    "resolve_chat_template",
    "token_mask",
]
