"""Hostile inputs never take down `prepare`: each is bounded before the expensive work (parsing,
tokenizing, reading a file) and quarantined with its reason while the good records around it come
through. Unit tests on discovery, the readers and preprocess (no Ray); tests/test_prepare.py runs them
together through `prepare` once."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from model import build_processor, load_preset
from pipelines import storage
from pipelines.manifest import REJECTS_DIR
from pipelines.preprocess import PrepareContext, preprocess_row
from pipelines.readers import read_unit
from pipelines.schema import encode_payload, raw_row
from pipelines.settings import PrepareSettings
from pipelines.sources import discover_units
from tests.helpers import shapes_image

HUGE_LINE_BYTES = 50 * 1024 * 1024  # the line: the tokenizer panicked on it and the run exited 1


@pytest.fixture(scope="module")
def processor():
    return build_processor(load_preset("tiny"))


def context(processor, stage: str = "instruct", **settings) -> PrepareContext:
    return PrepareContext(stage, PrepareSettings(val_fraction=0.0, **settings), processor)


def conversation(question: str = "<image>\nWhat is in the picture?", answer: str = "shapes") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def write_records(folder: Path, *records: dict | str) -> str:
    """A JSONL in `folder` with a good record (good.png) before and after `records` (dicts or raw lines)."""
    folder.mkdir(parents=True, exist_ok=True)
    shapes_image(seed=1).save(folder / "good.png")
    good = [
        {"id": f"good{i}", "image": "good.png", "conversations": conversation(answer=f"a{i}")} for i in (1, 2)
    ]
    lines = [json.dumps(good[0]), *(r if isinstance(r, str) else json.dumps(r) for r in records)]
    path = folder / "data.jsonl"
    path.write_text("\n".join([*lines, json.dumps(good[1])]) + "\n")
    return str(path)


def run(input_uri: str, ctx: PrepareContext) -> tuple[set[str], dict[str, dict]]:
    """discover -> read -> preprocess: (own ids written, rejects by own id)."""
    written, rejects = set(), {}
    for unit in discover_units(input_uri):
        for raw in read_unit(unit, ctx.settings):
            shard, reject = preprocess_row(raw, ctx)
            if shard is not None:
                written.add(shard["id"].rsplit("/", 1)[-1])
            else:
                rejects[reject["id"].rsplit("/", 1)[-1]] = reject
    return written, rejects


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging the suite) when the body blocks, e.g. on a FIFO nobody writes to."""

    def expired(signum, frame):
        raise TimeoutError(f"blocked for {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---- records: bytes and characters ---------------------------------------------------------------------


def test_a_50_mb_jsonl_line_is_rejected_unparsed_and_the_rest_survives(tmp_path, processor):
    huge = json.dumps({"id": "huge", "conversations": conversation(answer="x" * HUGE_LINE_BYTES)})
    written, rejects = run(write_records(tmp_path, huge), context(processor))
    assert written == {"good1", "good2"}
    assert rejects["L2"]["reason"] == "record_too_large" and "max_record_bytes" in rejects["L2"]["detail"]


def test_bounded_lines_never_holds_a_line_over_the_limit():
    data = b'{"a": 1}\n' + b"y" * 5000 + b"\n\n" + b"z" * 20
    for chunk in (1, 7, 4096):
        lines = list(storage.bounded_lines(io.BufferedReader(io.BytesIO(data), chunk), limit=16))
        assert lines == [b'{"a": 1}', None, b"", None]


def test_text_over_32_chars_per_token_is_refused_before_tokenizing(tmp_path, processor, monkeypatch):
    ctx = context(processor, max_tokens=256)  # 8192 characters at most
    long = {"id": "long", "image": "good.png", "conversations": conversation(answer="word " * 2000)}
    path = write_records(tmp_path, long)

    def tokenize(messages):
        if sum(len(m["content"]) for m in messages) > ctx.settings.max_text_chars:
            raise AssertionError("an over-long text reached the tokenizer")
        return tokenize_for_real(messages)

    tokenize_for_real = processor.tokenize
    monkeypatch.setattr(processor, "tokenize", tokenize)
    written, rejects = run(path, ctx)
    assert written == {"good1", "good2"} and rejects["long"]["reason"] == "text_too_long"
    assert "max_tokens 256" in rejects["long"]["detail"]


def test_distill_corpus_takes_a_window_of_a_huge_document(processor):
    ctx = context(processor, "distill", max_tokens=64, distill_text="corpus", distill_text_tokens=16)
    document = raw_row(
        id="src/doc", source="src", unit="u", kind="text", payload=encode_payload(text="ab " * 10**6)
    )
    shard, reject = preprocess_row(document, ctx)
    assert reject is None and shard["num_tokens"] == 16


def test_a_json_input_is_told_by_its_first_byte_and_a_meta_json_is_read_bounded(tmp_path):
    from pipelines.sources import META_JSON_MAX_BYTES
    from pipelines.units import SourceError

    array = tmp_path / "records.json"  # an array, broken at its end: discovery does not parse it whole
    array.write_bytes(b"\xef\xbb\xbf\n [" + b'{"id": "a", "conversations": []},' * 1000 + b" not json")
    [unit] = discover_units(str(array))
    assert unit.format == "conversation_json"  # its reader parses it, bounded by max_file_bytes
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"x": {"annotation": "a.jsonl", "pad": "p" * META_JSON_MAX_BYTES}}))
    with pytest.raises(SourceError, match="too large for an InternVL meta JSON"):
        discover_units(str(meta))
    meta.write_text("{" + '"a":{' * 100_000 + "}" * 100_001)
    with pytest.raises(SourceError, match="nested too deeply"):
        discover_units(str(meta))


