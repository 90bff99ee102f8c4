"""Colour emoji from Debian's `fonts-noto-color-emoji`, written as the same corpora as the shapes source.

NotoColorEmoji.ttf is a CBDT bitmap font with one strike (size 109); each code point it renders is drawn
at a random scale and place and labelled with its lowercased Unicode name ("grinning face"), and captioned
and asked about by that name (`pipelines.corpora.labelled`).
A missing package raises `MissingPackageError` naming the apt-get command.
"""

from __future__ import annotations

import random
import unicodedata
from functools import cache
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from pipelines.corpora.corpus import HeldoutPhrasing, Phrasing, check_image_size, write_corpus
from pipelines.corpora.labelled import LABEL_ANSWER_FORMS, LabelledImageSource, LabelTemplates
from pipelines.corpora.scenes import BACKGROUNDS, MissingPackageError

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


class EmojiRenderError(RuntimeError):
    """The emoji font is installed but Pillow draws nothing with it."""


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
        check_image_size(image_size)
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
        box = [x, y, x + glyph.width, y + glyph.height]
        return image, label, {"codepoint": f"U+{ord(char):04X}", "name": label, "box": box}


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
