"""General text-only conversations: what keeps a trained model's language, and what measures it.

Two package files, disjoint by construction (`tests/test_language.py` checks it):
- `data/general_chat.jsonl`: general text-only prompts (`general_prompts()`) with the answers the base LLM
  itself gave them, greedy (written once by `python -m jobs.language write-chat`, since the base writes
  ~15 tokens/s on 2 CPU cores, and kept as data: nothing is downloaded). Mixed into the align and instruct
  corpora, they train the model to keep answering ordinary questions the way its LLM did.
- `data/language_eval.jsonl`: general questions with written answer keys (`{"id", "question", "keys"}`),
  only ever asked at evaluation (jobs/language.py): a model that kept its LLM's language answers the ones
  the base answers right.

    write_general_chat(output_dir, n=None) -> output_dir/data.jsonl  (conversation JSONL for `hovle prepare`)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

CHAT_FILE = "general_chat.jsonl"
EVAL_FILE = "language_eval.jsonl"
SKILL = "general_text"

# Topics, words and tasks of the training prompts; none of them is an evaluation question's subject.
_ANIMALS = (
    "elephants", "dolphins", "owls", "penguins", "octopuses", "kangaroos", "giraffes", "turtles", "wolves",
    "parrots", "foxes", "horses", "rabbits", "frogs", "camels", "koalas", "zebras", "sharks",
)  # fmt: skip
_CONCEPTS = (
    "gravity", "a volcano", "an island", "a rainbow", "friction", "an atom", "a glacier", "a vaccine",
    "recycling", "a library", "a calendar", "electricity", "a thermometer", "an earthquake", "a compass",
    "a telescope", "erosion", "a democracy", "a budget", "a recipe", "a museum", "a habit", "a map",
    "a battery", "a bridge", "a newspaper",
)  # fmt: skip
_WORDS = (
    "bright", "quickly", "journey", "gentle", "curious", "harvest", "whisper", "ancient", "balance",
    "courage", "lantern", "meadow", "puzzle", "silent", "thunder", "voyage", "wander", "breeze",
)  # fmt: skip
_GOALS = (
    "stay healthy", "learn a new language", "save money", "sleep better", "make new friends",
    "keep a room tidy", "study for an exam", "start running", "reduce stress", "cook a simple dinner",
    "remember names", "write a good letter", "plan a trip", "grow tomatoes", "focus at work",
    "prepare for a job interview",
)  # fmt: skip
_CATEGORIES = (
    "vegetables", "sports", "flowers", "board games", "kitchen tools", "winter clothes", "farm animals",
    "hobbies", "breakfast foods", "types of trees", "things found in a classroom", "means of transport",
)  # fmt: skip
_PLACES = (
    "kitchen", "garden", "park", "office", "beach", "hospital", "bakery", "train station", "school",
    "supermarket", "zoo", "playground",
)  # fmt: skip
_PETS = ("dog", "cat", "hamster", "goldfish", "parrot", "tortoise")
_CHATS = (
    "Hello! How are you today?", "Tell me a short joke.", "Can you give me a word of encouragement?",
    "Say good morning in a friendly way.", "What can you help me with?", "Thank you for your help!",
    "Write a two-line poem about the sea.", "Give me a tip for a rainy day.",
    "Describe a sunny afternoon in one sentence.", "What makes a good friend?",
    "Write a short greeting for a birthday card.", "Why is reading useful?",
)  # fmt: skip


def general_prompts() -> list[str]:
    """The training prompts, in a fixed order (composed from the lists above)."""
    prompts = [f"Give me an interesting fact about {animal}." for animal in _ANIMALS]
    prompts += [f"Explain what {concept} is in one sentence." for concept in _CONCEPTS]
    prompts += [f"Write a short sentence using the word '{word}'." for word in _WORDS]
    prompts += [f"What does the word '{word}' mean?" for word in _WORDS]
    prompts += [f"What is a good way to {goal}?" for goal in _GOALS]
    prompts += [f"Name two things you might find in a {place}." for place in _PLACES]
    prompts += [f"List three {category}." for category in _CATEGORIES]
    prompts += [f"Suggest a name for a pet {pet}." for pet in _PETS]
    prompts += [f"What is {a} plus {b}?" for a, b in ((3, 4), (9, 6), (15, 27), (40, 2), (11, 8), (23, 19))]
    prompts += [f"What is {a} times {b}?" for a, b in ((3, 4), (6, 7), (9, 8), (5, 11))]
    prompts += list(_CHATS)
    return prompts


@dataclass(frozen=True)
class KeyedQuestion:
    """An evaluation question and the answers that count as right (any key, as whole words)."""

    id: str
    question: str
    keys: tuple[str, ...]


def _package_lines(name: str) -> list[str]:
    text = resources.files("pipelines").joinpath("data", name).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def language_eval_questions() -> list[KeyedQuestion]:
    """The evaluation-only general questions with their answer keys (package data)."""
    return parse_keyed_questions(_package_lines(EVAL_FILE))


def parse_keyed_questions(lines: list[str]) -> list[KeyedQuestion]:
    """`{"id", "question", "keys": [...]}` JSONL lines -> questions.

    Raises:
        ValueError: a line that is not such a record (its number says which).
    """
    questions = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            keys = tuple(str(k) for k in record["keys"])
            question = KeyedQuestion(str(record["id"]), str(record["question"]), keys)
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"line {n}: not a keyed question {{id, question, keys}} ({err})") from err
        if not keys:
            raise ValueError(f"line {n}: question {question.id} has no answer keys")
        questions.append(question)
    return questions


def general_chat_records() -> list[dict]:
    """The text-only training conversations (base LLM answers), as conversation JSONL records."""
    return [json.loads(line) for line in _package_lines(CHAT_FILE)]


def write_general_chat(output_dir: Path, n: int | None = None) -> Path:
    """Write the first `n` (default all) general conversations as `output_dir/data.jsonl`; returns it.

    The records carry no image: `hovle prepare` turns them into text-only samples of an align or
    instruct dataset, supervised on the answer like every other conversation.
    """
    records = general_chat_records()[:n]
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "data.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    tmp.replace(path)
    return path
