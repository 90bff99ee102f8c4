"""Real labelled images from Debian packages, written as the same corpora as `pipelines.corpora.synthetic`.

- Fashion-MNIST (`dataset-fashion-mnist`): 70k 28x28 grayscale photos of 10 clothing classes, gzipped IDX
  files under /usr/share/datasets/fashion-mnist; upscaled to RGB.
- Colour emoji (`fonts-noto-color-emoji`): NotoColorEmoji.ttf, a CBDT bitmap font with one strike (size 109),
  labelled with the lowercased Unicode name of each code point it renders ("grinning face").

Captions and questions come from templates over the true label; `answer`/`skill` are the ground truth.
`phrasing="heldout"` asks with each source's evaluation-only paraphrases instead (see
`pipelines.corpora.synthetic`).
A missing package raises `MissingPackageError` naming the apt-get command.
"""

from __future__ import annotations

import gzip
import random
import struct
import unicodedata
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipelines.corpora.scenes import BACKGROUNDS, MissingPackageError
from pipelines.corpora.synthetic import (
    ANSWER_FORMS,
    MIN_IMAGE_SIZE,
    ORDINALS,
    HeldoutPhrasing,
    Phrasing,
    Sample,
    Turn,
    ask,
    write_corpus,
)

FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Label index -> normalised class name (the dataset's names, lowercased).
FASHION_CLASSES = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
FEET_QUESTION = "Is this item worn on the feet?"

EMOJI_PACKAGE = "fonts-noto-color-emoji"
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_FONT_SIZE = 109  # the font's only bitmap strike; FreeType refuses any other size
# Emoticons, pictographs, transport, supplemental and extended pictographs; skin-tone modifiers excluded.
EMOJI_RANGES = (
    (0x1F300, 0x1F3FA),
    (0x1F400, 0x1F64F),
    (0x1F680, 0x1F6FF),
    (0x1F900, 0x1F9FF),
    (0x1FA70, 0x1FAFF),
)

COMPARE_PROBABILITY = 0.15
MULTI_TURN_PROBABILITY = 0.25
# Answer-form instructions of held-out questions (see pipelines.corpora.synthetic.ANSWER_FORMS), by skill.
YES_NO_FORMS = ("Answer yes or no.", "Reply with yes or no only.")
LABEL_ANSWER_FORMS = {"verify": YES_NO_FORMS, "category": YES_NO_FORMS, "compare": ANSWER_FORMS["compare"]}


class EmojiRenderError(RuntimeError):
    """The emoji font is installed but Pillow draws nothing with it."""


def _article(phrase: str) -> str:
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


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


# ---- Fashion-MNIST ----------------------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not) of unsigned bytes as a uint8 array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (header {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header declares shape {shape} but holds {array.size} bytes")
    return array.reshape(shape)


@cache
def load_fashion_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels uint8 [N]) of a split: train (60,000) or test (10,000)."""
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"split must be one of {', '.join(FASHION_MNIST_FILES)}, got {split!r}")
    paths = [FASHION_MNIST_DIR / name for name in FASHION_MNIST_FILES[split]]
    for path in paths:
        if not path.is_file():
            raise MissingPackageError("Fashion-MNIST", path, FASHION_MNIST_PACKAGE)
    images, labels = (read_idx(path) for path in paths)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"Fashion-MNIST {split}: images {images.shape} do not match labels {labels.shape}")
    return images, labels


class FashionMnistSource(LabelledImageSource):
    """Fashion-MNIST photos in a seeded order without repeats, upscaled to `image_size` RGB."""

    name = "fashion-mnist"
    labels = FASHION_CLASSES
    templates = LabelTemplates(
        skill="class",
        questions=(
            "What item is shown in the image?",
            "What kind of fashion item is this?",
            "Which clothing category does this image belong to?",
        ),
        verify="Is this {a_label}?",
        compare="Which image shows {a_label}?",
        captions=(
            "a grayscale photo of {a_label}",
            "{a_label} on a black background",
            "a small picture of {a_label}",
        ),
        texts=(
            "{a_label} is a fashion item.",
            "you can buy {a_label} in a clothes shop.",
            "{a_label} looks different from a {other}.",
            "a shop sells the {label}, the {other} and the {third}.",
            "sandals, sneakers and ankle boots are worn on the feet.",
        ),
        groups={FEET_QUESTION: frozenset({"sandal", "sneaker", "ankle boot"})},
    )
    heldout = HeldoutPhrasing(
        questions={
            **dict.fromkeys(
                templates.questions,
                (
                    "Which item of clothing is this?",
                    "Name the fashion item in the picture.",
                    "What is this garment or accessory called?",
                    "Tell me which clothing class the photo shows.",
                ),
            ),
            templates.verify: (
                "Does the picture show {a_label}?",
                "Is the item in the photo {a_label}?",
                "Would you call this item {a_label}?",
            ),
            templates.compare: (
                "In which picture can you see {a_label}?",
                "Which of the two photos has {a_label}?",
            ),
            FEET_QUESTION: ("Would someone wear this on their feet?", "Is this a kind of footwear?"),
        },
        answer_forms={
            **LABEL_ANSWER_FORMS,
            "class": ("Answer with the name of the item only.", "Give the item's class in capital letters."),
        },
    )

    def __init__(self, seed: int, split: str = "train", image_size: int = 112) -> None:
        if image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE} pixels, got {image_size}")
        self.images, self.label_ids = load_fashion_mnist(split)
        self.split, self.image_size = split, image_size
        self.order = list(range(len(self.label_ids)))
        random.Random(f"{self.name}/{split}/{seed}").shuffle(self.order)
        self.cursor = 0

    def draw(self, rng: random.Random) -> tuple[Image.Image, str, dict[str, Any]]:
        if self.cursor >= len(self.order):
            raise ValueError(
                f"the Fashion-MNIST {self.split} split holds {len(self.order)} images: ask for fewer"
            )
        index = self.order[self.cursor]
        self.cursor += 1
        small = Image.fromarray(self.images[index], mode="L")
        image = small.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC).convert("RGB")
        label = FASHION_CLASSES[int(self.label_ids[index])]
        return (
            image,
            label,
            {"split": self.split, "index": index, "label": int(self.label_ids[index]), "class": label},
        )


def import_fashion_mnist(
    output_dir: Path,
    n: int,
    seed: int,
    split: str = "train",
    stage: str = "instruct",
    image_size: int = 112,
    phrasing: Phrasing = "train",
) -> Path:
    """`n` Fashion-MNIST records of `split` for `stage` as images + `data.jsonl`; returns the JSONL path.

    Images are drawn without repeats in an order fixed by `seed`; evaluate on `split="test"`, and with
    `phrasing="heldout"` on questions worded as training never words them.
    """
    source = FashionMnistSource(seed, split, image_size)
    return write_corpus(source, stage, n, seed, Path(output_dir), phrasing)


# ---- colour emoji -----------------------------------------------------------------------------------


@cache
def _emoji_font() -> ImageFont.FreeTypeFont:
    if not EMOJI_FONT.is_file():
        raise MissingPackageError("Noto Color Emoji font", EMOJI_FONT, EMOJI_PACKAGE)
    return ImageFont.truetype(str(EMOJI_FONT), EMOJI_FONT_SIZE)


def render_emoji(char: str) -> Image.Image | None:
    """`char` drawn by the colour emoji font, RGBA cropped to its glyph; None if the font has no glyph."""
    canvas = Image.new("RGBA", (EMOJI_FONT_SIZE * 3 // 2, EMOJI_FONT_SIZE * 3 // 2), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((0, 0), char, font=_emoji_font(), embedded_color=True)
    box = canvas.getchannel("A").getbbox()  # a code point missing from the font draws nothing
    return canvas.crop(box) if box else None


@cache
def renderable_emoji() -> tuple[str, ...]:
    """Code points in EMOJI_RANGES that have a Unicode name in this Python and that the font draws (about
    1,100 of 1,300 named ones; rendering them all takes about half a second)."""
    chars = (chr(cp) for low, high in EMOJI_RANGES for cp in range(low, high + 1))
    drawn = tuple(char for char in chars if unicodedata.name(char, "") and render_emoji(char) is not None)
    if not drawn:
        raise EmojiRenderError(
            f"no emoji rendered from {EMOJI_FONT}: Pillow needs FreeType with colour bitmap (CBDT) support"
        )
    return drawn


class EmojiSource(LabelledImageSource):
    """Colour emoji at a random scale and place on a light background, named by their Unicode names."""

    name = "emoji"
    templates = LabelTemplates(
        skill="emoji",
        questions=("What is shown in the image?", "What does this emoji show?", "Name this emoji."),
        verify="Is this the {label} emoji?",
        compare="Which image shows the {label} emoji?",
        captions=("the {label} emoji", "an emoji of {a_label}", "the {label} emoji on a plain background"),
        texts=(
            "the {label} emoji is often used in messages.",
            "the {label} emoji and the {other} emoji are both pictures.",
            "people send the {label} emoji more than the {other} emoji.",
            "the {label} emoji sits next to the {third} emoji on the keyboard.",
        ),
    )
    heldout = HeldoutPhrasing(
        questions={
            **dict.fromkeys(
                templates.questions,
                ("Which emoji is this?", "Tell me the name of this emoji.", "What is this emoji called?"),
            ),
            templates.verify: ("Does the picture show the {label} emoji?", "Is this emoji the {label} one?"),
            templates.compare: (
                "In which picture can you see the {label} emoji?",
                "Which of the two pictures has the {label} emoji?",
            ),
        },
        answer_forms={**LABEL_ANSWER_FORMS, "emoji": ("Answer with the emoji's name only.",)},
    )

    def __init__(self, image_size: int = 112) -> None:
        if image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE} pixels, got {image_size}")
        self.image_size = image_size
        self.chars = renderable_emoji()
        self.labels = tuple(unicodedata.name(char).lower() for char in self.chars)

    def draw(self, rng: random.Random) -> tuple[Image.Image, str, dict[str, Any]]:
        char = rng.choice(self.chars)
        glyph = render_emoji(char)
        if glyph is None:  # renderable_emoji() drew it a moment ago: the font file changed under us
            raise EmojiRenderError(f"{EMOJI_FONT} no longer renders U+{ord(char):04X}")
        scale = rng.uniform(0.55, 0.85) * self.image_size / max(glyph.size)
        size = (max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale)))
        glyph = glyph.resize(size, Image.Resampling.LANCZOS)
        image = Image.new("RGB", (self.image_size, self.image_size), rng.choice(BACKGROUNDS))
        x = rng.randint(0, self.image_size - glyph.width)
        y = rng.randint(0, self.image_size - glyph.height)
        image.paste(glyph, (x, y), glyph)
        label = unicodedata.name(char).lower()
        return (
            image,
            label,
            {
                "codepoint": f"U+{ord(char):04X}",
                "name": label,
                "box": [x, y, x + glyph.width, y + glyph.height],
            },
        )


def import_emoji(
    output_dir: Path,
    n: int,
    seed: int,
    stage: str = "instruct",
    image_size: int = 112,
    phrasing: Phrasing = "train",
) -> Path:
    """`n` colour-emoji records for `stage` as images + `data.jsonl`; returns the JSONL path.

    Labels are lowercased Unicode names ("grinning face"); only code points the font draws are used.
    `phrasing="heldout"` asks with paraphrases training never uses.
    """
    return write_corpus(EmojiSource(image_size), stage, n, seed, Path(output_dir), phrasing)
