"""What every corpus source draws, and `write_corpus`, which turns any source into a corpus for a stage.

Every image is drawn from a description the source chose first, and every question, answer and caption is
read off that description, never re-derived from pixels: the corpus is its own answer key. The sources:
`pipelines.corpora.synthetic` (coloured shapes and words), `fashion_mnist` and `emoji` (real images).

    write_corpus(ShapesSource(), "instruct", n=100, seed=0, output_dir=Path("corpus"))
        ->  corpus/data.jsonl + corpus/images/

Records are LLaVA/InternVL conversation JSONL lines, image paths relative to the JSONL's folder:
- distill:  {"id", "image"} per image, plus `text.jsonl` of {"id", "text"} (unpaired text);
- align:    {"id", "image", "conversations": [<image> Describe the image. -> caption], "caption",
             "answer" (= caption), "skill": "caption", "meta"};
- instruct: {"id", "image" (a path, or a list of two), "conversations" (one or more Q&A turns),
             "answer" and "skill" (of the last turn), "meta"}.
`meta` holds the generator's ground truth (scene geometry, the drawn word) for evaluation and tests.

Record `i` of a corpus draws from its own RNG seeded by (source, stage, seed, i): the same arguments give
byte-identical files, a corpus of n records is a prefix of one of n+k, and another seed gives a held-out set.

Another seed only gives new images; `phrasing="heldout"` also asks in words training never uses: every
question is reworded from its source's `heldout` paraphrases (`HeldoutPhrasing`), sometimes followed by an
answer-form instruction ("Reply in one word.") that the evaluator's normalisation still scores by exact
match. Rewording draws from a second RNG, so record `i` shows the same images and has the same answers as
record `i` of the train-phrasing corpus; its `meta` gains "phrasing": "heldout".
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from PIL import Image

log = logging.getLogger(__name__)

PHRASINGS = ("train", "heldout")
Phrasing = Literal["train", "heldout"]
MIN_IMAGE_SIZE = 48  # below this the longest word no longer fits at a legible font size
DESCRIBE_PROMPT = "Describe the image."
MULTI_TURN_PROBABILITY = 0.25  # share of instruct records that ask more than one question
ANSWER_FORM_PROBABILITY = 0.5
ORDINALS = ("the first", "the second")  # the answers of "which of two images ...?" questions
COMPARE_ANSWER_FORMS = ("Answer with the first or the second.", "Reply with just the first or the second.")


def check_image_size(image_size: int) -> None:
    """Raise ValueError unless a source can draw legible images of `image_size` pixels."""
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE} pixels, got {image_size}")


@dataclass(frozen=True)
class Turn:
    """One question about a sample's images and its ground-truth answer (normalised: lowercase)."""

    question: str
    answer: str
    skill: str
    template: str = ""  # the training template `question` was filled from: held-out sets reword by it
    slots: tuple[tuple[str, str], ...] = ()  # what filled it, e.g. (("colour", "red"),)


def ask(template: str, answer: str, skill: str, **slots: str) -> Turn:
    """A turn whose question is `template` filled with `slots`, remembering both for rewording."""
    return Turn(template.format(**slots), answer, skill, template, tuple(sorted(slots.items())))


@dataclass(frozen=True)
class HeldoutPhrasing:
    """A source's evaluation-only wording: paraphrases of each training template (same placeholders, never
    a training question) and answer-form instructions by skill that leave the normalised answer as it is."""

    questions: Mapping[str, tuple[str, ...]]
    answer_forms: Mapping[str, tuple[str, ...]]

    def reword(self, turn: Turn, rng: random.Random) -> Turn:
        """`turn` asked by a random paraphrase, half the time followed by an answer-form instruction."""
        if turn.template not in self.questions:
            raise ValueError(f"no held-out paraphrase of the training question template {turn.template!r}")
        question = rng.choice(self.questions[turn.template]).format(**dict(turn.slots))
        forms = self.answer_forms.get(turn.skill, ())
        if forms and rng.random() < ANSWER_FORM_PROBABILITY:
            question = f"{question} {rng.choice(forms)}"
        return Turn(question, turn.answer, turn.skill, turn.template, turn.slots)


