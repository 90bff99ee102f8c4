"""Sequence packing: hand-checked packs and rows, and a sample computes the same logits packed or alone."""

from __future__ import annotations

import pytest
import torch

from pipelines.packing import (
    IGNORE_INDEX,
    PackOverflow,
    StreamPacker,
    collate_packed,
    collate_padded,
    pack_sequences,
    packing_efficiency,
)
from tests.helpers import shapes_image, tiny_model

PAD = 0


def sample(ids: list[int], labels: list[int], tiles: int = 0, value: float = 0.0) -> dict:
    """A hand-made sample; its tiles are filled with `value` so their order can be read back."""
    pixels = torch.full((tiles, 3, 2, 2), value) if tiles else None
    return {"input_ids": ids, "labels": labels, "pixel_values": pixels}


# ---- pack_sequences ---------------------------------------------------------------------------------------
def test_first_fit_fills_earlier_packs_first_and_keeps_order():
    # 5 -> pack 0 (3 left); 3 -> pack 0 (full); 4 -> pack 1 (4 left); 2 -> pack 1; 6 -> pack 2
    assert pack_sequences([5, 3, 4, 2, 6], max_tokens=8) == [[0, 1], [2, 3], [4]]
    # a later short sample fills a gap left earlier
    assert pack_sequences([6, 6, 2, 2], max_tokens=8) == [[0, 2], [1, 3]]


def test_the_open_packs_bound_the_look_ahead():
    # one open pack (next fit): the 2s cannot go back to the first 6, which closed when the second 6 came
    assert pack_sequences([6, 6, 2, 2], max_tokens=8, max_open=1) == [[0], [1, 2], [3]]
    assert pack_sequences([6, 6, 2, 2], max_tokens=8, max_open=2) == [[0, 2], [1, 3]]
    # no open pack: one sample per pack, in order (the padded baseline)
    assert pack_sequences([3, 3, 3], max_tokens=8, max_open=0) == [[0], [1], [2]]


def test_a_packer_restored_from_its_open_packs_continues_exactly():
    lengths = [3, 7, 1, 8, 2, 5, 5, 4, 6, 1, 2, 9, 4, 4]
    whole = pack_sequences(lengths, 10, max_open=3)
    assert sorted(i for pack in whole for i in pack) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in pack) <= 10 and pack == sorted(pack) for pack in whole)
    for stop in range(len(lengths)):
        first = StreamPacker(10, max_open=3)
        packs = [pack for i in range(stop) for pack in first.add(i, lengths[i])]
        second = StreamPacker(10, max_open=3)
        second.restore(first.open_packs, dict(enumerate(lengths)))
        packs += [pack for i in range(stop, len(lengths)) for pack in second.add(i, lengths[i])]
        assert packs + second.flush() == whole


def test_a_sample_over_the_budget_goes_alone_or_raises():
    assert pack_sequences([3, 12, 2], max_tokens=8) == [[1], [0, 2]]  # closed at once, on its own
    with pytest.raises(PackOverflow, match="max_tokens"):
        pack_sequences([3, 12, 2], max_tokens=8, oversize="raise")
    with pytest.raises(PackOverflow):
        collate_packed([sample([1] * 12, [1] * 12)], max_tokens=8, pad_token_id=PAD)
    with pytest.raises(ValueError, match="at least one"):
        pack_sequences([3, 0], max_tokens=8)


# ---- collate_packed -----------------------------------------------------------------------------------
def test_packed_row_positions_restart_and_boundary_labels_are_ignored():
    a = sample([11, 12, 13], [IGNORE_INDEX, 12, 13])
    b = sample([21, 22], [21, 22])
    batch = collate_packed([a, b], max_tokens=8, pad_token_id=PAD)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22, PAD, PAD, PAD]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]  # padding restarts too
    # b's first label would be predicted from a's last token: ignored; padding ignored
    assert batch["labels"].tolist() == [[-100, 12, 13, -100, 22, -100, -100, -100]]
    assert "attention_mask" not in batch
    assert batch["pixel_values"] is None
    assert int(batch["num_samples"]) == 2 and int(batch["num_tokens"]) == 5


