"""Language preservation: does a trained model still answer general text-only questions as its LLM did?

HoVLE's promise is that learning vision does not cost the LLM its language. It is measured here on
general questions with written answer keys (`pipelines/data/language_eval.jsonl`, never trained on),
asked text-only to the model and to the base (the untrained preset: its LLM behind an identity
embedding module, or any model URI):

    text_accuracy        share of the questions the model answers right (a key appears in its answer)
    base_text_accuracy   the same for the base
    text_retained        of the questions the base answers right, the share the model still answers right
                         (the gate's language check; 1.0 = nothing lost)
    text_agreement       share of answers equal to the base's, after normalisation
    answer_ppl_ratio     perplexity of the base's own answers under the model / under the base (1.0 =
                         unchanged; a model that lost its language finds its base's answers unlikely)

Never the perplexity of the training domain's own text: it improves as the LLM is overwritten by it.

The base is a `BaseReference`: loaded only when needed. When it is a preset whose LLM weights are files on
disk (`preset:smollm2-135m`), its answers and likelihoods are deterministic (greedy decoding of fixed
weights), so they are kept under ``$HOVLE_CACHE_DIR/language``, keyed by the preset file, the weight files
(path, size, modification time), the model package's source, the torch and transformers versions and the
exact inputs: every evaluation after the first skips loading the base and ~2 minutes of its generation.

`python -m jobs.language write-chat` writes `pipelines/data/general_chat.jsonl` (the base's answers to the
training prompts of `pipelines.general_text`), once; its output is committed data.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers

from jobs.logging_setup import setup_logging
from jobs.models import PRESET_SCHEME, Loaded, generate_answers, perplexity, resolve_model, token_nll
from jobs.scoring import NUMBER_WORDS
from model import HoVLEForConditionalGeneration, HoVLEProcessor
from pipelines import storage
from pipelines.general_text import CHAT_FILE, SKILL, KeyedQuestion, general_prompts, language_eval_questions

logger = logging.getLogger(__name__)

ANSWER_TOKENS = 48  # enough for a small LLM's one-sentence answer, where the key may come late
BATCH = 8


def answer_words(text: str) -> list[str]:
    """Lowercase words of `text` (punctuation splits words), number words "zero".."ten" as digits."""
    return [NUMBER_WORDS.get(word, word) for word in re.findall(r"[a-z0-9]+", text.lower())]


def answers_key(answer: str, keys: tuple[str, ...]) -> bool:
    """True when one of `keys` appears in `answer` as whole words: "It is Paris." matches ("paris",);
    "12" does not match ("2",)."""
    words = answer_words(answer)
    for key in map(answer_words, keys):
        if key and any(words[i : i + len(key)] == key for i in range(len(words) - len(key) + 1)):
            return True
    return False


def ask(
    model: HoVLEForConditionalGeneration,
    processor: HoVLEProcessor,
    questions: list[str],
    max_new_tokens: int = ANSWER_TOKENS,
    batch_size: int = BATCH,
) -> list[str]:
    """Greedy text-only answers to `questions`, in batches."""
    answers: list[str] = []
    for start in range(0, len(questions), batch_size):
        chats = [([{"role": "user", "content": q}], []) for q in questions[start : start + batch_size]]
        answers += generate_answers(model, processor, chats, max_new_tokens)
    return answers


def answer_nll(
    model: HoVLEForConditionalGeneration, processor: HoVLEProcessor, pairs: list[tuple[str, str]]
) -> float:
    """Mean negative log-likelihood per answer token of the (question, answer) pairs, the answer as the
    assistant's turn (its closing <|im_end|> included)."""
    chats = ([{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in pairs)
    total, tokens = token_nll(model, ((x["input_ids"], x["labels"]) for x in map(processor, chats)))
    return total / tokens if tokens else float("nan")


# ---- the base, its answers cached when its weights are known ----------------------------------------

_CACHE_FORMAT = 1  # bump when what an entry holds changes


class BaseReference:
    """The model a trained one is compared against: loaded on first use, its results cached on disk under
    `key` (None: never cached, e.g. a model held in memory or one whose weights cannot be fingerprinted)."""

    def __init__(self, load: Callable[[], Loaded], key: str | None = None, name: str = "base") -> None:
        self._load, self._loaded, self.key, self.name = load, None, key, name

    @classmethod
    def of(cls, model: HoVLEForConditionalGeneration, processor: HoVLEProcessor) -> BaseReference:
        """A base already in memory (no cache)."""
        return cls(lambda: (model, processor), None, "in-memory model")

    @classmethod
    def from_uri(cls, uri: str, tracking_uri: str | None = None, device: str = "cpu") -> BaseReference:
        """The base at `uri` (anything `jobs.models.resolve_model` takes); cached when it is a preset whose
        LLM weights are files on disk."""

        def load() -> Loaded:
            model, processor = resolve_model(uri, tracking_uri)
            return model.to(device), processor

        key = preset_fingerprint(uri.removeprefix(PRESET_SCHEME)) if uri.startswith(PRESET_SCHEME) else None
        return cls(load, key and f"{key}-{device}", uri)

    @property
    def is_loaded(self) -> bool:
        return self._loaded is not None

    def loaded(self) -> Loaded:
        if self._loaded is None:
            logger.info("loading the base %s", self.name)
            self._loaded = self._load()
        return self._loaded

    def answers(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        return self._cached(
            ["answers", prompts, max_new_tokens], lambda: ask(*self.loaded(), prompts, max_new_tokens)
        )

    def answer_nll(self, pairs: list[tuple[str, str]]) -> float:
        return self._cached(["answer_nll", pairs], lambda: answer_nll(*self.loaded(), pairs))

    def perplexity(self, texts: list[str]) -> float:
        return self._cached(["perplexity", texts], lambda: perplexity(*self.loaded(), texts))

    def _cached(self, inputs: list[Any], compute: Callable[[], Any]) -> Any:
        from model.gguf_cache import cache_root

        path, root = None, cache_root()
        if self.key is not None and root is not None:
            digest = hashlib.sha256(json.dumps(inputs).encode("utf-8")).hexdigest()[:16]
            path = root / "language" / self.key / f"{inputs[0]}-{digest}.json"
        if path is not None and path.is_file():
            logger.info("the base's %s from the cache (%s)", inputs[0], path.name)
            return json.loads(path.read_text(encoding="utf-8"))["value"]
        value = compute()
        if path is not None:  # whole or not at all; a cache that cannot be written is skipped
            try:
                document = {"base": self.name, "what": inputs[0], "value": value}
                storage.write_text_atomic(str(path), json.dumps(document, ensure_ascii=False))
            except OSError as err:
                logger.warning("cannot write the cache entry %s: %s", path, err)
        return value


def preset_fingerprint(preset: str) -> str | None:
    """A key for the untrained preset's model, or None when it cannot be fingerprinted (no weight files:
    a randomly initialised LLM) or the cache is off."""
    from model.config_files import read_run_document
    from model.gguf_cache import cache_root
    from model.presets import resolve_path

    if cache_root() is None:
        return None
    try:
        document, path = read_run_document(preset)
        spec = document.get("model") or {}
        llm = spec.get("llm") or {}
        if not llm.get("path"):
            return None
        weights = Path(resolve_path(llm["path"]))
    except (OSError, ValueError):
        return None
    files = [weights / llm["gguf_file"]] if llm.get("gguf_file") else sorted(weights.rglob("*"))
    source = Path(__file__).resolve().parents[1] / "model"
    digest = hashlib.sha256()
    parts = [_CACHE_FORMAT, spec, torch.__version__, transformers.__version__]  # the model section only
    parts += [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()]
    parts += [[f.name, f.read_text()] for f in sorted(source.glob("*.py"))]
    digest.update(json.dumps(parts).encode("utf-8"))
    return f"{path.stem}-{digest.hexdigest()[:16]}"


def language_preservation(
    model: HoVLEForConditionalGeneration,
    processor: HoVLEProcessor,
    base: BaseReference,
    questions: list[KeyedQuestion] | None = None,
    max_new_tokens: int = ANSWER_TOKENS,
) -> tuple[dict[str, float], list[dict]]:
    """(metrics, per-question records) of `model` against `base` on the keyed general questions (default:
    the package's evaluation set). See the module docstring for the metrics."""
    questions = questions if questions is not None else language_eval_questions()
    prompts = [q.question for q in questions]
    theirs = base.answers(prompts, max_new_tokens)
    ours = ask(model, processor, prompts, max_new_tokens)
    records = []
    for q, answer, base_answer in zip(questions, ours, theirs, strict=True):
        records.append(
            {
                "id": q.id, "question": q.question, "keys": list(q.keys), "answer": answer,
                "base_answer": base_answer, "correct": answers_key(answer, q.keys),
                "base_correct": answers_key(base_answer, q.keys),
            }
        )  # fmt: skip
    base_right = [r for r in records if r["base_correct"]]
    pairs = [(q.question, a) for q, a in zip(questions, theirs, strict=True) if a.strip()]
    nll, base_nll = answer_nll(model, processor, pairs), base.answer_nll(pairs)
    metrics = {
        "text_accuracy": sum(r["correct"] for r in records) / len(records),
        "base_text_accuracy": len(base_right) / len(records),
        # undefined (nan) when the base answers nothing right: then nothing can be said to be kept
        "text_retained": sum(r["correct"] for r in base_right) / len(base_right) if base_right else math.nan,
        "text_agreement": sum(answer_words(r["answer"]) == answer_words(r["base_answer"]) for r in records)
        / len(records),
        "answer_ppl_ratio": math.exp(min(nll - base_nll, 50.0)),
        "text_questions": float(len(records)),
    }
    logger.info(
        "language: %d/%d base-right questions kept (text_retained %.3f), agreement %.3f, answer ppl %.3f",
        sum(r["correct"] for r in base_right), len(base_right), metrics["text_retained"],
        metrics["text_agreement"], metrics["answer_ppl_ratio"],
    )  # fmt: skip
    return metrics, records


def preservation(
    model: HoVLEForConditionalGeneration,
    processor: HoVLEProcessor,
    base,
    texts: list[str] | None = None,
    questions: list | None = None,
) -> tuple[dict[str, float], list[dict]]:
    """`language_preservation`'s (metrics, records), and with `texts` also `text_ppl`, `base_text_ppl` and
    `ppl_ratio` (text_ppl / base_text_ppl on held-out text: reported, never gated).

    Raises:
        ValueError: `texts` hold no text of two or more tokens.
    """
    metrics, records = language_preservation(model, processor, base, questions)
    if texts:
        ppl, base_ppl = perplexity(model, processor, texts), base.perplexity(texts)
        metrics.update(text_ppl=ppl, base_text_ppl=base_ppl, ppl_ratio=ppl / base_ppl)
    else:
        logger.info("no held-out text given: perplexity against the base is not measured")
    return metrics, records


# ---- writing the training conversations (once; the output is committed) --------------------------------


def write_chat(preset: str, output: Path, max_new_tokens: int) -> int:
    """Answer `general_prompts()` with the preset's untrained model (its LLM) and write the finished answers
    as conversation JSONL to `output`; returns how many were kept (an answer cut at `max_new_tokens` is
    dropped: trained on, it would teach the model to stop mid-sentence)."""
    from model import build_model, build_processor, load_preset

    config = load_preset(preset)
    model, processor = build_model(config).eval(), build_processor(config)
    prompts = general_prompts()
    limit = max_new_tokens + 1  # one token more: an answer that needs it was cut
    answers = ask(model, processor, prompts, limit)
    kept = []
    for n, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        length = len(processor.tokenizer(answer, add_special_tokens=False)["input_ids"])
        if not answer.strip() or length >= limit:
            logger.info("dropping prompt %d (%s): answer empty or cut", n, prompt)
            continue
        kept.append(
            {
                "id": f"general-{n:03d}", "skill": SKILL, "answer": answer,
                "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}],
                "meta": {"answered_by": preset, "greedy": True},
            }
        )  # fmt: skip
    output.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")
    return len(kept)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.language", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    write = sub.add_parser("write-chat", help="answer the general training prompts with the base LLM")
    write.add_argument("--preset", default="smollm2-135m")
    write.add_argument(
        "--output", type=Path, default=Path(__file__).parents[1] / "pipelines" / "data" / CHAT_FILE
    )
    write.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    setup_logging()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    kept = write_chat(args.preset, args.output, args.max_new_tokens)
    print(json.dumps({"kept": kept, "prompts": len(general_prompts()), "output": str(args.output)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
