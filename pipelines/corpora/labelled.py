"""Labelled-image corpus sources: captions and questions from templates over each image's true label.

A `LabelledImageSource` says how to draw one image with its label (`draw`) and how to talk about labels
(`LabelTemplates`); from those it makes the samples of every stage, as the shapes source does: "what is
this?", yes/no questions about the true or another label, category questions, and "which of two images
shows ...?". `answer`/`skill` are the ground truth; `phrasing="heldout"` asks with each source's
evaluation-only paraphrases instead (see `pipelines.corpora.corpus`). The sources read Debian packages:
`pipelines.corpora.fashion_mnist` and `pipelines.corpora.emoji`.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from pipelines.corpora.corpus import (
    COMPARE_ANSWER_FORMS,
    MULTI_TURN_PROBABILITY,
    ORDINALS,
    HeldoutPhrasing,
    Sample,
    Turn,
    ask,
)
from pipelines.corpora.scenes import with_article as _article

COMPARE_PROBABILITY = 0.15
# Answer-form instructions of held-out questions (see pipelines.corpora.synthetic.ANSWER_FORMS), by skill.
YES_NO_FORMS = ("Answer yes or no.", "Reply with yes or no only.")
LABEL_ANSWER_FORMS = {"verify": YES_NO_FORMS, "category": YES_NO_FORMS, "compare": COMPARE_ANSWER_FORMS}


@dataclass(frozen=True)
class LabelTemplates:
    """How a labelled-image source talks about its label. Placeholders: {label}, {a_label} (with article)."""

    skill: str  # the skill of "what is this?" questions
    questions: tuple[str, ...]
    verify: str  # a yes/no question about a (true or other) label
    compare: str  # "which of two images shows {a_label}?"
    captions: tuple[str, ...]
    texts: tuple[str, ...]
    # yes/no questions answered "yes" for exactly these labels (skill "category")
    groups: dict[str, frozenset[str]] = field(default_factory=dict)


class LabelledImageSource(ABC):
    """A corpus source over labelled images; subclasses say how to draw one (`draw`) and how to talk."""

    name: str
    templates: LabelTemplates
    heldout: HeldoutPhrasing  # paraphrases of every template in `templates` that asks a question
    labels: tuple[str, ...]

    @abstractmethod
    def draw(self, rng: random.Random) -> tuple[Image.Image, str, dict[str, Any]]:
        """One image, its label and facts for the record's `meta`."""

    def _fill(self, template: str, label: str) -> str:
        return template.format(label=label, a_label=_article(label))

    def _ask(self, template: str, label: str, answer: str, skill: str) -> Turn:
        return ask(template, answer, skill, label=label, a_label=_article(label))

    def _questions(self, rng: random.Random, label: str) -> list[Turn]:
        """The "what is this?" question, then the yes/no ones in random order."""
        other = rng.choice([name for name in self.labels if name != label])
        asked = rng.choice([label, other])
        turns = [
            self._ask(rng.choice(self.templates.questions), label, label, self.templates.skill),
            self._ask(self.templates.verify, asked, "yes" if asked == label else "no", "verify"),
        ]
        extra = [
            ask(q, "yes" if label in yes else "no", "category") for q, yes in self.templates.groups.items()
        ]
        return turns[:1] + rng.sample(turns[1:] + extra, len(turns) - 1 + len(extra))

    def sample(self, rng: random.Random, stage: str) -> Sample:
        image, label, meta = self.draw(rng)
        caption = self._fill(rng.choice(self.templates.captions), label)
        if stage != "instruct":
            return Sample([image], caption, [], meta)
        if rng.random() < COMPARE_PROBABILITY:
            for _ in range(20):  # another label; ten classes make a repeat likely, twenty repeats not
                second, second_label, second_meta = self.draw(rng)
                if second_label != label:
                    break
            else:
                raise ValueError(f"{self.name}: could not draw two images with different labels")
            target = rng.randrange(2)
            shown = (label, second_label)[target]
            turn = self._ask(self.templates.compare, shown, ORDINALS[target], "compare")
            return Sample([image, second], caption, [turn], {"images": [meta, second_meta]})
        questions = self._questions(rng, label)
        if rng.random() < MULTI_TURN_PROBABILITY:
            turns = questions[: rng.randint(2, len(questions))]
        else:
            turns = [rng.choice(questions)]
        return Sample([image], caption, turns, meta)

    def text(self, rng: random.Random) -> str:
        labels = rng.sample(self.labels, 3)
        sentences = [
            rng.choice(self.templates.texts).format(
                label=labels[0], a_label=_article(labels[0]), other=labels[1], third=labels[2]
            )
            for _ in range(rng.randint(2, 3))
        ]
        return " ".join(sentence[0].upper() + sentence[1:] for sentence in sentences)