def test_a_full_row_has_no_padding_and_packs_can_be_given():
    rows = [sample([1, 2], [1, 2]), sample([3, 4, 5], [3, 4, 5]), sample([6, 7], [6, 7])]
    batch = collate_packed(rows, max_tokens=5, pad_token_id=PAD, packs=[[1, 0], [2]])
    assert batch["input_ids"].tolist() == [[3, 4, 5, 1, 2], [6, 7, PAD, PAD, PAD]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    with pytest.raises(ValueError, match="exactly once"):
        collate_packed(rows, max_tokens=5, pad_token_id=PAD, packs=[[0, 1]])


def test_images_stay_whole_and_pixels_follow_the_slot_order():
    # tiles marked by value: sample k's tiles are all k; 9 = an image token
    samples = [
        sample([9] * 4 + [1], [IGNORE_INDEX] * 4 + [1], tiles=2, value=0.0),
        sample([2, 2, 2, 2, 2, 2], [2] * 6),
        sample([9] * 2 + [3], [IGNORE_INDEX] * 2 + [3], tiles=1, value=2.0),
        sample([9] * 4 + [4, 4], [IGNORE_INDEX] * 4 + [4, 4], tiles=2, value=3.0),
    ]
    batch = collate_packed(samples, max_tokens=8, pad_token_id=PAD)
    # first fit: [0 (5 tokens), 2 (3)] [1 (6)] [3 (6)]
    assert batch["input_ids"].tolist() == [
        [9, 9, 9, 9, 1, 9, 9, 3],
        [2, 2, 2, 2, 2, 2, PAD, PAD],
        [9, 9, 9, 9, 4, 4, PAD, PAD],
    ]
    # a sample's tokens are contiguous in one row: each row's image run is one sample's
    order = batch["pixel_values"][:, 0, 0, 0].tolist()
    assert order == [0.0, 0.0, 2.0, 3.0, 3.0]  # row-major over the slots: rows top-down, samples left-right


def test_padded_baseline_pads_to_the_longest():
    batch = collate_padded([sample([1, 2, 3], [1, 2, 3]), sample([4], [4])], pad_token_id=PAD)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, PAD, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[1, 2, 3], [4, -100, -100]]
    left = collate_padded(
        [sample([1, 2, 3], [1, 2, 3]), sample([4], [4])], pad_token_id=PAD, padding_side="left"
    )
    assert left["input_ids"].tolist() == [[1, 2, 3], [PAD, PAD, 4]]


def test_packing_efficiency_counts_real_tokens_over_all_tokens():
    samples = [sample([1] * n, [1] * n) for n in (6, 2, 5, 3)]
    packed = collate_packed(samples, max_tokens=8, pad_token_id=PAD)  # [6, 2] [5, 3]
    assert packing_efficiency([packed]) == 1.0
    padded = collate_padded(samples, pad_token_id=PAD)  # 16 real of 4 x 6
    assert packing_efficiency([padded]) == pytest.approx(16 / 24)
    assert packing_efficiency([packed, padded]) == pytest.approx(32 / 40)


# ---- the model sees each packed sample as if it were alone ----------------------------------------------
def model_samples(processor) -> list[dict]:
    """Four conversations: two images, none, one wide image, one square image."""
    specs = [
        (
            "<image><image>\nWhat is here?",
            "a red ellipse",
            [shapes_image(56, 28, 1), shapes_image(28, 28, 2)],
        ),
        ("Say hi.", "hi there", []),
        ("<image>\nDescribe.", "blocks", [shapes_image(84, 28, 3)]),
        ("<image>\nColours?", "red and grey", [shapes_image(28, 28, 4)]),
    ]
    samples = []
    for question, answer, images in specs:
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        out = processor(messages, images=images or None)
        samples.append(
            {
                "input_ids": out["input_ids"][0],
                "labels": out["labels"][0],
                "pixel_values": out["pixel_values"],
            }
        )
    return samples


@pytest.mark.parametrize("shuffle_location", ["pre", "post"])
def test_a_sample_has_the_same_logits_packed_or_alone(shuffle_location):
    model, processor = tiny_model(init_std=0.3, shuffle_location=shuffle_location, init="random")
    model.eval()
    samples = model_samples(processor)
    lengths = [s["input_ids"].numel() for s in samples]
    max_tokens = sum(lengths[:2]) + 7  # samples 0+1 share a row, 2+3 another (with padding in both)
    packs = pack_sequences(lengths, max_tokens)
    assert packs == [[0, 1], [2, 3]]
    batch = collate_packed(samples, max_tokens, processor.tokenizer.pad_token_id, packs=packs)
    with torch.no_grad():
        # use_cache=False: with a KV cache transformers' causal mask does not look for packed sequences
        packed = model(
            input_ids=batch["input_ids"],
            pixel_values=batch["pixel_values"],
            position_ids=batch["position_ids"],
            use_cache=False,
        ).logits
        for row, pack in enumerate(packs):
            start = 0
            for i in pack:
                alone = model(
                    input_ids=samples[i]["input_ids"][None], pixel_values=samples[i]["pixel_values"]
                ).logits
                got = packed[row, start : start + lengths[i]]
                torch.testing.assert_close(got, alone[0], atol=1e-4, rtol=0)
                start += lengths[i]
    # and the loss over the packed batch is the mean over the samples' supervised tokens
    with torch.no_grad():
        inputs = {k: batch[k] for k in ("input_ids", "pixel_values", "position_ids", "labels")}
        loss = model(**inputs, use_cache=False).loss
        total = count = 0
        for s in samples:
            out = model(
                input_ids=s["input_ids"][None], pixel_values=s["pixel_values"], labels=s["labels"][None]
            )
            n = int((s["labels"][1:] != IGNORE_INDEX).sum())
            total, count = total + out.loss * n, count + n
    torch.testing.assert_close(loss, total / count, atol=1e-4, rtol=0)
