"""Synthetic and imported corpora: determinism by seed, record format per stage, answers that the pixels bear
out, held-out phrasing (never a training question, same ground truth), balanced skills, the Debian-package
importers, and `python -m jobs.synth` end to end."""

from __future__ import annotations

import gzip
import json
import re
import string
import struct
import subprocess
import sys
import unicodedata
from collections import Counter
from collections.abc import Iterable
from itertools import product
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs import synth
from pipelines.corpora import emoji, fashion_mnist, labelled
from pipelines.corpora.corpus import DESCRIBE_PROMPT
from pipelines.corpora.scenes import PALETTE, POSITIONS, SHAPES, TEXT_COLOURS, MissingPackageError
from pipelines.corpora.synthetic import ShapesSource, generate

REPO_ROOT = Path(__file__).resolve().parent.parent
SIZE = 120  # big enough that the fill ratios below tell the four shapes apart
COLOUR_OF_RGB = {rgb: name for name, rgb in PALETTE.items()}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def image_paths(record: dict) -> list[str]:
    refs = record.get("image", [])
    return [refs] if isinstance(refs, str) else refs


def questions_of(record: dict) -> list[str]:
    """The human turns of a record without their image placeholders."""
    return [t["value"].split("\n")[-1] for t in record["conversations"] if t["from"] == "human"]


# ---- reading a scene back from pixels alone ---------------------------------------------------------


def classify_shape(mask: np.ndarray) -> str:
    """A shape's kind from how much of its bounding box it fills: square 1, circle pi/4, triangle 1/2,
    five-pointed star (inner radius 0.45) 0.37-0.44."""
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    if fill > 0.9:
        return "square"
    if fill > 0.65:
        return "circle"
    return "triangle" if fill > 0.465 else "star"


def read_scene(image: Image.Image) -> dict[str, tuple[str, str]]:
    """position -> (colour, shape) for every occupied cell of the 3x3 grid, read from the pixels."""
    pixels = np.asarray(image.convert("RGB"))
    cell = pixels.shape[0] / 3
    background = pixels[0, 0]
    scene = {}
    for index, position in enumerate(POSITIONS):
        row, col = divmod(index, 3)
        block = pixels[int(row * cell) : int((row + 1) * cell), int(col * cell) : int((col + 1) * cell)]
        centre = tuple(int(v) for v in pixels[int((row + 0.5) * cell), int((col + 0.5) * cell)])
        if centre == tuple(background):
            assert (block == background).all(), f"{position}: shape pixels but none at the cell centre"
            continue
        colour = COLOUR_OF_RGB[centre]
        mask = (block == PALETTE[colour]).all(axis=-1)
        assert mask.sum() + (block == background).all(axis=-1).sum() == mask.size, "stray colours in a cell"
        scene[position] = (colour, classify_shape(mask))
    return scene


def answer_from_pixels(question: str, scene: dict[str, tuple[str, str]]) -> str:
    """The answer to a generated scene question, worked out from the pixel-read scene."""
    shapes = list(scene.values())
    if question == "How many shapes are there?":
        return str(len(shapes))
    if m := re.fullmatch(r"How many (\w+) shapes are there\?", question):
        return str(sum(colour == m[1] for colour, _ in shapes))
    if m := re.fullmatch(r"How many (\w+)s are there\?", question):
        return str(sum(kind == m[1] for _, kind in shapes))
    if m := re.fullmatch(r"What colour is the (\w+)\?", question):
        (colour,) = [colour for colour, kind in shapes if kind == m[1]]
        return colour
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        (kind,) = [kind for colour, kind in shapes if colour == m[1]]
        return kind
    if m := re.fullmatch(r"Where is the (?:(\w+) )?(\w+)\?", question):
        (position,) = [p for p, (c, k) in scene.items() if k == m[2] and m[1] in (None, c)]
        return position
    raise AssertionError(f"unexpected question {question!r}")


# ---- determinism ------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["distill", "align", "instruct"])
def test_same_seed_writes_byte_identical_files_and_another_seed_differs(tmp_path, stage):
    first = tree_bytes(generate(stage, 12, seed=7, output_dir=tmp_path / "a", image_size=64).parent)
    again = tree_bytes(generate(stage, 12, seed=7, output_dir=tmp_path / "b", image_size=64).parent)
    other = generate(stage, 12, seed=8, output_dir=tmp_path / "c", image_size=64).parent

    assert first == again
    assert first["data.jsonl"] != (other / "data.jsonl").read_bytes()
    first_images = {name: blob for name, blob in first.items() if name.endswith(".png")}
    other_images = {p.read_bytes() for p in (other / "images").glob("*.png")}
    assert not set(first_images.values()) & other_images, "another seed redrew the same images"


