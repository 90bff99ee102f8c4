"""Training ingest: manifest-listed shards -> decoded rows -> batches, deterministic per worker, resumable."""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from model.images import dynamic_tiles
from pipelines.ingest import (
    ShardIndex,
    ShardMismatch,
    ShardSource,
    decode_sample,
    worker_rows,
)
from pipelines.manifest import (
    DatasetNotFound,
    ManifestError,
    ShardInfo,
    ShardManifest,
    UnitRecord,
    read_manifest,
    write_manifest,
)
from pipelines.schema import SHARD_SCHEMA
from pipelines.stream import TrainingStream, endless
from tests.helpers import shapes_image, tiny_model

# image sizes give 1, 2 + thumbnail, 3 + thumbnail and 4 + thumbnail tiles at the tiny preset's 28 px
IMAGE_SIZES = [(28, 28), (56, 28), (84, 28), (56, 56)]


@pytest.fixture(scope="module")
def processor():
    return tiny_model()[1]


def conversation(i: int) -> tuple[list[dict[str, str]], list]:
    """Sample i: 0, 1 or 2 images of varied sizes and an answer of varied length."""
    n_images = i % 3
    images = [shapes_image(*IMAGE_SIZES[(i + k) % 4], seed=i * 7 + k) for k in range(n_images)]
    question = "<image>" * n_images + f"\nquestion {i}: what is there?"
    answer = "shapes " * (1 + i % 5) + str(i)
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}], images


def shard_row(processor, i: int) -> dict:
    """Sample i as a SHARD_SCHEMA row: tokenized by the processor, its tiles PNG-encoded in its order."""
    messages, images = conversation(i)
    encoded = processor(messages, images=images)
    tiles, tiles_per_image = [], []
    for image in images:
        image_tiles = dynamic_tiles(
            image, processor.tile_size, processor.min_tiles, processor.max_tiles, processor.use_thumbnail
        )
        for tile in image_tiles:
            buffer = io.BytesIO()
            tile.save(buffer, format="PNG")
            tiles.append(buffer.getvalue())
        tiles_per_image.append(len(image_tiles))
    input_ids = encoded["input_ids"][0].tolist()
    return {
        "id": f"sample-{i:03d}",
        "source": "test",
        "split": "val" if i % 5 == 4 else "train",
        "input_ids": input_ids,
        "labels": encoded["labels"][0].tolist(),
        "num_tokens": len(input_ids),
        "tiles": tiles,
        "tiles_per_image": tiles_per_image,
        "truncated": False,
        "dedup_key": hashlib.sha256(str(i).encode()).hexdigest(),
    }


def write_dataset(root: Path, rows: list[dict], shard_rows: int = 9, unlisted: list[dict] = ()) -> Path:
    """Shards of `shard_rows` rows + manifest.json, and (optionally) a shard the manifest does not list."""
    (root / "shards").mkdir(parents=True)
    entries = []
    for n, start in enumerate(range(0, len(rows), shard_rows)):
        chunk = rows[start : start + shard_rows]
        path = root / "shards" / f"unit-{n:03d}.parquet"
        pq.write_table(pa.Table.from_pylist(chunk, schema=SHARD_SCHEMA), path)
        entries.append(
            ShardInfo(
                path=f"shards/{path.name}",
                rows=len(chunk),
                bytes=path.stat().st_size,
                sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                split_rows=dict(Counter(r["split"] for r in chunk)),
            )
        )
    if unlisted:
        pq.write_table(
            pa.Table.from_pylist(list(unlisted), schema=SHARD_SCHEMA), root / "shards" / "stray.parquet"
        )
    unit = UnitRecord(
        key="unit", uri=str(root / "source.jsonl"), source=str(root), fingerprint="test",
        read=len(rows), written=len(rows), rejected=0, rejected_by_reason={}, shards=entries, rejects=None,
    )  # fmt: skip
    manifest = ShardManifest(
        stage="instruct", config_hash="test", processing={}, processing_hash="test", processor_hash="test",
        sources=[unit.source], units=[unit],
    )  # fmt: skip
    write_manifest(str(root), manifest)
    return root