@dataclass
class Sample:
    """What a corpus source draws for one record: images, a caption of the first, questions, ground truth."""

    images: list[Image.Image]
    caption: str
    turns: list[Turn]
    meta: dict[str, Any] = field(default_factory=dict)


class CorpusSource(Protocol):
    """A generator of samples and unpaired text; `write_corpus` turns it into a corpus for any stage."""

    name: str
    heldout: HeldoutPhrasing  # how `phrasing="heldout"` rewords the questions of `sample`

    def sample(self, rng: random.Random, stage: str) -> Sample:
        """One sample; for `distill` and `align` a single image, for `instruct` one or two."""
        ...

    def text(self, rng: random.Random) -> str:
        """A short unpaired text document (the `distill` stage's text corpus)."""
        ...


# ---- writing a corpus -------------------------------------------------------------------------------


def _conversation(turns: list[Turn], n_images: int) -> list[dict[str, str]]:
    """Human/gpt turns; the image placeholders go at the start of the first question."""
    prefix = "<image>\n" if n_images == 1 else "".join(f"Image {k + 1}: <image>\n" for k in range(n_images))
    conversation = []
    for k, turn in enumerate(turns):
        conversation.append({"from": "human", "value": (prefix if k == 0 else "") + turn.question})
        conversation.append({"from": "gpt", "value": turn.answer})
    return conversation


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    """Write atomically: a reader never sees half a file, and an interrupted run leaves none."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_corpus(
    source: CorpusSource, stage: str, n: int, seed: int, output_dir: Path, phrasing: Phrasing = "train"
) -> Path:
    """Draw `n` records from `source` for `stage` and write images + `data.jsonl` under `output_dir`.

    Returns the JSONL path. `distill` also writes `text.jsonl` ({"id", "text"}, n documents).
    `phrasing="heldout"` (instruct only) rewords every question with `source.heldout`.
    """
    from model.stages import STAGE_NAMES

    if stage not in STAGE_NAMES:
        raise ValueError(f"stage must be one of {', '.join(STAGE_NAMES)}, got {stage!r}")
    if phrasing not in PHRASINGS:
        raise ValueError(f"phrasing must be one of {', '.join(PHRASINGS)}, got {phrasing!r}")
    if phrasing == "heldout" and stage != "instruct":
        raise ValueError(f"phrasing 'heldout' needs questions: use it for instruct, not {stage}")
    if n < 1:
        raise ValueError(f"n must be a positive number of records, got {n}")
    output_dir = Path(output_dir)
    image_dir = output_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    records, texts = [], []
    for i in range(n):
        record_id = f"{source.name}-{stage}-{seed}-{i:06d}"
        rng = random.Random(f"{source.name}/{stage}/{seed}/{i}")  # str seeds hash with SHA-512: stable
        sample = source.sample(rng, stage)
        paths = []
        for k, image in enumerate(sample.images):
            name = f"{record_id}.png" if len(sample.images) == 1 else f"{record_id}-{k}.png"
            image.save(image_dir / name, format="PNG")
            paths.append(f"images/{name}")
        record: dict[str, Any] = {"id": record_id, "image": paths[0] if len(paths) == 1 else paths}
        if stage == "distill":
            texts.append({"id": f"{source.name}-text-{seed}-{i:06d}", "text": source.text(rng)})
        elif stage == "align":
            record["conversations"] = _conversation([Turn(DESCRIBE_PROMPT, sample.caption, "caption")], 1)
            record.update(caption=sample.caption, answer=sample.caption, skill="caption", meta=sample.meta)
        else:
            if phrasing == "heldout":  # its own RNG: the images and answers stay those of phrasing="train"
                reword = random.Random(f"{source.name}/{stage}/{seed}/{i}/heldout")
                sample.turns = [source.heldout.reword(turn, reword) for turn in sample.turns]
                sample.meta = {**sample.meta, "phrasing": "heldout"}
            record["conversations"] = _conversation(sample.turns, len(paths))
            record.update(answer=sample.turns[-1].answer, skill=sample.turns[-1].skill, meta=sample.meta)
        records.append(record)
    if texts:
        _write_jsonl(output_dir / "text.jsonl", texts)
    jsonl = output_dir / "data.jsonl"
    _write_jsonl(jsonl, records)
    log.info("wrote %d %s records from %s (seed %d) to %s", n, stage, source.name, seed, jsonl)
    return jsonl
