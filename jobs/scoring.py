"""Scoring held-out answers: pure functions over text, no model and no I/O.

normalize_answer(" Three. ") -> "3"          what exact match compares
RecordResult                                 one answered record
vqa_metrics(results, skipped)                vqa_accuracy overall and per skill, counts
"""

from __future__ import annotations

import string
from dataclasses import dataclass

NUMBER_WORDS = {
    word: str(n) for n, word in enumerate("zero one two three four five six seven eight nine ten".split())
}


def normalize_answer(text: str) -> str:
    """`text` lowercased, surrounding whitespace and punctuation stripped, spaces collapsed, number words
    "zero".."ten" as digits: " Three. " -> "3"."""
    words = text.lower().strip(string.punctuation + string.whitespace).split()
    return " ".join(NUMBER_WORDS.get(word, word) for word in words)


def answers_match(given: str, expected: str) -> bool:
    """Normalised exact match (model output is untrusted text: nothing is evaluated, only compared)."""
    return normalize_answer(given) == normalize_answer(expected)


@dataclass
class RecordResult:
    """One evaluated record; `given` is model output (untrusted text)."""

    id: str
    skill: str | None
    question: str
    expected: str
    given: str
    correct: bool


def accuracy(results: list[RecordResult]) -> float:
    return sum(r.correct for r in results) / len(results) if results else 0.0


def vqa_metrics(results: list[RecordResult], skipped: int = 0) -> dict[str, float]:
    """`vqa_accuracy`, `vqa_accuracy/<skill>` for each skill present, `vqa_samples`, `vqa_skipped`."""
    metrics = {"vqa_accuracy": accuracy(results)}
    for skill in sorted({r.skill for r in results if r.skill}):
        metrics[f"vqa_accuracy/{skill}"] = accuracy([r for r in results if r.skill == skill])
    return {**metrics, "vqa_samples": float(len(results)), "vqa_skipped": float(skipped)}