@pytest.fixture(scope="module")
def rows(processor) -> list[dict]:
    return [shard_row(processor, i) for i in range(40)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, rows) -> Path:
    """40 rows (32 train, 8 val) in 5 listed shards, plus a stray shard of 3 rows."""
    stray = [{**row, "id": f"stray-{k}"} for k, row in enumerate(rows[:3])]
    return write_dataset(tmp_path_factory.mktemp("dataset"), rows, unlisted=stray)


def train_ids(rows: list[dict], split: str = "train") -> set[str]:
    return {row["id"] for row in rows if row["split"] == split}


def run(stream: TrainingStream, limit: int | None = None) -> list[dict]:
    batches = []
    for batch in stream:
        batches.append(batch)
        if limit is not None and len(batches) == limit:
            break
    return batches


def flat_ids(batches: list[dict]) -> list[str]:
    return [i for batch in batches for i in batch["ids"]]


def same_batch(a: dict, b: dict) -> bool:
    keys = set(a) - {"ids"}
    if keys != set(b) - {"ids"} or a["ids"] != b["ids"]:
        return False
    return all(
        (a[k] is None and b[k] is None) or (a[k] is not None and b[k] is not None and torch.equal(a[k], b[k]))
        for k in keys
    )


# ---- manifest and whole-split reading ----------------------------------------------------------------
def test_a_folder_without_manifest_is_not_a_dataset(tmp_path):
    (tmp_path / "shards").mkdir()
    with pytest.raises(DatasetNotFound, match="manifest.json"):
        read_manifest(str(tmp_path))
    with pytest.raises(DatasetNotFound):
        ShardSource(str(tmp_path), reader="local")


def test_manifest_of_another_schema_version_is_refused(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 999, "shards": []}))
    with pytest.raises(ManifestError, match="schema_version"):
        read_manifest(str(tmp_path))


def test_index_matches_manifest_and_catches_a_changed_shard(dataset, rows, tmp_path):
    index = ShardIndex.load(str(dataset), "train")
    assert len(index) == len(train_ids(rows))
    assert len(index.shard_uris) == 5
    manifest = read_manifest(str(dataset))
    manifest.shards[0].rows += 1
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "shards").symlink_to(dataset / "shards")
    (broken / "manifest.json").write_text(manifest.to_json())
    with pytest.raises(ShardMismatch, match="prepare the dataset again"):
        ShardIndex.load(str(broken), "train")


# ---- decoding ------------------------------------------------------------------------------------------
def test_decoded_pixels_equal_the_processors_own(processor, rows):
    for i in (1, 2, 5, 7):  # one image; two images of several tiles each
        messages, images = conversation(i)
        expected = processor(messages, images=images)
        sample = decode_sample(rows[i], processor.tile_size, processor.image_mean, processor.image_std)
        assert sample["pixel_values"].dtype == torch.float32
        assert sample["pixel_values"].shape == expected["pixel_values"].shape
        assert torch.equal(sample["pixel_values"], expected["pixel_values"])
        assert torch.equal(sample["input_ids"], expected["input_ids"][0])
        assert torch.equal(sample["labels"], expected["labels"][0])
        assert sample["tiles_per_image"] == expected["num_tiles"]
    assert decode_sample(rows[0], processor.tile_size)["pixel_values"] is None  # no image


def test_tiles_of_another_size_are_refused(rows):
    with pytest.raises(ShardMismatch, match="prepared for another model"):
        decode_sample(rows[1], tile_size=448)


# ---- per-worker order, equal steps, resume --------------------------------------------------------------
def test_worker_rows_partition_the_split_every_epoch(dataset, rows):
    index = ShardIndex.load(str(dataset), "train")
    all_keys = {(uri, int(r)) for uri, shard_rows in zip(index.shard_uris, index.rows) for r in shard_rows}
    orders = []
    for world_size in (1, 3, 4):
        for epoch in (0, 1):
            parts = [worker_rows(index, "train", r, world_size, epoch, seed=5) for r in range(world_size)]
            assert len({len(p) for p in parts}) == 1  # equal rows per worker
            keys = [key for p in parts for key in p.keys()]
            assert len(keys) == len(set(keys))  # disjoint
            assert len(keys) + parts[0].dropped == len(all_keys)
            assert parts[0].dropped == len(all_keys) % world_size
            if parts[0].dropped == 0:
                assert set(keys) == all_keys
            orders.append(keys)
    assert (
        worker_rows(index, "train", 1, 3, 1, seed=5).keys() == worker_rows(index, "train", 1, 3, 1, 5).keys()
    )
    assert orders[0] != orders[1]  # a new order every epoch


