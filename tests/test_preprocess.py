"""pipelines.preprocess: every bad-input case quarantined with its reason while the good records of the same
input come through; image conversions; the three stages' samples; the token budget; split and dedup."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from model import build_processor, load_preset
from model.processor import IGNORE_INDEX
from pipelines.preprocess import ALIGN_PROMPTS, PrepareContext, align_prompt, assign_split, preprocess_row
from pipelines.readers import read_unit
from pipelines.schema import REJECT_SCHEMA, SHARD_SCHEMA, encode_payload, raw_row
from pipelines.settings import PrepareSettings
from pipelines.sources import discover_units
from pipelines.validate import RejectedSample, decode_image
from tests.helpers import build_context, shapes_image

TOKENS_PER_TILE = 4  # model/configs/tiny.yaml: 28 px tiles -> 4 image tokens


@pytest.fixture(scope="module")
def processor():
    return build_processor(load_preset("tiny"))


@pytest.fixture
def make_ctx(processor):
    def make(stage: str = "instruct", **settings) -> PrepareContext:
        return PrepareContext(stage, PrepareSettings(val_fraction=0.0, **settings), processor)

    return make


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def noise(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def forged_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height (CRC fixed): a decompression bomb's signature."""
    data = bytearray(encode(noise(8, 8)))
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def flip_bytes(data: bytes, start: int, stop: int) -> bytes:
    out = bytearray(data)
    for index in range(start, stop):
        out[index] ^= 0xFF
    return bytes(out)


def chat(question: str = "<image>\nWhat is in the picture?", answer: str = "shapes") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def run(input_uri: str, ctx: PrepareContext) -> tuple[dict[str, dict], dict[str, dict]]:
    """discover -> read -> preprocess: (shards by id, rejects by id), both checked against their schemas."""
    shards, rejects = {}, {}
    for unit in discover_units(input_uri):
        for raw in read_unit(unit):
            shard, reject = preprocess_row(raw, ctx)
            assert (shard is None) != (reject is None)
            if shard is not None:
                shards[shard["id"].rsplit("/", 1)[-1]] = shard
            else:
                rejects[reject["id"].rsplit("/", 1)[-1]] = reject
    pa.Table.from_pylist(list(shards.values()), schema=SHARD_SCHEMA)
    pa.Table.from_pylist(list(rejects.values()), schema=REJECT_SCHEMA)
    return shards, rejects


def corpus_with(
    tmp_path: Path, bad_image: bytes | None, bad_record: dict | None = None, name: str = "bad.jpg"
) -> str:
    """A JSONL of two good conversations around one bad record (a `bad_image` file, or `bad_record`)."""
    (tmp_path / "good.png").write_bytes(encode(shapes_image(seed=1)))
    if bad_image is not None:
        (tmp_path / name).write_bytes(bad_image)
    records = [
        {"id": "good1", "image": "good.png", "conversations": chat()},
        bad_record or {"id": "bad", "image": name, "conversations": chat()},
        {"id": "good2", "image": "good.png", "conversations": chat(answer="still shapes")},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(record) for record in records) + "\n")
    return str(path)


def assert_quarantined(input_uri: str, ctx: PrepareContext, reason: str) -> dict:
    shards, rejects = run(input_uri, ctx)
    assert set(shards) == {"good1", "good2"}, rejects
    assert list(rejects) == ["bad"] and rejects["bad"]["reason"] == reason, rejects
    assert rejects["bad"]["detail"] and rejects["bad"]["source"] == input_uri
    return rejects["bad"]


def image_tile(shard: dict, index: int = 0) -> Image.Image:
    return Image.open(io.BytesIO(shard["tiles"][index]))


def supervised_text(shard: dict, processor) -> str:
    return processor.tokenizer.decode([t for t in shard["labels"] if t != IGNORE_INDEX])


# ---- bad images ----------------------------------------------------------------------------------------

JPEG = encode(noise(), "JPEG")
PNG = encode(noise())


