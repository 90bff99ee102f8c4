"""Fashion-MNIST from Debian's `dataset-fashion-mnist`, written as the same corpora as the shapes source.

70k 28x28 grayscale photos of 10 clothing classes, gzipped IDX files under /usr/share/datasets/fashion-mnist;
upscaled to RGB, and captioned and asked about by their true class (`pipelines.corpora.labelled`).
A missing package raises `MissingPackageError` naming the apt-get command.
"""

from __future__ import annotations

import gzip
import random
import struct
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipelines.corpora.corpus import HeldoutPhrasing, Phrasing, check_image_size, write_corpus
from pipelines.corpora.labelled import LABEL_ANSWER_FORMS, LabelledImageSource, LabelTemplates
from pipelines.corpora.scenes import MissingPackageError

FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Label index -> normalised class name (the dataset's names, lowercased).
FASHION_CLASSES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip
FEET_QUESTION = "Is this item worn on the feet?"


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
        check_image_size(image_size)
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
        label_id = int(self.label_ids[index])
        label = FASHION_CLASSES[label_id]
        return image, label, {"split": self.split, "index": index, "label": label_id, "class": label}


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