class UnequalisedSource(ShardSource):
    """A ShardSource that hides the token counts: each rank runs to the end of its own rows."""

    def lengths(self, epoch: int) -> None:
        return None


@pytest.mark.parametrize("max_tokens", [None, 200])
def test_every_worker_gets_the_same_number_of_batches(dataset, rows, processor, max_tokens):
    world_size = 4  # 32 train rows: 8 per worker, nothing dropped by the row assignment
    pad = processor.tokenizer.pad_token_id
    unequal_epochs = 0
    for epoch in (0, 1, 2):
        per_rank, unlimited = [], []
        for rank in range(world_size):
            for kind, out in ((ShardSource, per_rank), (UnequalisedSource, unlimited)):
                source = kind(str(dataset), rank=rank, world_size=world_size, seed=3, reader="local")
                stream = TrainingStream(source, batch_size=2, pad_token_id=pad, max_tokens=max_tokens)
                stream.load_state_dict({"epoch": epoch, "step": 0, "next": 0, "open": [], "rows": 0})
                out.append(run(stream))
                assert stream.state_dict()["epoch"] == epoch + 1
        steps = {len(batches) for batches in per_rank}
        assert len(steps) == 1  # every rank takes the same number of steps
        # on its own every rank covers its rows: together, every train row once
        everything = [i for batches in unlimited for i in flat_ids(batches)]
        assert sorted(everything) == sorted(train_ids(rows))
        # equalising only drops the trailing batches of the ranks with more packs
        for limited, whole in zip(per_rank, unlimited):
            assert flat_ids(limited) == flat_ids(whole[: len(limited)])
            assert len(limited) == min(len(w) for w in unlimited)
        unequal_epochs += len({len(w) for w in unlimited}) > 1
    if max_tokens is not None:
        assert unequal_epochs  # the ranks' pack counts did differ, so equalising was exercised


@pytest.mark.parametrize(("max_tokens", "batch_size"), [(None, 3), (200, 1), (300, 2)])
def test_resume_mid_epoch_gives_exactly_the_remaining_batches(dataset, processor, max_tokens, batch_size):
    pad = processor.tokenizer.pad_token_id

    def stream() -> TrainingStream:
        source = ShardSource(
            str(dataset), rank=1, world_size=2, seed=0, tile_size=processor.tile_size, reader="local"
        )
        return TrainingStream(
            source, batch_size=batch_size, pad_token_id=pad, max_tokens=max_tokens, max_open=2
        )

    full = run(stream())
    assert len(full) >= 3
    states = []
    for stop in range(1, len(full) + 1):  # len(full): saved right after the last batch
        first = stream()
        head = run(first, limit=stop)
        state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
        states.append(state)
        resumed = stream()
        resumed.load_state_dict(state)
        tail = run(resumed)
        assert len(head) + len(tail) == len(full)
        assert all(same_batch(a, b) for a, b in zip(head + tail, full)), f"stopped after {stop}"
        assert resumed.state_dict()["epoch"] == 1
    if max_tokens is not None:  # some checkpoints fell while rows waited in open packs
        assert any(state["open"] for state in states)
    # the next epoch follows the finished one, in a new order
    after = stream()
    after.load_state_dict({"epoch": 1, "step": 0, "next": 0, "open": [], "rows": 0})
    next_epoch = flat_ids(run(after))
    assert next_epoch != flat_ids(full)
    assert flat_ids(run(stream())) == flat_ids(full)  # deterministic