@pytest.mark.parametrize(
    ("case", "data", "reason"),
    [
        ("corrupt_jpeg", JPEG[:3] + bytes(range(256)) * 4, "corrupt_image"),
        ("corrupt_jpeg_header", flip_bytes(JPEG, 4, 40), "corrupt_image"),
        ("truncated_jpeg", JPEG[: len(JPEG) // 2], "truncated_image"),
        ("corrupt_png", flip_bytes(PNG, len(PNG) // 2, len(PNG) // 2 + 64), "corrupt_image"),
        ("truncated_png", PNG[: len(PNG) // 2], "truncated_image"),
        ("zero_bytes", b"", "empty_file"),
        ("text_named_jpg", b"<html>this is not a picture</html>", "not_an_image"),
        ("bomb_header", forged_png(100_000, 100_000), "decompression_bomb"),  # Pillow's own limit
        ("bomb_settings", forged_png(9_000, 9_000), "decompression_bomb"),  # 81 Mpx > max_image_pixels
    ],
)
def test_bad_image_is_quarantined_and_the_rest_survives(tmp_path, make_ctx, case, data, reason):
    assert_quarantined(corpus_with(tmp_path, data), make_ctx(max_image_pixels=40_000_000), reason)


def test_bomb_is_caught_from_the_header_before_decoding(monkeypatch):
    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    bomb = forged_png(6_000, 6_000)
    monkeypatch.setattr(Image.Image, "load", no_decoding)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_decoding)
    with pytest.raises(RejectedSample) as caught:
        decode_image(bomb, max_pixels=1_000_000)
    assert caught.value.reason == "decompression_bomb"


def test_missing_image_file_is_quarantined(tmp_path, make_ctx):
    assert_quarantined(corpus_with(tmp_path, None, name="nowhere.png"), make_ctx(), "missing_image")


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink_out"])
def test_image_path_escaping_the_root_is_an_unsafe_path(tmp_path, make_ctx, how):
    root = tmp_path / "dataset"
    root.mkdir()
    secret = tmp_path / "secret.png"
    secret.write_bytes(encode(shapes_image()))
    os.symlink(secret, root / "innocent.png")
    ref = {"dotdot": "../secret.png", "absolute": str(secret), "symlink_out": "innocent.png"}[how]
    record = {"id": "bad", "image": ref, "conversations": chat()}
    reject = assert_quarantined(corpus_with(root, None, record), make_ctx(), "unsafe_path")
    assert "secret" in reject["detail"] or "innocent" in reject["detail"]


def test_symlink_out_of_an_image_folder_is_an_unsafe_path(tmp_path, make_ctx):
    folder = tmp_path / "captions"
    folder.mkdir()
    (tmp_path / "private.png").write_bytes(encode(shapes_image()))
    (folder / "good.png").write_bytes(encode(shapes_image()))
    (folder / "good.txt").write_text("shapes")
    os.symlink(tmp_path / "private.png", folder / "leak.png")
    (folder / "leak.txt").write_text("shapes")
    shards, rejects = run(str(folder), make_ctx("align"))
    assert set(shards) == {"good.png"} and rejects["leak.png"]["reason"] == "unsafe_path"


@pytest.mark.parametrize(
    ("mode", "make"),
    [
        ("CMYK", lambda: encode(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG")),
        ("I;16", lambda: encode(Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16)))),
        (
            "P",
            lambda: encode(
                Image.new("RGB", (40, 30), (255, 0, 0)).convert("P", palette=Image.Palette.ADAPTIVE)
            ),
        ),
        ("RGBA", lambda: encode(Image.new("RGBA", (40, 30), (255, 0, 0, 0)))),
        ("LA", lambda: encode(Image.new("LA", (40, 30), (0, 0)))),
        ("L", lambda: encode(Image.new("L", (40, 30), 77))),
    ],
)
def test_unusual_pixel_formats_become_rgb(tmp_path, make_ctx, mode, make):
    data = make()
    assert Image.open(io.BytesIO(data)).mode == mode
    shards, rejects = run(corpus_with(tmp_path, data), make_ctx())
    assert not rejects and set(shards) == {"good1", "bad", "good2"}
    tile = image_tile(shards["bad"])
    assert tile.mode == "RGB" and tile.size == (28, 28)
    red, green, blue = tile.getpixel((14, 14))
    expected = {
        "CMYK": lambda: red > 200 and green < 60 and blue < 60,  # C=0, M=Y=255 is red
        "I;16": lambda: red == green == blue and 150 < red < 160,  # 40000 / 257 = 155.6
        "P": lambda: (red, green, blue) == (255, 0, 0),
        "RGBA": lambda: (red, green, blue) == (255, 255, 255),  # transparent -> white
        "LA": lambda: (red, green, blue) == (255, 255, 255),
        "L": lambda: (red, green, blue) == (77, 77, 77),
    }[mode]
    assert expected(), (mode, red, green, blue)


def test_exif_rotated_photo_is_turned_upright(tmp_path, make_ctx):
    stored = Image.new("RGB", (56, 28), (255, 0, 0))  # landscape as stored: top red, bottom blue
    stored.paste((0, 0, 255), (0, 14, 56, 28))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    data = encode(stored, "JPEG", exif=exif, quality=95)

    upright = decode_image(data, max_pixels=10**6)
    assert upright.size == (28, 56)  # portrait once turned
    assert upright.getpixel((3, 28))[2] > 200 and upright.getpixel((24, 28))[0] > 200  # blue left, red right

    shards, rejects = run(corpus_with(tmp_path, data), make_ctx())
    assert not rejects and shards["bad"]["tiles_per_image"] == [3]  # 1 x 2 grid + thumbnail
    top = image_tile(shards["bad"], 0)
    assert top.getpixel((3, 14))[2] > 200 and top.getpixel((24, 14))[0] > 200


# ---- bad records ---------------------------------------------------------------------------------------


def test_invalid_utf8_and_json_lines_are_quarantined(tmp_path, make_ctx):
    (tmp_path / "good.png").write_bytes(encode(shapes_image()))
    good = json.dumps({"id": "good", "image": "good.png", "conversations": chat()}).encode()
    (tmp_path / "data.jsonl").write_bytes(b"\n".join([good, b'{"id": "caf\xe9"}', b"{oops", good]) + b"\n")
    shards, rejects = run(str(tmp_path / "data.jsonl"), make_ctx())
    assert set(shards) == {"good", "good@L4"}
    assert {key: reject["reason"] for key, reject in rejects.items()} == {
        "L2": "invalid_utf8",
        "L3": "invalid_json",
    }


@pytest.mark.parametrize(
    ("conversations", "reason"),
    [
        ([{"from": "robot", "value": "<image>\nhi"}, {"from": "gpt", "value": "x"}], "unknown_role"),
        ([{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "  "}], "empty_turn"),
        ([{"from": "human", "value": "<image>\nhi"}], "bad_turn_order"),
        ([{"from": "human", "value": "<image>\nhi"}, {"from": "gpt"}], "invalid_record"),
        (
            [{"from": "human", "value": "<image><IMG_CONTEXT>"}, {"from": "gpt", "value": "x"}],
            "invalid_record",
        ),
    ],
)
def test_bad_turns_are_quarantined(tmp_path, make_ctx, conversations, reason):
    record = {"id": "bad", "image": "good.png", "conversations": conversations}
    assert_quarantined(corpus_with(tmp_path, None, record), make_ctx(), reason)


@pytest.mark.parametrize(
    ("images", "question"),
    [(["good.png", "good.png"], "<image>\nOne placeholder, two images"), ([], "<image>\nNo image at all")],
)
def test_image_count_mismatch_is_quarantined(tmp_path, make_ctx, images, question):
    record = {"id": "bad", "image": images, "conversations": chat(question)}
    assert_quarantined(corpus_with(tmp_path, None, record), make_ctx(), "image_count_mismatch")


def test_one_image_without_placeholder_gets_one_before_the_first_question(tmp_path, make_ctx, processor):
    record = {"id": "implicit", "image": "good.png", "conversations": chat("What colour is it?")}
    shards, rejects = run(corpus_with(tmp_path, None, record), make_ctx())
    assert not rejects
    text = processor.tokenizer.decode(shards["implicit"]["input_ids"])
    assert "<|im_start|>user\n<img><IMG_CONTEXT>" in text and "</img>\nWhat colour is it?<|im_end|>" in text


# ---- stages --------------------------------------------------------------------------------------------


def raw(kind: str, payload: str, root: Path | str = "", refs=(), blobs=(), sample_id: str = "src/r1") -> dict:
    return raw_row(id=sample_id, source="src", unit="src#0", root=str(root), kind=kind, payload=payload,
                   image_refs=list(refs), image_bytes=list(blobs))  # fmt: skip


def image_raw(sample_id: str = "src/img", seed: int = 0) -> dict:
    return raw("image", encode_payload(), blobs=[encode(shapes_image(seed=seed))], sample_id=sample_id)


def test_distill_random_text_is_seeded_ordinary_tokens_after_one_image_block(make_ctx, processor):
    ctx = make_ctx("distill", distill_text="random", distill_text_tokens=20, seed=3)
    shard, _ = preprocess_row(image_raw(), ctx)
    ids = shard["input_ids"]
    context = processor.image_context_token_id
    block = 2 + TOKENS_PER_TILE * sum(shard["tiles_per_image"])
    assert (
        ids[0] == processor.image_token_ids["<img>"] and ids[block - 1] == processor.image_token_ids["</img>"]
    )
    assert ids[1 : block - 1] == [context] * (block - 2)
    text = ids[block:]
    assert len(text) == 20 and all(0 <= t < 256 for t in text)  # byte tokens only, no specials
    assert shard["labels"] == [IGNORE_INDEX] * len(ids)
    assert preprocess_row(image_raw(), ctx)[0]["input_ids"] == ids  # seeded by (seed, id)
    assert preprocess_row(image_raw("src/other"), ctx)[0]["input_ids"][block:] != text
    reseeded = make_ctx("distill", distill_text="random", distill_text_tokens=20, seed=4)
    assert preprocess_row(image_raw(), reseeded)[0]["input_ids"][block:] != text
    # a caption's text is ignored: same image, same id -> same sample
    caption = raw(
        "caption", encode_payload(caption="ignored"), blobs=[encode(shapes_image())], sample_id="src/img"
    )
    assert preprocess_row(caption, ctx)[0]["input_ids"] == ids


def test_distill_corpus_text_is_a_window_of_the_document(make_ctx, processor):
    ctx = make_ctx("distill", distill_text="corpus", distill_text_tokens=16)
    document = "The quick brown fox jumps over the lazy dog. " * 4
    shard, _ = preprocess_row(raw("text", encode_payload(text=document)), ctx)
    assert shard["num_tokens"] == 16 and shard["tiles"] == [] and shard["tiles_per_image"] == []
    assert processor.tokenizer.decode(shard["input_ids"]) in document
    assert set(shard["labels"]) == {IGNORE_INDEX}
    short, _ = preprocess_row(raw("text", encode_payload(text="tiny <|im_end|>")), ctx)
    assert processor.tokenizer.decode(short["input_ids"]) == "tiny <|im_end|>"  # specials stay plain text
    assert processor.tokenizer.eos_token_id not in short["input_ids"]
    image_only, _ = preprocess_row(image_raw(), ctx)
    assert image_only["input_ids"][-1] == processor.image_token_ids["</img>"]  # no text with corpus mode
    _, reject = preprocess_row(raw("text", encode_payload(text="  ")), ctx)
    assert reject["reason"] == "no_content"


def test_align_caption_sample_supervises_exactly_the_caption(tmp_path, make_ctx, processor):
    (tmp_path / "x.png").write_bytes(encode(shapes_image()))
    (tmp_path / "x.txt").write_text("  a red ellipse and rectangles \n")
    shards, rejects = run(str(tmp_path), make_ctx("align"))
    assert not rejects
    shard = shards["x.png"]
    assert supervised_text(shard, processor) == "a red ellipse and rectangles<|im_end|>"
    text = processor.tokenizer.decode(shard["input_ids"])
    prompt = align_prompt(shard["id"])
    assert prompt in ALIGN_PROMPTS and f"</img>\n{prompt}<|im_end|>" in text
    assert shard["input_ids"].count(processor.image_context_token_id) == TOKENS_PER_TILE * len(shard["tiles"])
    assert len({align_prompt(f"id{i}") for i in range(50)}) == len(ALIGN_PROMPTS)  # all templates get used


def test_align_rejects_images_without_text(make_ctx):
    _, reject = preprocess_row(image_raw(), make_ctx("align"))
    assert reject["reason"] == "no_content"
    _, reject = preprocess_row(raw("caption", encode_payload(caption=""), blobs=[b"x"]), make_ctx("align"))
    assert reject["reason"] == "empty_turn"


def test_instruct_multi_image_labels_only_on_assistant_turns(tmp_path, make_ctx, processor):
    shapes_image(56, 28, seed=1).save(tmp_path / "wide.png")
    shapes_image(28, 28, seed=2).save(tmp_path / "square.png")
    conversations = [
        {"from": "system", "value": "You look at pictures."},
        {"from": "human", "value": "<image>\nFirst one?"},
        {"from": "gpt", "value": "wide shapes"},
        {"from": "human", "value": "And <image>?"},
        {"from": "gpt", "value": "a square"},
    ]
    payload = encode_payload(conversations=conversations)
    shard, reject = preprocess_row(
        raw("conversation", payload, tmp_path, ["wide.png", "square.png"]), make_ctx()
    )
    assert reject is None
    assert shard["tiles_per_image"] == [3, 1] and len(shard["tiles"]) == 4
    assert shard["input_ids"].count(processor.image_context_token_id) == TOKENS_PER_TILE * 4
    assert supervised_text(shard, processor) == "wide shapes<|im_end|>a square<|im_end|>"
    for token, label in zip(shard["input_ids"], shard["labels"]):
        assert label in (IGNORE_INDEX, token)
    assert shard["num_tokens"] == len(shard["input_ids"]) == len(shard["labels"])
    assert not shard["truncated"]


# ---- token budget --------------------------------------------------------------------------------------


def two_image_sample(tmp_path: Path) -> dict:
    shapes_image(28, 28, seed=1).save(tmp_path / "a.png")
    shapes_image(28, 28, seed=2).save(tmp_path / "b.png")
    conversations = [
        {"from": "human", "value": "<image>\nFirst?"},
        {"from": "gpt", "value": "the first answer"},
        {"from": "human", "value": "Second <image> please, with a long question to make this sample long."},
        {"from": "gpt", "value": "the second answer"},
    ]
    return raw("conversation", encode_payload(conversations=conversations), tmp_path, ["a.png", "b.png"])


def test_overflow_reject_counts_the_sample_as_too_long(tmp_path, make_ctx):
    full, _ = preprocess_row(two_image_sample(tmp_path), make_ctx())
    _, reject = preprocess_row(two_image_sample(tmp_path), make_ctx(max_tokens=full["num_tokens"] - 1))
    assert reject["reason"] == "too_long" and str(full["num_tokens"]) in reject["detail"]
    fits, _ = preprocess_row(two_image_sample(tmp_path), make_ctx(max_tokens=full["num_tokens"]))
    assert fits is not None and not fits["truncated"]


def test_overflow_truncate_never_cuts_inside_an_image_block(tmp_path, make_ctx, processor):
    full, _ = preprocess_row(two_image_sample(tmp_path), make_ctx())
    ids = full["input_ids"]
    second_start = [i for i, t in enumerate(ids) if t == processor.image_token_ids["<img>"]][1]
    budget = second_start + 3  # the cut would fall inside the second image's block

    shard, _ = preprocess_row(two_image_sample(tmp_path), make_ctx(max_tokens=budget, overflow="truncate"))
    assert shard["truncated"] and shard["num_tokens"] == second_start
    assert shard["input_ids"] == ids[:second_start] and shard["labels"] == full["labels"][:second_start]
    assert shard["tiles_per_image"] == [1] and shard["tiles"] == full["tiles"][:1]  # the cut image goes
    assert shard["input_ids"].count(processor.image_context_token_id) == TOKENS_PER_TILE
    assert supervised_text(shard, processor) == "the first answer<|im_end|>"

    answer_start = full["labels"].index(next(t for t in full["labels"] if t != IGNORE_INDEX))
    _, reject = preprocess_row(
        two_image_sample(tmp_path), make_ctx(max_tokens=answer_start, overflow="truncate")
    )
    assert reject["reason"] == "too_long" and "nothing to train on" in reject["detail"]


def test_distill_truncates_text_but_never_the_image(make_ctx):
    ctx = make_ctx("distill", distill_text_tokens=64, max_tokens=30, overflow="truncate")
    shard, _ = preprocess_row(image_raw(), ctx)  # 56x28: 3 tiles -> 14-token block + 16 text tokens
    assert shard["truncated"] and shard["num_tokens"] == 30 and shard["tiles_per_image"] == [3]
    small = make_ctx("distill", distill_text_tokens=64, max_tokens=16, overflow="truncate")
    big = raw("image", encode_payload(), blobs=[encode(shapes_image(112, 28))])  # 4 tiles + thumb: 22 tokens
    _, reject = preprocess_row(big, small)
    assert reject["reason"] == "too_long"


# ---- split, dedup, batches, context --------------------------------------------------------------------


def test_split_is_a_stable_hash_of_the_base_id():
    splits = [assign_split(f"source/{i}", 0.1) for i in range(4000)]
    assert splits == [assign_split(f"source/{i}", 0.1) for i in range(4000)]
    assert 0.08 < splits.count("val") / 4000 < 0.12
    assert all(assign_split(f"source/{i}#rep1", 0.1) == splits[i] for i in range(200))  # copies follow
    assert set(splits) | {assign_split("x", 0.0)} == {"train", "val"}


def test_dedup_key_is_shared_by_exact_duplicates_only(make_ctx):
    ctx = make_ctx("align")

    def key(sample_id: str, caption: str, seed: int = 0) -> str:
        row = raw(
            "caption",
            encode_payload(caption=caption),
            blobs=[encode(shapes_image(seed=seed))],
            sample_id=sample_id,
        )
        return preprocess_row(row, ctx)[0]["dedup_key"]

    prompt_a = align_prompt("a/1")
    same_prompt = next(f"b/{i}" for i in range(100) if align_prompt(f"b/{i}") == prompt_a)
    assert key("a/1", "a cat") == key(same_prompt, "a cat")  # same image bytes, same text
    assert key("a/1", "a cat") != key(same_prompt, "a dog")
    assert key("a/1", "a cat") != key(same_prompt, "a cat", seed=5)
    assert key("a/1", "a cat") != key("a/1#rep1", "a cat")  # a repeat copy survives de-duplication


def test_context_from_a_presets_processor_checks_the_stage():
    ctx = build_context("tiny", "align", max_tokens=512)
    assert ctx.settings.max_tokens == 512 and ctx.processor.image_tokens_per_tile == TOKENS_PER_TILE
    assert len(ctx.processor_hash) == 64 and len(ctx.config_hash) == 64
    assert build_context("tiny", "distill").processor_hash == ctx.processor_hash
    with pytest.raises(ValueError, match="unknown stage"):
        build_context("tiny", "pretrain")