def test_a_smaller_corpus_is_a_prefix_of_a_larger_one(tmp_path):
    small = read_jsonl(generate("instruct", 5, seed=1, output_dir=tmp_path / "small", image_size=64))
    large = read_jsonl(generate("instruct", 9, seed=1, output_dir=tmp_path / "large", image_size=64))

    assert large[:5] == small


# ---- record format per stage ------------------------------------------------------------------------


def test_instruct_records_are_conversations_with_answer_and_skill(tmp_path):
    jsonl = generate("instruct", 80, seed=0, output_dir=tmp_path, image_size=64)
    records = read_jsonl(jsonl)

    assert len(records) == 80 and len({r["id"] for r in records}) == 80
    for record in records:
        turns = record["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        paths = image_paths(record)
        assert "".join(t["value"] for t in turns).count("<image>") == len(paths) in (1, 2)
        assert record["answer"] == turns[-1]["value"] and record["answer"] == record["answer"].lower()
        assert record["skill"] in {"colour", "shape", "count", "position", "ocr", "compare"}
        for path in paths:
            with Image.open(jsonl.parent / path) as image:
                assert (image.format, image.mode, image.size) == ("PNG", "RGB", (64, 64))
    assert {r["skill"] for r in records} == {"colour", "shape", "count", "position", "ocr", "compare"}
    assert any(len(r["conversations"]) > 2 for r in records), "no multi-turn record"
    two_image = [r for r in records if isinstance(r["image"], list)]
    assert two_image and all(r["answer"] in ("the first", "the second") for r in two_image)
    assert two_image[0]["conversations"][0]["value"].startswith("Image 1: <image>\nImage 2: <image>\n")


def test_align_records_describe_the_image_and_carry_the_caption(tmp_path):
    records = read_jsonl(generate("align", 20, seed=0, output_dir=tmp_path, image_size=64))

    for record in records:
        assert isinstance(record["image"], str)
        assert record["conversations"] == [
            {"from": "human", "value": f"<image>\n{DESCRIBE_PROMPT}"},
            {"from": "gpt", "value": record["caption"]},
        ]
        assert record["answer"] == record["caption"] and record["skill"] == "caption"
    assert {"scenes", "ocr"} <= {key for r in records for key in r["meta"]}, "align mixes scenes and words"


def test_distill_writes_image_only_records_and_an_unpaired_text_corpus(tmp_path):
    jsonl = generate("distill", 10, seed=0, output_dir=tmp_path, image_size=64)
    records, texts = read_jsonl(jsonl), read_jsonl(tmp_path / "text.jsonl")

    assert all(set(r) == {"id", "image"} and (tmp_path / r["image"]).is_file() for r in records)
    assert len(texts) == 10 and all(set(t) == {"id", "text"} and len(t["text"]) > 20 for t in texts)


@pytest.mark.parametrize(
    "bad",
    [
        {"stage": "pretrain"},
        {"n": 0},
        {"image_size": 8},
        {"phrasing": "heldout"},  # align has no questions to reword
        {"phrasing": "paraphrased"},
        {"skills": ("count",)},  # align asks no skills
        {"skills": ("colour", "smell"), "stage": "instruct"},
        {"skills": (), "stage": "instruct"},
    ],
)
def test_bad_arguments_are_refused_by_name(tmp_path, bad):
    args = {"stage": "align", "n": 2, "seed": 0, "output_dir": tmp_path, "image_size": 64} | bad

    with pytest.raises(ValueError, match=next(iter(bad))):
        generate(**args)


# ---- ground truth against pixels ----------------------------------------------------------------------


def test_every_scene_answer_is_what_the_pixels_show(tmp_path):
    jsonl = generate("instruct", 120, seed=3, output_dir=tmp_path, image_size=SIZE)
    checked = 0
    for record in read_jsonl(jsonl):
        images = [Image.open(jsonl.parent / path) for path in image_paths(record)]
        if "scenes" not in record["meta"]:
            continue
        scenes = [read_scene(image) for image in images]
        for scene, described in zip(scenes, record["meta"]["scenes"]):
            assert scene == {s["position"]: (s["colour"], s["shape"]) for s in described["shapes"]}
        turns = record["conversations"]
        for question, answer in zip(turns[::2], turns[1::2]):
            text = question["value"].split("\n")[-1]
            if record["skill"] == "compare":
                counts = [len(scene) for scene in scenes]
                expected = "the first" if counts[0] > counts[1] else "the second"
            else:
                expected = answer_from_pixels(text, scenes[0])
            assert answer["value"] == expected, f"{record['id']}: {text}"
            checked += 1
    assert checked >= 100


def test_named_shape_centre_pixel_has_the_named_colour(tmp_path):
    records = read_jsonl(generate("align", 30, seed=5, output_dir=tmp_path, image_size=SIZE))
    for record in (r for r in records if "scenes" in r["meta"]):
        pixels = np.asarray(Image.open(tmp_path / record["image"]))
        for shape in record["meta"]["scenes"][0]["shapes"]:
            x0, y0, x1, y1 = shape["box"]
            assert tuple(pixels[(y0 + y1) // 2, (x0 + x1) // 2]) == PALETTE[shape["colour"]]
            assert f"{shape['colour']} {shape['shape']} at the {shape['position']}" in record["caption"]


def test_ocr_images_show_the_word_in_the_named_colour(tmp_path):
    records = read_jsonl(generate("instruct", 60, seed=2, output_dir=tmp_path, image_size=SIZE))
    ocr = [
        r for r in records if r["conversations"][0]["value"].endswith("What word is written in the image?")
    ]

    assert ocr
    for record in ocr:
        facts = record["meta"]["ocr"]
        assert record["conversations"][1]["value"] == facts["word"]
        pixels = np.asarray(Image.open(tmp_path / record["image"]))
        text = (pixels == TEXT_COLOURS[facts["colour"]]).all(axis=-1)
        x0, y0, x1, y1 = facts["box"]
        assert text.sum() > 20, "the word image is blank"
        assert text[y0:y1, x0:x1].sum() == text.sum(), "text pixels outside the word's box"


# ---- held-out phrasing ------------------------------------------------------------------------------

# Every value a template's placeholder can take, over all sources.
EMOJI_NAMES = {
    unicodedata.name(chr(cp), "").lower() for low, high in emoji.EMOJI_RANGES for cp in range(low, high + 1)
} - {""}  # a superset of the emoji labels, found without the font
LABELS = set(fashion_mnist.FASHION_CLASSES) | EMOJI_NAMES
SLOT_VALUES = {
    "colour": set(PALETTE) | set(TEXT_COLOURS),
    "kind": set(SHAPES),
    "label": LABELS,
    "a_label": {labelled._article(label) for label in LABELS},
}
LABELLED_SOURCES = (fashion_mnist.FashionMnistSource, emoji.EmojiSource)
HELDOUT_TABLES = (ShapesSource.heldout, *(source.heldout for source in LABELLED_SOURCES))


def fill_all(template: str) -> set[str]:
    """`template` filled with every combination of its placeholders' values."""
    fields = sorted({name for _, name, _, _ in string.Formatter().parse(template) if name})
    combos = product(*(SLOT_VALUES[name] for name in fields))
    return {template.format(**dict(zip(fields, values))) for values in combos}


def all_questions(templates: Iterable[str], suffixes: Iterable[str] = ("",)) -> set[str]:
    return {f"{q} {suffix}".strip() for t in templates for q in fill_all(t) for suffix in suffixes}


def train_questions() -> set[str]:
    """Every question training phrasing can ask: the templates the held-out tables paraphrase (the tests
    below check that the generators ask nothing else) and the align prompt."""
    return all_questions(t for table in HELDOUT_TABLES for t in table.questions) | {DESCRIBE_PROMPT}


def paraphrases() -> set[str]:
    return {p for table in HELDOUT_TABLES for templates in table.questions.values() for p in templates}


def heldout_questions() -> set[str]:
    """Every held-out question: each paraphrase alone or followed by any answer-form instruction."""
    forms = {
        f for table in HELDOUT_TABLES for skill_forms in table.answer_forms.values() for f in skill_forms
    }
    return all_questions(paraphrases(), {""} | forms)


def normalise(question: str) -> str:
    return " ".join(question.lower().strip(string.punctuation + string.whitespace).split())


def test_no_heldout_question_is_a_question_training_can_ask():
    train, heldout = train_questions(), heldout_questions()

    assert len(train) > 5_000 and len(heldout) > 200_000  # the label templates over ~1,300 emoji names
    assert not train & heldout
    assert not {normalise(q) for q in train} & {normalise(q) for q in heldout}, "equal up to case/punctuation"
    for source in LABELLED_SOURCES:  # every question template of the labelled sources has paraphrases
        t = source.templates
        asked = {*t.questions, t.verify, t.compare, *t.groups}
        assert asked <= set(source.heldout.questions), source.name


def test_generated_questions_are_the_enumerated_ones_train_or_heldout(tmp_path):
    train = read_jsonl(generate("instruct", 300, seed=6, output_dir=tmp_path / "train", image_size=48))
    heldout = read_jsonl(
        generate("instruct", 300, seed=6, output_dir=tmp_path / "heldout", image_size=48, phrasing="heldout")
    )
    train_set, heldout_set = train_questions(), heldout_questions()

    assert {q for r in train for q in questions_of(r)} <= train_set
    asked = [q for r in heldout for q in questions_of(r)]
    assert set(asked) <= heldout_set
    assert {r["skill"] for r in heldout} == {"colour", "shape", "count", "position", "ocr", "compare"}
    bare = all_questions(paraphrases())
    with_form = [q for q in asked if q not in bare]
    assert 0.3 < len(with_form) / len(asked) < 0.7, "about half the held-out questions say the answer's form"


def test_heldout_records_show_the_same_scene_and_answer_the_same_as_train_ones(tmp_path):
    train_jsonl = generate("instruct", 120, seed=4, output_dir=tmp_path / "train", image_size=48)
    heldout_jsonl = generate(
        "instruct", 120, seed=4, output_dir=tmp_path / "heldout", image_size=48, phrasing="heldout"
    )
    again = generate(
        "instruct", 120, seed=4, output_dir=tmp_path / "again", image_size=48, phrasing="heldout"
    )

    assert tree_bytes(heldout_jsonl.parent) == tree_bytes(again.parent), "held-out phrasing is deterministic"
    assert tree_bytes(heldout_jsonl.parent / "images") == tree_bytes(train_jsonl.parent / "images")
    for ours, theirs in zip(read_jsonl(heldout_jsonl), read_jsonl(train_jsonl), strict=True):
        assert (ours["id"], ours["image"], ours["skill"], ours["answer"]) == (
            theirs["id"], theirs["image"], theirs["skill"], theirs["answer"]
        )  # fmt: skip
        assert ours["meta"] == theirs["meta"] | {"phrasing": "heldout"}
        assert ours["conversations"][1::2] == theirs["conversations"][1::2]  # the answers, turn by turn
        assert all(a != b for a, b in zip(questions_of(ours), questions_of(theirs), strict=True))
        assert ours["conversations"][0]["value"].count("<image>") == len(image_paths(ours))


def test_balanced_skills_give_a_hundred_records_of_each(tmp_path):
    skills = ("colour", "shape", "count")
    jsonl = generate(
        "instruct", 300, seed=0, output_dir=tmp_path, image_size=48, phrasing="heldout", skills=skills
    )
    records = read_jsonl(jsonl)

    assert Counter(r["skill"] for r in records) == {"colour": 100, "shape": 100, "count": 100}
    assert [r["skill"] for r in records[:6]] == list(skills) * 2


def test_balanced_records_still_answer_what_the_pixels_show(tmp_path):
    skills = ("colour", "shape", "position", "count")
    jsonl = generate("instruct", 60, seed=9, output_dir=tmp_path, image_size=SIZE, skills=skills)
    for record in read_jsonl(jsonl):
        scene = read_scene(Image.open(jsonl.parent / record["image"]))
        for question, answer in zip(questions_of(record), record["conversations"][1::2]):
            assert answer["value"] == answer_from_pixels(question, scene), f"{record['id']}: {question}"


def write_fake_fashion_mnist(folder: Path, n: int = 300) -> None:
    """Gzipped IDX files of the Fashion-MNIST test split: noise images, labels cycling through the classes."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = np.arange(n, dtype=np.uint8) % len(fashion_mnist.FASHION_CLASSES)
    image_file, label_file = fashion_mnist.FASHION_MNIST_FILES["test"]
    header = struct.pack(">HBB3I", 0, 8, 3, n, 28, 28)
    (folder / image_file).write_bytes(gzip.compress(header + images.tobytes()))
    (folder / label_file).write_bytes(gzip.compress(struct.pack(">HBBI", 0, 8, 1, n) + labels.tobytes()))


def test_fashion_mnist_heldout_phrasing_rewords_every_question_of_the_same_records(
    tmp_path, monkeypatch, fresh_asset_caches
):
    monkeypatch.setattr(fashion_mnist, "FASHION_MNIST_DIR", tmp_path / "fashion-mnist")
    write_fake_fashion_mnist(fashion_mnist.FASHION_MNIST_DIR)
    args = {"n": 60, "seed": 2, "split": "test", "stage": "instruct", "image_size": 48}
    train = read_jsonl(fashion_mnist.import_fashion_mnist(tmp_path / "train", **args))
    heldout = read_jsonl(fashion_mnist.import_fashion_mnist(tmp_path / "heldout", **args, phrasing="heldout"))
    train_set, heldout_set = train_questions(), heldout_questions()

    assert {"class", "verify", "category", "compare"} <= {r["skill"] for r in heldout}
    for ours, theirs in zip(heldout, train, strict=True):
        assert (ours["skill"], ours["answer"]) == (theirs["skill"], theirs["answer"])
        assert ours["meta"] == theirs["meta"] | {"phrasing": "heldout"}
        assert ours["conversations"][1::2] == theirs["conversations"][1::2]
        assert set(questions_of(theirs)) <= train_set and set(questions_of(ours)) <= heldout_set


# ---- importers (Debian packages) --------------------------------------------------------------------

needs_fashion_mnist = pytest.mark.skipif(
    not fashion_mnist.FASHION_MNIST_DIR.is_dir(),
    reason="dataset-fashion-mnist is not installed: sudo apt-get install -y dataset-fashion-mnist",
)
needs_emoji_font = pytest.mark.skipif(
    not emoji.EMOJI_FONT.is_file(),
    reason="fonts-noto-color-emoji is not installed: sudo apt-get install -y fonts-noto-color-emoji",
)


@pytest.fixture
def fresh_asset_caches():
    """Loaders cache per process; a test that points them elsewhere must not leave its result behind."""
    caches = (fashion_mnist.load_fashion_mnist, emoji._emoji_font, emoji.renderable_emoji)
    for cached in caches:
        cached.cache_clear()
    yield
    for cached in caches:
        cached.cache_clear()


@needs_fashion_mnist
def test_fashion_mnist_answers_are_the_dataset_labels(tmp_path):
    jsonl = fashion_mnist.import_fashion_mnist(
        tmp_path, 40, seed=0, split="test", stage="instruct", image_size=56
    )
    images, labels = fashion_mnist.load_fashion_mnist("test")

    records = read_jsonl(jsonl)
    assert len(records) == 40
    for record in records:
        facts = record["meta"]["images"] if "images" in record["meta"] else [record["meta"]]
        for path, fact in zip(image_paths(record), facts):
            true_class = fashion_mnist.FASHION_CLASSES[labels[fact["index"]]]
            assert fact["class"] == true_class
            back = np.asarray(Image.open(tmp_path / path).convert("L").resize((28, 28), Image.Resampling.BOX))
            assert np.abs(back.astype(int) - images[fact["index"]]).mean() < 12, (
                "image is not the indexed one"
            )
        if record["skill"] == "class":
            assert record["answer"] == facts[0]["class"]
        if record["skill"] == "compare":
            shown = re.fullmatch(
                r".*Which image shows an? (.+)\?", record["conversations"][0]["value"], re.S
            )[1]
            assert facts[("the first", "the second").index(record["answer"])]["class"] == shown


@needs_fashion_mnist
@pytest.mark.parametrize("stage", ["align", "distill"])
def test_fashion_mnist_is_deterministic_for_every_stage(tmp_path, stage):
    first = fashion_mnist.import_fashion_mnist(
        tmp_path / "a", 8, seed=4, split="test", stage=stage, image_size=56
    )
    again = fashion_mnist.import_fashion_mnist(
        tmp_path / "b", 8, seed=4, split="test", stage=stage, image_size=56
    )

    assert tree_bytes(first.parent) == tree_bytes(again.parent)
    if stage == "align":
        for record in read_jsonl(first):
            assert record["meta"]["class"] in record["caption"] and record["answer"] == record["caption"]


@needs_emoji_font
def test_emoji_records_are_named_by_unicode_and_drawn(tmp_path):
    jsonl = emoji.import_emoji(tmp_path, 20, seed=0, stage="instruct", image_size=64)
    again = emoji.import_emoji(tmp_path / "again", 20, seed=0, stage="instruct", image_size=64)

    assert jsonl.read_bytes() == again.read_bytes()
    for record in read_jsonl(jsonl):
        facts = record["meta"]["images"] if "images" in record["meta"] else [record["meta"]]
        for path, fact in zip(image_paths(record), facts):
            assert fact["name"] == unicodedata.name(chr(int(fact["codepoint"][2:], 16))).lower()
            pixels = np.asarray(Image.open(tmp_path / path))
            assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10, "the emoji image is blank"
        if record["skill"] == "emoji":
            assert record["answer"] == facts[0]["name"]


@needs_emoji_font
def test_emoji_heldout_phrasing_asks_the_same_records_in_other_words(tmp_path):
    train = read_jsonl(emoji.import_emoji(tmp_path / "train", 30, seed=1, image_size=48))
    heldout = read_jsonl(
        emoji.import_emoji(tmp_path / "heldout", 30, seed=1, image_size=48, phrasing="heldout")
    )

    for ours, theirs in zip(heldout, train, strict=True):
        assert ours["conversations"][1::2] == theirs["conversations"][1::2]
        assert ours["meta"] == theirs["meta"] | {"phrasing": "heldout"}
        assert not set(questions_of(ours)) & set(questions_of(theirs))


def test_missing_debian_packages_name_the_apt_get_command(tmp_path, monkeypatch, fresh_asset_caches):
    monkeypatch.setattr(fashion_mnist, "FASHION_MNIST_DIR", tmp_path / "no-fashion-mnist")
    monkeypatch.setattr(emoji, "EMOJI_FONT", tmp_path / "NoEmoji.ttf")

    with pytest.raises(MissingPackageError, match="apt-get install -y dataset-fashion-mnist"):
        fashion_mnist.import_fashion_mnist(tmp_path / "out", 2, seed=0)
    with pytest.raises(MissingPackageError, match="apt-get install -y fonts-noto-color-emoji"):
        emoji.import_emoji(tmp_path / "out", 2, seed=0)


# ---- the job ----------------------------------------------------------------------------------------


def test_python_m_jobs_synth_writes_the_corpus_and_ends_with_a_json_summary(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "jobs.synth", "--stage", "instruct", "--n", "6", "--seed", "1"]
        + ["--output", str(tmp_path), "--image-size", "64"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    records = read_jsonl(Path(summary["output"]))
    n_images = sum(len(image_paths(r)) for r in records)
    assert summary == {
        "output": str(tmp_path / "data.jsonl"),
        "records": 6,
        "images": n_images,
        "stage": "instruct",
        "source": "shapes",
        "phrasing": "train",
    }
    assert n_images == len(list((tmp_path / "images").glob("*.png")))


def test_synth_job_reports_the_distill_text_corpus_and_refuses_bad_sizes(tmp_path, capsys):
    assert (
        synth.main(["--stage", "distill", "--n", "3", "--output", str(tmp_path), "--image-size", "48"]) == 0
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["records"] == summary["images"] == 3 and summary["text"] == str(tmp_path / "text.jsonl")

    assert synth.main(["--stage", "align", "--n", "2", "--output", str(tmp_path), "--image-size", "8"]) == 2
    assert "image_size must be at least" in capsys.readouterr().err


def test_synth_job_writes_a_balanced_heldout_phrasing_set_and_refuses_it_where_it_cannot(tmp_path, capsys):
    common = ["--n", "4", "--output", str(tmp_path), "--image-size", "48"]
    assert (
        synth.main(["--stage", "instruct", *common, "--phrasing", "heldout", "--skills", "count", "ocr"]) == 0
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    records = read_jsonl(Path(summary["output"]))

    assert summary["phrasing"] == "heldout"
    assert [r["skill"] for r in records] == ["count", "ocr"] * 2
    assert all(r["meta"]["phrasing"] == "heldout" for r in records)
    assert not {q for r in records for q in questions_of(r)} & train_questions()

    assert synth.main(["--stage", "align", *common, "--phrasing", "heldout"]) == 2
    assert "phrasing 'heldout'" in capsys.readouterr().err
    assert synth.main(["--stage", "instruct", *common, "--source", "emoji", "--skills", "count"]) == 2
    assert "--skills" in capsys.readouterr().err