def test_training_resumed_right_after_an_epochs_last_batch_goes_on_into_the_next_epoch(dataset, processor):
    """`endless` (what jobs.train_loop draws batches from): a checkpoint saved at the epoch's last batch
    resumes into the next epoch (its remainder is empty); a rank without any batch raises, never loops."""

    def stream() -> TrainingStream:
        source = ShardSource(
            str(dataset), rank=1, world_size=2, seed=0, tile_size=processor.tile_size, reader="local"
        )
        return TrainingStream(source, batch_size=2, pad_token_id=processor.tokenizer.pad_token_id)

    straight = endless(stream())
    first_epoch = len(run(stream()))
    want = [next(straight) for _ in range(first_epoch + 2)]
    saved = stream()
    run(saved, limit=first_epoch)  # a run that checkpointed right after the epoch's last batch
    resumed = stream()
    resumed.load_state_dict(json.loads(json.dumps(saved.state_dict())))
    batches = endless(resumed)
    got = [next(batches) for _ in range(2)]
    assert all(same_batch(a, b) for a, b in zip(got, want[first_epoch:], strict=True))

    with pytest.raises(RuntimeError, match="yields no batches"):  # a rank left without a batch
        next(endless([]))


def test_packed_batches_are_full_rows_that_respect_the_budget(dataset, processor):
    source = ShardSource(str(dataset), seed=1, tile_size=processor.tile_size, reader="local")
    stream = TrainingStream(
        source, batch_size=3, pad_token_id=processor.tokenizer.pad_token_id, max_tokens=512, max_open=16
    )
    batches = run(stream)
    assert all(b["input_ids"].shape[1] == 512 and "attention_mask" not in b for b in batches)
    slots = sum(int((b["input_ids"] == processor.image_context_token_id).sum()) for b in batches)
    tiles = sum(b["pixel_values"].shape[0] for b in batches if b["pixel_values"] is not None)
    assert slots == tiles * processor.image_tokens_per_tile


# ---- Ray Data reading --------------------------------------------------------------------------------
def test_ray_reader_gives_the_local_readers_batches(ray_session, dataset, processor):
    def batches(reader: str) -> list[dict]:
        source = ShardSource(
            str(dataset),
            rank=0,
            world_size=2,
            seed=7,
            tile_size=processor.tile_size,
            reader=reader,
        )
        stream = TrainingStream(
            source, batch_size=2, pad_token_id=processor.tokenizer.pad_token_id, max_tokens=400, max_open=8
        )
        return run(stream)

    local, remote = batches("local"), batches("ray")
    assert len(local) == len(remote)
    assert all(same_batch(a, b) for a, b in zip(local, remote))


def test_ray_reader_resumes_without_reading_consumed_shards(ray_session, dataset, processor):
    source = ShardSource(str(dataset), rank=0, world_size=1, seed=2, tile_size=processor.tile_size)
    pad = processor.tokenizer.pad_token_id
    full = run(TrainingStream(source, batch_size=4, pad_token_id=pad))
    first = TrainingStream(source, batch_size=4, pad_token_id=pad)
    head = run(first, limit=5)
    resumed = TrainingStream(source, batch_size=4, pad_token_id=pad)
    resumed.load_state_dict(first.state_dict())
    assert resumed.state_dict()["next"] == 20 and resumed.state_dict()["open"] == []  # padded: a row count
    assert flat_ids(head + run(resumed)) == flat_ids(full)


# ---- s3:// ------------------------------------------------------------------------------------------------
def test_s3_dataset_reads_like_the_local_one(ray_session, s3_bucket, dataset, rows, processor):
    import s3fs

    fs = s3fs.S3FileSystem()  # endpoint and credentials from the environment s3_bucket set
    remote = f"{s3_bucket}/prepared"
    with pytest.raises(DatasetNotFound):
        read_manifest(remote)
    fs.put(str(dataset) + "/", remote.removeprefix("s3://") + "/", recursive=True)
    assert read_manifest(remote) == read_manifest(str(dataset))

    def batches(uri: str, reader: str) -> list[dict]:
        source = ShardSource(uri, rank=1, world_size=2, seed=4, tile_size=processor.tile_size, reader=reader)
        stream = TrainingStream(
            source, batch_size=2, pad_token_id=processor.tokenizer.pad_token_id, max_tokens=400
        )
        return run(stream)

    local, from_s3 = batches(str(dataset), "local"), batches(remote, "ray")
    assert len(local) == len(from_s3) and all(same_batch(a, b) for a, b in zip(local, from_s3))