def test_a_parquet_record_over_max_record_bytes_is_left_in_the_reader(tmp_path):
    import pyarrow as pa

    big, small = b"\x89PNG\r\n\x1a\n" + b"\0" * 4096, shapes_image(seed=3)
    buffer = io.BytesIO()
    small.save(buffer, format="PNG")
    table = pa.table({"id": ["big", "ok"], "image": [big, buffer.getvalue()], "text": ["x", "y"]})
    path = tmp_path / "part-0.parquet"
    pq.write_table(table, path)
    settings = PrepareSettings(max_record_bytes=len(big) - 1)
    [unit] = discover_units(str(path))
    rows = {row["id"]: row for row in read_unit(unit, settings)}
    assert rows["part-0.parquet/big"]["error"] == "record_too_large"
    assert rows["part-0.parquet/big"]["image_bytes"] == []  # its bytes go no further than the reader
    assert rows["part-0.parquet/ok"]["error"] == "" and rows["part-0.parquet/ok"]["image_bytes"]


def test_deeply_nested_json_line_is_invalid_json(tmp_path, processor):
    written, rejects = run(write_records(tmp_path, "[" * 100_000 + "]" * 100_000), context(processor))
    assert written == {"good1", "good2"} and rejects["L2"]["reason"] == "invalid_json"


def test_a_record_that_crashes_preprocessing_is_quarantined_and_the_next_one_goes_on(processor):
    ctx = context(processor, "align")
    nested = '{"caption": ' + "[" * 100_000 + "]" * 100_000 + "}"  # the parser's recursion runs out
    png = io.BytesIO()
    shapes_image(seed=2).save(png, format="PNG")
    rows = [
        raw_row(id="src/crash", source="src", unit="u", kind="caption", payload=nested, image_bytes=[b"x"]),
        raw_row(
            id="src/fine",
            source="src",
            unit="u",
            kind="caption",
            payload=encode_payload(caption="shapes"),
            image_bytes=[png.getvalue()],
        ),
    ]
    (crashed, reject), (shard, none) = (preprocess_row(row, ctx) for row in rows)
    assert crashed is None and reject["reason"] == "internal_error" and "RecursionError" in reject["detail"]
    assert shard is not None and none is None


# ---- files: only regular ones, bounded -----------------------------------------------------------------


