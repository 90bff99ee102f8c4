"""Coloured-shape scenes and rendered words: what the synthetic corpora draw, with the facts they show.

sample_scene(rng, size) -> Scene      shapes with colours and grid positions (the ground truth)
draw_scene(scene, size) -> image      the scene drawn; describe_scene(scene) -> its caption
render_word(word, size, rng)          a word in a DejaVu font and a colour, with what was drawn
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

# Named colours, far apart in RGB so that a pixel's colour names itself (the tests rely on it).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (235, 210, 30),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "purple": (130, 50, 170),
    "pink": (240, 110, 180),
}
BACKGROUNDS: tuple[tuple[int, int, int], ...] = ((245, 245, 245), (235, 235, 225), (225, 230, 240))
TEXT_COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (20, 20, 20),
    "red": PALETTE["red"],
    "blue": PALETTE["blue"],
    "green": PALETTE["green"],
    "purple": PALETTE["purple"],
}
SHAPES = ("circle", "square", "triangle", "star")
GRID = 3
# Row-major names of the 3x3 grid cells; also the answers to position questions.
POSITIONS = (
    "top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right",
)  # fmt: skip
MAX_SHAPES = 5
STAR_INNER_RATIO = 0.45

DEJAVU_DIR = Path("/usr/share/fonts/truetype/dejavu")
OCR_FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf")
WORDS = (
    "apple", "river", "garden", "window", "orange", "planet", "silver", "forest", "candle", "bridge",
    "pencil", "rocket", "winter", "summer", "castle", "yellow", "guitar", "marble", "button", "jungle",
    "cactus", "dragon", "mirror", "anchor", "basket", "cookie", "desert", "engine", "falcon", "ginger",
    "harbor", "island", "jacket", "kettle", "ladder", "magnet", "needle", "oyster", "parrot", "quartz",
    "rabbit", "saddle", "tomato", "umbrella", "velvet", "walnut", "zebra", "cloud", "stone", "light",
    "music", "train", "table", "chair", "water", "bread", "honey", "lemon", "tiger", "whale",
    "piano", "paper", "house", "smile", "ocean", "storm", "green", "blue", "red", "sun",
    "moon", "star", "tree", "book", "lamp", "fish", "bird", "door", "road", "milk",
)  # fmt: skip


class MissingPackageError(FileNotFoundError):
    """A Debian package that provides an asset (fonts, datasets) is not installed."""

    def __init__(self, what: str, path: Path, package: str) -> None:
        super().__init__(
            f"{what} not found at {path}: install the Debian package with "
            f"`sudo apt-get install -y {package}` (the Makefile's CI set-up does this)"
        )
        self.package = package


# ---- scenes -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlacedShape:
    shape: str
    colour: str
    position: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (inclusive) of the shape's square


@dataclass(frozen=True)
class Scene:
    background: tuple[int, int, int]
    shapes: tuple[PlacedShape, ...]  # row-major by grid cell

    def as_dict(self) -> dict[str, Any]:
        return {
            "grid": GRID,
            "background": list(self.background),
            "shapes": [
                {"shape": s.shape, "colour": s.colour, "position": s.position, "box": list(s.box)}
                for s in self.shapes
            ],
        }


def sample_scene(rng: random.Random, size: int, count: int | None = None) -> Scene:
    """A scene of `count` (default 1..MAX_SHAPES) shapes, at most one per cell of a 3x3 grid.

    Each shape spans 60-80% of its cell and sits within 4% of the cell's centre, so the cell's centre pixel
    is always inside the shape and neighbouring shapes never touch.
    """
    count = rng.randint(1, MAX_SHAPES) if count is None else count
    cell = size / GRID
    shapes = []
    for index in sorted(rng.sample(range(GRID * GRID), count)):
        row, col = divmod(index, GRID)
        side = rng.uniform(0.6, 0.8) * cell
        cx = (col + 0.5) * cell + rng.uniform(-0.04, 0.04) * cell
        cy = (row + 0.5) * cell + rng.uniform(-0.04, 0.04) * cell
        box = (round(cx - side / 2), round(cy - side / 2), round(cx + side / 2), round(cy + side / 2))
        shapes.append(PlacedShape(rng.choice(SHAPES), rng.choice(list(PALETTE)), POSITIONS[index], box))
    return Scene(rng.choice(BACKGROUNDS), tuple(shapes))


def _star_points(box: tuple[int, int, int, int]) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = box
    cx, cy, outer = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    points = []
    for k in range(10):
        radius = outer if k % 2 == 0 else outer * STAR_INNER_RATIO
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def draw_scene(scene: Scene, size: int) -> Image.Image:
    """The scene as a `size` x `size` RGB image, not anti-aliased: each shape pixel is its palette colour."""
    image = Image.new("RGB", (size, size), scene.background)
    draw = ImageDraw.Draw(image)
    for s in scene.shapes:
        fill = PALETTE[s.colour]
        x0, y0, x1, y1 = s.box
        if s.shape == "circle":
            draw.ellipse(s.box, fill=fill)
        elif s.shape == "square":
            draw.rectangle(s.box, fill=fill)
        elif s.shape == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
        else:
            draw.polygon(_star_points(s.box), fill=fill)
    return image


def with_article(phrase: str) -> str:
    """`phrase` after "a", or "an" before a vowel: "a red", "an orange"."""
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def describe_scene(scene: Scene) -> str:
    """E.g. "a red circle at the top left and a blue square at the bottom right"."""
    parts = [f"{with_article(s.colour)} {s.shape} at the {s.position}" for s in scene.shapes]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


# ---- rendered words (OCR) ---------------------------------------------------------------------------


@cache
def _font(name: str, size: int) -> ImageFont.FreeTypeFont:
    path = DEJAVU_DIR / name
    if not path.is_file():
        raise MissingPackageError("DejaVu font", path, "fonts-dejavu-core")
    return ImageFont.truetype(str(path), size)


def render_word(word: str, size: int, rng: random.Random) -> tuple[Image.Image, dict[str, Any]]:
    """`word` drawn in a DejaVu font and a named colour at a random place; returns the image and its facts."""
    font_name, colour = rng.choice(OCR_FONTS), rng.choice(list(TEXT_COLOURS))
    font_size = max(8, int(size * 0.3))
    while True:
        left, top, right, bottom = _font(font_name, font_size).getbbox(word)
        if right - left <= 0.9 * size or font_size <= 8:
            break
        font_size -= 2
    width, height = right - left, bottom - top
    x = rng.randint(0, max(0, size - width))
    y = rng.randint(0, max(0, size - height))
    image = Image.new("RGB", (size, size), rng.choice(BACKGROUNDS))
    ImageDraw.Draw(image).text(
        (x - left, y - top), word, font=_font(font_name, font_size), fill=TEXT_COLOURS[colour]
    )
    return image, {"word": word, "colour": colour, "font": font_name, "box": [x, y, x + width, y + height]}
