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

`python -m jobs.language write-chat` writes `pipelines/data/general_chat.jsonl` (the base's answers to the
training prompts of `pipelines.general_text`), once; its output is committed data.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from pathlib import Path

import torch

from jobs.evaluate import NUMBER_WORDS, generate_answers
from jobs.logging_setup import setup_logging
from model import HoVLEForConditionalGeneration, HoVLEProcessor
from pipelines.general_text import CHAT_FILE, SKILL, KeyedQuestion, general_prompts, language_eval_questions

logger = logging.getLogger(__name__)

ANSWER_TOKENS = 48  # enough for a small LLM's one-sentence answer, where the key may come late
BATCH = 8


def answer_words(text: str) -> list[str]:
    """Lowercase words of `text` (punctuation splits words), number words "zero".."ten" as digits."""
    return [NUMBER_WORDS.get(word, word) for word in re.findall(r"[a-z0-9]+", text.lower())]


def _same(answer: str, other: str) -> bool:
    return answer_words(answer) == answer_words(other)


def answers_key(answer: str, keys: tuple[str, ...]) -> bool:
    """True when one of `keys` appears in `answer` as whole words: "It is Paris." matches ("paris",);
    "12" does not match ("2",)."""
    words = answer_words(answer)
    for key in keys:
        wanted = answer_words(key)
        span = len(wanted)
        if span and any(words[i : i + span] == wanted for i in range(len(words) - span + 1)):
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


@torch.inference_mode()
def answer_nll(
    model: HoVLEForConditionalGeneration, processor: HoVLEProcessor, pairs: list[tuple[str, str]]
) -> float:
    """Mean negative log-likelihood per answer token of the (question, answer) pairs, the answer as the
    assistant's turn (its closing <|im_end|> included)."""
    total, tokens = 0.0, 0
    for question, answer in pairs:
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        inputs = processor(messages)
        labels = inputs["labels"].to(model.device)
        count = int((labels[:, 1:] != -100).sum())
        if not count:
            continue
        ids = inputs["input_ids"].to(model.device)
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        total += loss.item() * count
        tokens += count
    return total / tokens if tokens else float("nan")


def language_preservation(
    model: HoVLEForConditionalGeneration,
    processor: HoVLEProcessor,
    base: HoVLEForConditionalGeneration,
    base_processor: HoVLEProcessor,
    questions: list[KeyedQuestion] | None = None,
    max_new_tokens: int = ANSWER_TOKENS,
) -> tuple[dict[str, float], list[dict]]:
    """(metrics, per-question records) of `model` against `base` on the keyed general questions (default:
    the package's evaluation set). See the module docstring for the metrics."""
    questions = questions if questions is not None else language_eval_questions()
    prompts = [q.question for q in questions]
    theirs = ask(base, base_processor, prompts, max_new_tokens)
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
    nll, base_nll = answer_nll(model, processor, pairs), answer_nll(base, base_processor, pairs)
    metrics = {
        "text_accuracy": sum(r["correct"] for r in records) / len(records),
        "base_text_accuracy": len(base_right) / len(records),
        # undefined (nan) when the base answers nothing right: then nothing can be said to be kept
        "text_retained": sum(r["correct"] for r in base_right) / len(base_right) if base_right else math.nan,
        "text_agreement": sum(_same(r["answer"], r["base_answer"]) for r in records) / len(records),
        "answer_ppl_ratio": math.exp(min(nll - base_nll, 50.0)),
        "text_questions": float(len(records)),
    }
    logger.info(
        "language: %d/%d base-right questions kept (text_retained %.3f), agreement %.3f, answer ppl %.3f",
        sum(r["correct"] for r in base_right), len(base_right), metrics["text_retained"],
        metrics["text_agreement"], metrics["answer_ppl_ratio"],
    )  # fmt: skip
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