def test_fifo_image_inside_the_root_is_not_a_file_and_does_not_hang(tmp_path, processor):
    folder = tmp_path / "data"
    folder.mkdir()
    os.mkfifo(folder / "pipe.png")
    (folder / "folder.png").mkdir()
    records = [
        {"id": name, "image": name, "conversations": conversation()} for name in ("pipe.png", "folder.png")
    ]
    with deadline(60):
        written, rejects = run(write_records(folder, *records), context(processor))
    assert written == {"good1", "good2"}
    assert {name: r["reason"] for name, r in rejects.items()} == {
        "pipe.png": "not_a_file",
        "folder.png": "not_a_file",
    }


def test_image_over_max_file_bytes_is_left_unread(tmp_path, processor):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "big.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64 * 1024))
    written, rejects = run(
        write_records(folder, {"id": "big", "image": "big.png", "conversations": conversation()}),
        context(processor, max_file_bytes=32 * 1024),
    )
    assert written == {"good1", "good2"} and rejects["big"]["reason"] == "file_too_large"


# ---- InternVL meta JSON roots --------------------------------------------------------------------------


def test_meta_root_outside_the_meta_folder_rejects_that_entrys_records(tmp_path, processor):
    folder = tmp_path / "meta"
    (folder / "images").mkdir(parents=True)
    shapes_image(seed=3).save(folder / "images" / "ok.png")
    (tmp_path / "outside.png").write_bytes((folder / "images" / "ok.png").read_bytes())
    entries = {
        "good": ("images", "ok.png"),
        "dev": ("/dev", "zero"),  # read until MemoryError before
        "host": ("/", "etc/hostname"),  # any file of the host
        "up": ("..", "outside.png"),
        "uri": ("file:///dev", "zero"),
    }
    meta = {}
    for name, (root, image) in entries.items():
        record = {"id": "r", "image": image, "conversations": conversation()}
        (folder / f"{name}.jsonl").write_text(json.dumps(record) + "\n")
        meta[name] = {"root": root, "annotation": f"{name}.jsonl"}
    (folder / "meta.json").write_text(json.dumps(meta))

    units = {unit.id_prefix.rsplit("/", 1)[-1]: unit for unit in discover_units(str(folder / "meta.json"))}
    assert units["good"].root == str(folder / "images") and not units["good"].root_error
    for name in ("dev", "host", "up", "uri"):
        assert units[name].root == "" and "meta file's folder" in units[name].root_error, name
    ctx = context(processor)
    outcome = {}
    for name, unit in units.items():
        for raw in read_unit(unit, ctx.settings):
            shard, reject = preprocess_row(raw, ctx)
            outcome[name] = "written" if shard else reject["reason"]
    assert outcome == {
        "good": "written",
        "dev": "unsafe_path",
        "host": "unsafe_path",
        "up": "unsafe_path",
        "uri": "unsafe_path",
    }


def test_meta_root_may_be_an_s3_uri_and_an_annotation_must_be_a_regular_file(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"id": "r", "conversations": conversation()}) + "\n")
    os.mkfifo(tmp_path / "pipe.jsonl")
    (tmp_path / "meta.json").write_text(
        json.dumps({"a": {"root": "s3://bucket/images", "annotation": "a.jsonl"}})
    )
    [unit] = discover_units(str(tmp_path / "meta.json"))
    assert unit.root == "s3://bucket/images" and not unit.root_error
    (tmp_path / "meta.json").write_text(json.dumps({"p": {"root": "", "annotation": "pipe.jsonl"}}))
    with deadline(60), pytest.raises(ValueError, match="not a regular file"):
        discover_units(str(tmp_path / "meta.json"))


# ---- all of them through `prepare` ---------------------------------------------------------------------


