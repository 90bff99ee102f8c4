"""`prepare` end to end on a real local Ray runtime: accounting, atomic commit, incremental reruns,
duplicates, readable shards, and s3:// on moto's server."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.manifest import DatasetNotFound, read_manifest
from pipelines.prepare import prepare
from pipelines.settings import PrepareSettings
from tests import faults
from tests.helpers import preset_processor, shapes_image

REPO_ROOT = Path(__file__).resolve().parent.parent
SETTINGS = PrepareSettings(shard_max_rows=4, val_fraction=0.3)


pytestmark = pytest.mark.usefixtures("ray_session")  # every test here runs `prepare` on real Ray


def write_corpus(folder: Path, name: str, n: int, seed: int = 0, bad: bool = True) -> Path:
    """A LLaVA-style JSONL of n good conversations (+ a few bad records and one exact duplicate)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    lines = []
    for i in range(n):
        image = f"images/{name}-{i}.png"
        shapes_image(56, 28, seed=seed * 1000 + i).save(folder / image)
        lines.append(
            {
                "id": f"{name}-{i}",
                "image": image,
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat is in the picture?"},
                    {"from": "gpt", "value": f"shapes number {i}"},
                ],
            }
        )
    if bad:
        (folder / "images" / f"{name}-corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
        lines += [
            {
                "id": f"{name}-missing",
                "image": "images/nope.png",
                "conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "x"}],
            },
            {
                "id": f"{name}-corrupt",
                "image": f"images/{name}-corrupt.png",
                "conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "x"}],
            },
            {
                "id": f"{name}-role",
                "conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "x"}],
            },
            {**lines[0], "id": f"{name}-dup"},  # same image bytes and text as the first sample
        ]
    path = folder / f"{name}.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def prepare_cli(inputs: list[str], output: Path, *options: str, env: dict | None = None):
    """`python -m jobs.prepare --config tiny --stage instruct` in its own process group, to the end."""
    command = [sys.executable, "-m", "jobs.prepare", "--config", "tiny", "--stage", "instruct"]
    command += ["--output", str(output), *options]
    for uri in inputs:
        command += ["--input", uri]
    process = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # whatever of its Ray runtime is left
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def own_id(row: dict) -> str:
    """The record's own id: sample ids are "<file>/<id in the file>", unique across input files."""
    return row["id"].rsplit("/", 1)[-1]


def shard_rows(output: Path) -> list[dict]:
    manifest = read_manifest(str(output))
    rows = []
    for shard in manifest.shards:
        rows += pq.read_table(output / shard.path).to_pylist()
    return rows


def test_prepare_writes_shards_rejects_and_an_accounted_manifest(tmp_path):
    corpus = write_corpus(tmp_path / "raw", "a", 9)
    output = tmp_path / "prepared"
    report = prepare(preset_processor("tiny"), "instruct", [str(corpus)], str(output), SETTINGS)

    assert report["read"] == 13 and report["written"] == 9 and report["rejected"] == 4
    assert report["rejected_by_reason"] == {
        "corrupt_image": 1,
        "duplicate": 1,
        "missing_image": 1,
        "unknown_role": 1,
    }
    manifest = read_manifest(str(output))
    for source, entry in manifest.accounting().items():
        assert entry["read"] == entry["written"] + entry["rejected"], source
    assert all(s.rows <= SETTINGS.shard_max_rows for s in manifest.shards)
    assert sum(s.rows for s in manifest.shards) == 9
    rows = shard_rows(output)
    assert sorted(own_id(r) for r in rows) == sorted(f"a-{i}" for i in range(9))
    assert {r["split"] for r in rows} <= {"train", "val"}

    rejects = pq.read_table(output / manifest.units[0].rejects).to_pylist()
    assert {own_id(r): r["reason"] for r in rejects} == {
        "a-missing": "missing_image",
        "a-corrupt": "corrupt_image",
        "a-role": "unknown_role",
        "a-dup": "duplicate",
    }
    assert all(r["detail"] for r in rejects)

    body = json.loads((output / "manifest.json").read_text())
    for key in (
        "schema_version",
        "sources",
        "config_hash",
        "processor_hash",
        "processing",
        "shards",
        "accounting",
    ):
        assert key in body, key


def test_shards_open_with_pyarrow_and_datasets(tmp_path):
    from datasets import load_dataset

    corpus = write_corpus(tmp_path / "raw", "b", 5, bad=False)
    output = tmp_path / "prepared"
    prepare(preset_processor("tiny"), "instruct", [str(corpus)], str(output), SETTINGS)
    files = [str(output / s.path) for s in read_manifest(str(output)).shards]
    table = pq.read_table(files[0])
    assert table.schema.field("input_ids").type.value_type.bit_width == 32
    loaded = load_dataset("parquet", data_files=files, split="train")
    assert len(loaded) == 5
    assert set(loaded.column_names) >= {"input_ids", "labels", "tiles", "split"}


def test_rerun_over_unchanged_inputs_writes_nothing(tmp_path):
    corpus = write_corpus(tmp_path / "raw", "c", 4)
    output = tmp_path / "prepared"
    prepare(preset_processor("tiny"), "instruct", [str(corpus)], str(output), SETTINGS)
    before = {p: p.stat().st_mtime_ns for p in output.rglob("*") if p.is_file()}

    again = prepare(preset_processor("tiny"), "instruct", [str(corpus)], str(output), SETTINGS)

    assert again["read"] == 0 and again["written"] == 0 and again["changed"] is False
    assert {p: p.stat().st_mtime_ns for p in output.rglob("*") if p.is_file()} == before


def test_inputs_added_later_are_processed_without_redoing_old_ones(tmp_path):
    first = write_corpus(tmp_path / "raw", "d1", 4, bad=False)
    output = tmp_path / "prepared"
    prepare(preset_processor("tiny"), "instruct", [str(first)], str(output), SETTINGS)
    old_shards = {s.path: s.sha256 for s in read_manifest(str(output)).shards}

    second = write_corpus(tmp_path / "raw", "d2", 3, seed=5, bad=False)
    report = prepare(preset_processor("tiny"), "instruct", [str(first), str(second)], str(output), SETTINGS)

    assert report["units_processed"] == 1 and report["read"] == 3 and report["written"] == 3
    manifest = read_manifest(str(output))
    assert {s.path: s.sha256 for s in manifest.shards if s.path in old_shards} == old_shards
    assert manifest.totals()["written"] == 7


def test_duplicates_across_runs_are_removed_and_counted(tmp_path):
    first = write_corpus(tmp_path / "raw", "e", 3, bad=False)
    output = tmp_path / "prepared"
    prepare(preset_processor("tiny"), "instruct", [str(first)], str(output), SETTINGS)
    copy = tmp_path / "raw" / "e-copy.jsonl"
    copy.write_text(
        "".join(
            json.dumps({**json.loads(line), "id": json.loads(line)["id"] + "-again"}) + "\n"
            for line in first.read_text().splitlines()
        )
    )
    report = prepare(preset_processor("tiny"), "instruct", [str(first), str(copy)], str(output), SETTINGS)
    assert report["read"] == 3 and report["written"] == 0 and report["rejected_by_reason"] == {"duplicate": 3}


def test_split_is_a_stable_function_of_the_sample_id(tmp_path):
    corpus = write_corpus(tmp_path / "raw", "f", 12, bad=False)
    prepare(preset_processor("tiny"), "instruct", [str(corpus)], str(tmp_path / "one"), SETTINGS)
    prepare(preset_processor("tiny"), "instruct", [str(corpus)], str(tmp_path / "two"), SETTINGS)
    one = {r["id"]: r["split"] for r in shard_rows(tmp_path / "one")}
    assert one == {r["id"]: r["split"] for r in shard_rows(tmp_path / "two")}
    assert set(one.values()) == {"train", "val"}


def test_killed_run_leaves_no_dataset_and_the_rerun_finishes_only_the_missing_units(tmp_path):
    inputs = [str(write_corpus(tmp_path / "raw", f"k{i}", 6, seed=i, bad=False)) for i in range(6)]
    output = tmp_path / "prepared"
    # the driver SIGKILLs itself after two units (a deterministic point); its Ray processes go with it
    # = SETTINGS
    options = ["--set", "data.shard_max_rows=4", "--set", "data.val_fraction=0.3", "--num-actors", "1"]
    done = prepare_cli(
        inputs, output, *options, env={**os.environ, "HOVLE_HOOKS": faults.spec("kill_after_two_units")}
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]

    with pytest.raises(DatasetNotFound):
        read_manifest(str(output))
    work = output / "_work"
    assert len(list(work.glob("*.json"))) == 2
    finished = {p: p.stat().st_mtime_ns for p in (output / "shards").glob("*.parquet")}
    assert len(finished) == 4  # two units of 6 rows, shards of at most 4 rows

    report = prepare(preset_processor("tiny"), "instruct", inputs, str(output), SETTINGS)
    assert report["units_processed"] == 6 and report["units_resumed"] == 2
    assert report["read"] == 36  # resumed units count as this run's work ...
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # ... but were not recomputed
    manifest = read_manifest(str(output))
    assert manifest.totals()["written"] == 36
    assert sorted(own_id(r) for r in shard_rows(output)) == sorted(
        f"k{i}-{j}" for i in range(6) for j in range(6)
    )
    assert not work.exists()


def test_prepare_cli_prints_a_json_report_last_and_builds_the_processor_from_the_model_section(tmp_path):
    """The report is the last stdout line. `--set model.*` reaches the processor the pipeline is handed (it
    used to re-read the file): a smaller tile budget is another processor, so the same input makes another
    dataset key. (One test: each CLI run starts Ray of its own, ~25 s.)"""
    corpus = write_corpus(tmp_path / "raw", "g", 3)
    hashes = []
    for name, extra in (("as-is", []), ("two-tiles", ["--set", "model.image.max_tiles=2"])):
        done = prepare_cli([str(corpus)], tmp_path / name, *extra)
        assert done.returncode == 0, done.stderr[-3000:]
        report = json.loads(done.stdout.strip().splitlines()[-1])
        assert {"read", "written", "rejected", "rejected_by_reason", "output"} <= set(report)
        assert report["read"] == 7 and report["written"] == 3
        manifest = read_manifest(str(tmp_path / name))
        hashes.append((manifest.processor_hash, manifest.config_hash))
    assert hashes[0][0] != hashes[1][0] and hashes[0][1] != hashes[1][1]
    assert all(len(h) == 64 for pair in hashes for h in pair)


def test_bad_data_setting_fails_naming_the_field(tmp_path):
    done = prepare_cli(["x"], tmp_path / "o", "--set", "data.overflow=explode")
    assert done.returncode == 2
    assert "data.overflow" in done.stderr


def test_prepare_reads_and_writes_s3(tmp_path, s3_bucket):
    import s3fs

    corpus = write_corpus(tmp_path / "raw", "s", 3)
    fs = s3fs.S3FileSystem()
    fs.put(str(corpus.parent) + "/", f"{s3_bucket.removeprefix('s3://')}/raw/", recursive=True)
    output = f"{s3_bucket}/prepared/instruct"
    report = prepare(preset_processor("tiny"), "instruct", [f"{s3_bucket}/raw/s.jsonl"], output, SETTINGS)
    assert report["written"] == 3 and report["rejected"] == 4
    manifest = read_manifest(output)
    assert manifest.totals()["written"] == 3
    with fs.open(f"{output.removeprefix('s3://')}/{manifest.shards[0].path}", "rb") as f:
        assert pq.read_table(f).num_rows == manifest.shards[0].rows
    again = prepare(preset_processor("tiny"), "instruct", [f"{s3_bucket}/raw/s.jsonl"], output, SETTINGS)
    assert again["written"] == 0 and again["changed"] is False


def test_unsafe_image_path_is_a_security_reject(tmp_path):
    folder = tmp_path / "raw"
    folder.mkdir()
    outside = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(outside)
    (folder / "link.png").symlink_to(outside)
    lines = [
        {
            "id": name,
            "image": image,
            "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}],
        }
        for name, image in (("dots", "../secret.png"), ("abs", str(outside)), ("link", "link.png"))
    ]
    (folder / "x.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    report = prepare(
        preset_processor("tiny"), "instruct", [str(folder / "x.jsonl")], str(tmp_path / "out"), SETTINGS
    )
    assert report["rejected_by_reason"] == {"unsafe_path": 3}


def test_synthetic_distill_corpus_gives_image_and_text_rows_and_later_stages_reject_bare_images(tmp_path):
    from pipelines.corpora.synthetic import generate

    jsonl = generate("distill", 6, seed=0, output_dir=tmp_path / "corpus", image_size=56)
    text = jsonl.parent / "text.jsonl"
    report = prepare(
        preset_processor("tiny"), "distill", [str(jsonl), str(text)], str(tmp_path / "distill"), SETTINGS
    )
    assert (report["read"], report["written"], report["rejected"]) == (12, 12, 0)
    rows = shard_rows(tmp_path / "distill")
    with_tiles = [row for row in rows if row["tiles"]]
    assert len(with_tiles) == 6 and all(row["tiles_per_image"] for row in with_tiles)

    bare = prepare(preset_processor("tiny"), "align", [str(jsonl)], str(tmp_path / "align"), SETTINGS)
    assert bare["written"] == 0 and bare["rejected_by_reason"] == {"invalid_record": 6}


def test_a_dataset_from_before_a_setting_existed_grows_when_that_setting_is_at_its_default(
    tmp_path, monkeypatch
):
    """Fields added to the data settings later (settings.ADDED_LATER) are out of the processing hash at
    their defaults. A dataset whose manifest hashed every field (as the release that added them wrote it)
    is still accepted, keeps its form, and grows by the new input only."""
    from pipelines.settings import ADDED_LATER

    settings = PrepareSettings(shard_max_rows=4, val_fraction=0.0)
    current, full = settings.hashed_forms()
    assert set(full) - set(current) == set(ADDED_LATER) and full == settings.model_dump()
    first, second = (
        write_corpus(tmp_path / "raw", "f", 3, bad=False),
        write_corpus(tmp_path / "raw", "g", 2, seed=1, bad=False),
    )
    output = str(tmp_path / "prepared")
    with monkeypatch.context() as patch:  # the writer of that release: every field hashed
        patch.setattr(PrepareSettings, "hashed_forms", lambda self: [self.model_dump()])
        prepare(preset_processor("tiny"), "instruct", [str(first)], output, settings)
    old = read_manifest(output)
    report = prepare(preset_processor("tiny"), "instruct", [str(first), str(second)], output, settings)
    assert report["read"] == 2 and report["written"] == 2  # only the new input was processed
    grown = read_manifest(output)
    assert grown.processing_hash == old.processing_hash and grown.totals()["written"] == 5
    assert PrepareSettings(max_file_bytes=4096).hashed_forms()[0]["max_file_bytes"] == 4096  # not a default
