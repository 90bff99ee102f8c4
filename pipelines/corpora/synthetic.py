"""The synthetic corpus source: deterministic coloured-shape scenes and rendered words, with ground truth.

    generate("instruct", n=100, seed=0, output_dir=Path("corpus"))  ->  corpus/data.jsonl + corpus/images/

Questions are the unambiguous ones about a scene (`scene_questions`: colour, shape, count, position), the
word an image shows, or which of two scenes has more shapes; the record format per stage, determinism by
seed and held-out phrasing are `write_corpus`'s (`pipelines.corpora.corpus`). `skills=` balances an
instruct corpus: record `i` asks `skills[i % len(skills)]`, so a few hundred records hold 100 of each.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from itertools import cycle
from pathlib import Path

from pipelines.corpora.corpus import (
    COMPARE_ANSWER_FORMS,
    MULTI_TURN_PROBABILITY,
    ORDINALS,
    HeldoutPhrasing,
    Phrasing,
    Sample,
    Turn,
    ask,
    check_image_size,
    write_corpus,
)
from pipelines.corpora.scenes import (
    MAX_SHAPES,
    PALETTE,
    POSITIONS,
    SHAPES,
    WORDS,
    Scene,
    describe_scene,
    draw_scene,
    render_word,
    sample_scene,
)

COUNT_ALL = "How many shapes are there?"
COUNT_COLOUR = "How many {colour} shapes are there?"
COUNT_KIND = "How many {kind}s are there?"
COLOUR_OF_KIND = "What colour is the {kind}?"
WHERE_KIND = "Where is the {kind}?"
WHERE_PAIR = "Where is the {colour} {kind}?"
SHAPE_OF_COLOUR = "What shape is the {colour} object?"


def scene_questions(scene: Scene, rng: random.Random) -> dict[str, list[Turn]]:
    """Every unambiguous question about `scene`, by skill (colour, shape, count, position).

    A shape is asked about by its kind only when it is the only one of that kind, by its colour only when
    it is the only one of that colour, and by colour + kind only when that pair is unique.
    """
    kinds = Counter(s.shape for s in scene.shapes)
    colours = Counter(s.colour for s in scene.shapes)
    pairs = Counter((s.colour, s.shape) for s in scene.shapes)
    absent = [c for c in PALETTE if c not in colours]
    questions: dict[str, list[Turn]] = {"colour": [], "shape": [], "count": [], "position": []}
    questions["count"].append(ask(COUNT_ALL, str(len(scene.shapes)), "count"))
    for colour in sorted(colours) + ([rng.choice(absent)] if absent else []):
        questions["count"].append(ask(COUNT_COLOUR, str(colours[colour]), "count", colour=colour))
    for kind in sorted(kinds):
        questions["count"].append(ask(COUNT_KIND, str(kinds[kind]), "count", kind=kind))
    for s in scene.shapes:
        if kinds[s.shape] == 1:
            questions["colour"].append(ask(COLOUR_OF_KIND, s.colour, "colour", kind=s.shape))
            questions["position"].append(ask(WHERE_KIND, s.position, "position", kind=s.shape))
        elif pairs[(s.colour, s.shape)] == 1:
            where = ask(WHERE_PAIR, s.position, "position", colour=s.colour, kind=s.shape)
            questions["position"].append(where)
        if colours[s.colour] == 1:
            questions["shape"].append(ask(SHAPE_OF_COLOUR, s.shape, "shape", colour=s.colour))
    return {skill: turns for skill, turns in questions.items() if turns}


# ---- the shapes source ------------------------------------------------------------------------------

INSTRUCT_SKILLS = ("colour", "shape", "count", "position", "ocr", "compare")
OCR_PROBABILITY = 0.2  # share of OCR images in the distill and align stages
OCR_QUESTION = "What word is written in the image?"
TEXT_COLOUR_QUESTION = "What colour is the text?"
COMPARE_QUESTION = "Which image has more shapes?"
# Answer-form instructions by skill, for held-out questions only. Each asks for a form that the evaluator's
# normalisation (case, outer punctuation, number words to digits) maps back to the record's answer.
ANSWER_FORMS: dict[str, tuple[str, ...]] = {
    "colour": ("Answer with a single word.", "Reply in one word.", "Give the colour in capital letters."),
    "shape": ("Answer with a single word.", "Reply in one word.", "Give the shape in capital letters."),
    "count": ("Answer with a number.", "Reply with digits only.", "Spell the number out as a word."),
    "position": ("Answer with the position only.", "Reply with just the part of the image, in capitals."),
    "ocr": ("Reply with the word only.", "Answer with a single word.", "Write the word in capital letters."),
    "compare": COMPARE_ANSWER_FORMS,
}
SHAPES_HELDOUT = HeldoutPhrasing(
    questions={
        COUNT_ALL: (
            "What is the number of shapes in the picture?", "Count the shapes.",
            "How many objects can you see in the image?", "Tell me how many shapes the image contains.",
        ),
        COUNT_COLOUR: (
            "What is the number of {colour} shapes in the picture?", "Count the {colour} shapes.",
            "How many of the shapes are {colour}?",
        ),
        COUNT_KIND: (
            "What is the number of {kind}s in the picture?", "Count the {kind}s.",
            "How many {kind}s can you see in the image?",
        ),
        COLOUR_OF_KIND: (
            "Which colour does the {kind} have?", "Tell me the colour of the {kind}.",
            "What is the colour of the {kind}?", "The {kind} is painted in which colour?",
        ),
        SHAPE_OF_COLOUR: (
            "Which kind of shape is {colour}?", "Name the shape that is {colour}.",
            "The {colour} object has what shape?", "Which shape is coloured {colour}?",
        ),
        WHERE_KIND: (
            "In what part of the image is the {kind}?", "Tell me the position of the {kind}.",
            "Where in the picture can the {kind} be found?", "Which cell of the grid holds the {kind}?",
        ),
        WHERE_PAIR: (
            "In what part of the image is the {colour} {kind}?",
            "Tell me the position of the {colour} {kind}.", "Where in the picture is the {colour} {kind}?",
        ),
        OCR_QUESTION: (
            "Read the word in the picture.", "Which word does the image show?",
            "What does the text in the image say?", "Transcribe the word that is shown.",
        ),
        TEXT_COLOUR_QUESTION: (
            "Which colour is the word written in?", "Tell me the colour of the lettering.",
            "In what colour is the word printed?",
        ),
        COMPARE_QUESTION: (
            "Which of the two pictures contains more shapes?", "In which image are there more shapes?",
            "Which picture shows a larger number of objects?",
        ),
    },
    answer_forms=ANSWER_FORMS,
)  # fmt: skip
TEXT_TEMPLATES = (
    "The {colour} {shape} is at the {position}.",
    "There are {count} {shape}s in the picture.",
    "Any {shape} can be {colour}.",
    'The word "{word}" has {letters} letters.',
    "A {colour} {shape} sits next to the {other_colour} {other_shape}.",
)


class ShapesSource:
    """Coloured-shape scenes and rendered words, drawn with Pillow at `image_size` pixels."""

    name = "shapes"
    heldout = SHAPES_HELDOUT

    def __init__(self, image_size: int = 224, skills: Sequence[str] | None = None) -> None:
        """`skills`: the instruct skills to ask in turn (record i asks skills[i % len]); None: at random."""
        check_image_size(image_size)
        if skills is not None and (not skills or not set(skills) <= set(INSTRUCT_SKILLS)):
            raise ValueError(f"skills must be some of {', '.join(INSTRUCT_SKILLS)}, got {skills!r}")
        self.image_size = image_size
        self.balanced = skills is not None
        self._skills = cycle(skills or ())

    def _scene_sample(self, rng: random.Random) -> tuple[Scene, Sample]:
        scene = sample_scene(rng, self.image_size)
        image = draw_scene(scene, self.image_size)
        return scene, Sample([image], describe_scene(scene), [], {"scenes": [scene.as_dict()]})

    def _word_sample(self, rng: random.Random) -> Sample:
        image, facts = render_word(rng.choice(WORDS), self.image_size, rng)
        caption = f'the word "{facts["word"]}" written in {facts["colour"]}'
        turns = [ask(OCR_QUESTION, facts["word"], "ocr")]
        return Sample([image], caption, turns, {"ocr": facts})

    def sample(self, rng: random.Random, stage: str) -> Sample:
        if stage != "instruct":
            return self._word_sample(rng) if rng.random() < OCR_PROBABILITY else self._scene_sample(rng)[1]
        skill = next(self._skills) if self.balanced else rng.choice(INSTRUCT_SKILLS)
        sample = self._instruct_sample(rng, skill)
        if self.balanced:  # the record's skill is its last turn's: the asked skill goes last
            sample.turns.sort(key=lambda turn: turn.skill == skill)
        return sample

    def _instruct_sample(self, rng: random.Random, skill: str) -> Sample:
        if skill == "ocr":
            sample = self._word_sample(rng)
            if rng.random() < MULTI_TURN_PROBABILITY:
                sample.turns.append(ask(TEXT_COLOUR_QUESTION, sample.meta["ocr"]["colour"], "colour"))
            return sample
        if skill == "compare":
            counts = rng.sample(range(1, MAX_SHAPES + 1), 2)
            scenes = [sample_scene(rng, self.image_size, count) for count in counts]
            answer = ORDINALS[0] if counts[0] > counts[1] else ORDINALS[1]
            return Sample(
                [draw_scene(scene, self.image_size) for scene in scenes],
                describe_scene(scenes[0]),
                [ask(COMPARE_QUESTION, answer, "compare")],
                {"scenes": [scene.as_dict() for scene in scenes]},
            )
        scene, sample = self._scene_sample(rng)
        questions = scene_questions(scene, rng)
        while self.balanced and skill not in questions:  # redraw; any one-shape scene has every skill
            scene, sample = self._scene_sample(rng)
            questions = scene_questions(scene, rng)
        pool = questions.get(skill) or questions["count"]  # e.g. no colour is unique: ask a count
        sample.turns.append(rng.choice(pool))
        if rng.random() < MULTI_TURN_PROBABILITY:
            others = [t for turns in questions.values() for t in turns if t not in sample.turns]
            sample.turns.extend(rng.sample(others, min(len(others), rng.randint(1, 2))))
        return sample

    def text(self, rng: random.Random) -> str:
        sentences = []
        for _ in range(rng.randint(2, 4)):
            colour, other_colour = rng.sample(list(PALETTE), 2)
            shape, other_shape, word = rng.choice(SHAPES), rng.choice(SHAPES), rng.choice(WORDS)
            sentences.append(
                rng.choice(TEXT_TEMPLATES).format(
                    colour=colour,
                    other_colour=other_colour,
                    shape=shape,
                    other_shape=other_shape,
                    position=rng.choice(POSITIONS),
                    count=rng.randint(2, 9),
                    word=word,
                    letters=len(word),
                )
            )
        return " ".join(sentences)


def generate(
    stage: str,
    n: int,
    seed: int,
    output_dir: Path,
    image_size: int = 224,
    phrasing: Phrasing = "train",
    skills: Sequence[str] | None = None,
) -> Path:
    """A shapes + rendered-words corpus of `n` records for `stage`; returns the path of its `data.jsonl`.

    `phrasing="heldout"`: questions worded as training never words them (instruct only). `skills`: record
    `i` asks `skills[i % len(skills)]` (instruct only), e.g. ("colour", "shape", "count") with n=300 gives
    exactly 100 records of each skill; None draws each record's skill at random.
    """
    if skills is not None and stage != "instruct":
        raise ValueError(f"skills chooses instruct questions: the {stage} stage has none")
    return write_corpus(ShapesSource(image_size, skills), stage, n, seed, Path(output_dir), phrasing)