@pytest.mark.usefixtures("ray_session")
def test_prepare_quarantines_every_hostile_input_and_writes_the_rest(tmp_path):
    from pipelines.prepare import prepare
    from tests.helpers import preset_processor

    folder = tmp_path / "raw"
    folder.mkdir()
    os.mkfifo(folder / "pipe.png")
    huge = json.dumps({"id": "huge", "conversations": conversation(answer="x" * 2 * 1024 * 1024)})
    long = {"id": "long", "image": "good.png", "conversations": conversation(answer="word " * 2000)}
    pipe = {"id": "pipe", "image": "pipe.png", "conversations": conversation()}
    data = write_records(folder, huge, long, pipe)
    (folder / "dev.jsonl").write_text(
        json.dumps({"id": "zero", "image": "zero", "conversations": conversation()})
    )
    (folder / "meta.json").write_text(json.dumps({"dev": {"root": "/dev", "annotation": "dev.jsonl"}}))
    settings = PrepareSettings(max_tokens=256, max_record_bytes=1024 * 1024, val_fraction=0.0)

    with deadline(240):
        report = prepare(
            preset_processor("tiny"),
            "instruct",
            [data, str(folder / "meta.json")],
            str(tmp_path / "out"),
            settings,
        )
    assert report["written"] == 2
    assert report["rejected_by_reason"] == {
        "not_a_file": 1,
        "record_too_large": 1,
        "text_too_long": 1,
        "unsafe_path": 1,
    }


@pytest.mark.usefixtures("ray_session")
def test_a_record_that_kills_its_worker_is_quarantined_and_the_run_goes_on(tmp_path):
    """The image of `crash` segfaults the worker that decodes it (tests/worker_plugins): Ray Data retries
    its batch on restarted actors, then prepare runs that unit record by record and quarantines it alone."""
    from pipelines.prepare import prepare
    from tests.helpers import preset_processor
    from tests.worker_plugins.sitecustomize import MAGIC

    folder = tmp_path / "raw"
    crash = {"id": "crash", "image": "crash.png", "conversations": conversation()}
    data = write_records(
        folder,
        *(
            {"id": f"ok{i}", "image": "good.png", "conversations": conversation(answer=f"b{i}")}
            for i in range(5)
        ),
        crash,
    )
    (folder / "crash.png").write_bytes(MAGIC + b"\0" * 64)
    later = folder / "later"  # a second unit after the crash: the stream resumes with it
    later.mkdir()
    shapes_image(seed=2).save(later / "other.png")
    later_records = [
        {"id": f"later{i}", "image": "other.png", "conversations": conversation(answer=f"c{i}")}
        for i in range(3)
    ]
    (later / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in later_records))
    settings = PrepareSettings(max_tokens=256, val_fraction=0.0)

    with deadline(300):  # Ray Data alone retries a dying batch forever: the run would hang
        report = prepare(
            preset_processor("tiny"),
            "instruct",
            [data, str(later / "data.jsonl")],
            str(tmp_path / "out"),
            settings,
        )
    assert report["rejected_by_reason"] == {"worker_crashed": 1}
    assert report["written"] == 2 + 5 + 3 and report["read"] == report["written"] + 1
    [rejects] = (tmp_path / "out" / REJECTS_DIR).glob("*.parquet")
    assert pq.read_table(rejects).column("id").to_pylist() == ["data.jsonl/crash"]


def test_tar_member_over_its_bound_is_passed_over_unread(tmp_path):
    path = tmp_path / "00000.tar"
    png = io.BytesIO()
    shapes_image().save(png, format="PNG")
    with tarfile.open(path, "w") as tar:
        for name, data in [
            ("big.jpg", bytes(64 * 1024)),
            ("big.txt", b"c"),
            ("ok.png", png.getvalue()),
            ("ok.txt", b"caption"),
            ("long.png", png.getvalue()),
            ("long.txt", b"w" * 2048),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    [unit] = discover_units(str(path))
    settings = PrepareSettings(max_file_bytes=32 * 1024, max_record_bytes=1024)
    rows = {row["id"].rsplit("/", 1)[-1]: row for row in read_unit(unit, settings)}
    assert {key: row["error"] for key, row in rows.items()} == {
        "big": "file_too_large",
        "ok": "",
        "long": "record_too_large",
    }
