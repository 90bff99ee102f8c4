"""pipelines.sources and pipelines.readers: format detection, raw rows of every reader, stable ids,
repeat_time, bad records as error rows, the dataset-root boundary, and s3:// on moto's server."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from pipelines.ids import UnsafePath, repeat_copies, safe_resolve, split_repeat
from pipelines.readers import read_unit
from pipelines.schema import RAW_SCHEMA
from pipelines.sources import SourceNotFound, discover_units
from pipelines.units import SourceError, WorkUnit
from tests.helpers import build_context, shapes_image


def png_bytes(seed: int = 0, size: tuple[int, int] = (56, 28)) -> bytes:
    buffer = io.BytesIO()
    shapes_image(*size, seed=seed).save(buffer, format="PNG")
    return buffer.getvalue()


def conversation(question: str = "<image>\nWhat is it?", answer: str = "shapes") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def write_jsonl(path: Path, records: list) -> Path:
    """One line per record: dicts are JSON-encoded, bytes written as they are (for broken lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [record if isinstance(record, bytes) else json.dumps(record).encode() for record in records]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def read_all(input_uri: str, **kwargs) -> list[dict]:
    return [row for unit in discover_units(input_uri, **kwargs) for row in read_unit(unit)]


def by_id(rows: list[dict]) -> dict[str, dict]:
    return {row["id"]: row for row in rows}


# ---- conversations -----------------------------------------------------------------------------------


def test_conversation_jsonl_rows_follow_the_raw_schema_with_stable_ids(tmp_path):
    path = write_jsonl(
        tmp_path / "llava.jsonl",
        [
            {"id": "a", "image": "img/a.png", "conversations": conversation()},
            {"id": 7, "image": ["img/a.png", "img/b.png"], "conversations": conversation("<image><image>")},
            {"conversations": conversation("Just text?")},  # no id, no image
            {"id": "a", "image": "img/c.png", "conversations": conversation()},  # a repeated id
        ],
    )
    units = discover_units(str(path))
    assert [unit.format for unit in units] == ["conversation_jsonl"]
    assert units[0].root == str(tmp_path)
    rows = read_all(str(path))
    pa.Table.from_pylist(rows, schema=RAW_SCHEMA)  # every field present with its Arrow type
    assert [row["id"] for row in rows] == [
        "llava.jsonl/a",
        "llava.jsonl/7",
        "llava.jsonl/L3",
        "llava.jsonl/a@L4",
    ]
    assert rows[0]["image_refs"] == ["img/a.png"] and rows[0]["image_bytes"] == [b""]
    assert rows[1]["image_refs"] == ["img/a.png", "img/b.png"]
    assert rows[2]["image_refs"] == [] and rows[2]["kind"] == "conversation"
    assert json.loads(rows[0]["payload"]) == {"conversations": conversation()}
    assert all(row["source"] == str(path) and row["unit"] == units[0].key for row in rows)
    assert read_all(str(path)) == rows  # same input, same rows and ids


def test_bad_jsonl_lines_become_error_rows_and_the_good_ones_still_come_through(tmp_path):
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"id": "good1", "conversations": conversation("hi")},
            b'{"id": "latin1", "conversations": "caf\xe9"}',
            b'{"id": "broken", ',
            {"id": "noconv"},
            {"id": "unpaired", "image": "a.png"},
            {"id": "badimage", "image": 3, "conversations": conversation()},
            [1, 2, 3],
            {"id": "good2", "conversations": conversation("hello")},
        ],
    )
    rows = by_id(read_all(str(path)))
    assert rows["mixed.jsonl/L2"]["error"] == "invalid_utf8"
    assert rows["mixed.jsonl/L3"]["error"] == "invalid_json"
    assert rows["mixed.jsonl/noconv"]["error"] == "invalid_record"
    assert rows["mixed.jsonl/badimage"]["error"] == "invalid_record"
    assert rows["mixed.jsonl/L7"]["error"] == "invalid_record"
    assert rows["mixed.jsonl/good1"]["error"] == "" and rows["mixed.jsonl/good2"]["error"] == ""
    # an image without conversations is an unpaired image (stage 1); later stages reject it in preprocessing
    assert rows["mixed.jsonl/unpaired"]["error"] == "" and rows["mixed.jsonl/unpaired"]["image_refs"] == [
        "a.png"
    ]
    assert all(row["detail"] for row in rows.values() if row["error"])


def test_conversation_json_array_is_read_by_position(tmp_path):
    path = tmp_path / "llava_instruct.json"
    path.write_text(
        json.dumps([{"conversations": conversation()}, {"id": "x", "conversations": conversation()}])
    )
    assert [unit.format for unit in discover_units(str(path))] == ["conversation_json"]
    assert [row["id"] for row in read_all(str(path))] == ["llava_instruct.json/i0", "llava_instruct.json/x"]


def test_meta_json_gives_one_unit_per_dataset_with_its_root_and_repeat_time(tmp_path):
    write_jsonl(
        tmp_path / "ann" / "twice.jsonl", [{"id": f"t{i}", "conversations": conversation()} for i in range(3)]
    )
    write_jsonl(
        tmp_path / "ann" / "half.jsonl",
        [{"id": f"h{i}", "conversations": conversation()} for i in range(200)],
    )
    meta = {
        "twice": {"root": "images/a", "annotation": "ann/twice.jsonl", "repeat_time": 2, "length": 3},
        "half": {"root": str(tmp_path / "images" / "b"), "annotation": "ann/half.jsonl", "repeat_time": 0.5},
    }
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    units = {unit.id_prefix: unit for unit in discover_units(str(tmp_path / "meta.json"))}
    assert set(units) == {"meta.json/twice", "meta.json/half"}
    assert units["meta.json/twice"].root == str(tmp_path / "images" / "a")  # relative to the meta file
    assert units["meta.json/twice"].repeat_time == 2.0
    assert units["meta.json/twice"].key != units["meta.json/half"].key

    twice = [row["id"] for row in read_unit(units["meta.json/twice"])]
    assert twice == [f"meta.json/twice/t{i}{suffix}" for i in range(3) for suffix in ("", "#rep1")]
    half = [row["id"] for row in read_unit(units["meta.json/half"])]
    assert 70 < len(half) < 130  # a hash-chosen half...
    assert half == [row["id"] for row in read_unit(units["meta.json/half"])]  # ...the same on every run


def test_repeat_copies_integer_part_copies_fraction_subsamples():
    assert repeat_copies("x", 1.0) == ["x"]
    assert repeat_copies("x", 3.0) == ["x", "x#rep1", "x#rep2"]
    assert repeat_copies("x", 0.0) == []
    extra = [len(repeat_copies(f"id{i}", 2.25)) for i in range(2000)]
    assert set(extra) == {2, 3} and 0.2 < extra.count(3) / 2000 < 0.3
    assert split_repeat("a/b#rep2") == ("a/b", 2) and split_repeat("a/b") == ("a/b", 0)


def test_bad_meta_json_fails_at_discovery(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"x": {"root": "r", "annotation": "missing.jsonl"}}))
    with pytest.raises(SourceNotFound, match="missing.jsonl"):
        discover_units(str(tmp_path / "meta.json"))
    (tmp_path / "meta.json").write_text(json.dumps({"x": {"root": "r"}}))
    with pytest.raises(SourceError, match="annotation"):
        discover_units(str(tmp_path / "meta.json"))


# ---- folders -----------------------------------------------------------------------------------------


def test_caption_folder_pairs_images_with_their_txt(tmp_path):
    folder = tmp_path / "captions"
    (folder / "sub").mkdir(parents=True)
    (folder / "x.png").write_bytes(png_bytes(1))
    (folder / "x.txt").write_text("a red ellipse\n")
    (folder / "sub" / "y.jpg").write_bytes(png_bytes(2))
    (folder / "sub" / "y.txt").write_bytes(b"caf\xe9")  # not UTF-8
    (folder / "z.png").write_bytes(png_bytes(3))  # no caption: an image alone
    (folder / "orphan.txt").write_text("a caption without its image")
    (folder / ".hidden.png").write_bytes(png_bytes(4))
    units = discover_units(str(folder))
    assert {unit.format for unit in units} == {"image_folder"}
    rows = by_id(read_all(str(folder)))
    assert set(rows) == {"captions/x.png", "captions/sub/y.jpg", "captions/z.png", "captions/orphan.txt"}
    assert rows["captions/x.png"]["kind"] == "caption"
    assert json.loads(rows["captions/x.png"]["payload"]) == {"caption": "a red ellipse"}
    assert rows["captions/x.png"]["image_refs"] == ["x.png"] and rows["captions/x.png"]["root"] == str(folder)
    assert rows["captions/sub/y.jpg"]["error"] == "invalid_utf8"
    assert rows["captions/z.png"]["kind"] == "image" and rows["captions/z.png"]["error"] == ""
    assert rows["captions/orphan.txt"]["error"] == "missing_image"


def test_image_folder_units_are_coarse_and_adding_a_file_changes_one_unit(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    blob = png_bytes()
    for i in range(60):
        (folder / f"img{i:03d}.png").write_bytes(blob)
    before = discover_units(str(folder), files_per_unit=8)
    assert 2 <= len(before) <= 30
    assert sorted(m for unit in before for m in unit.members) == [f"img{i:03d}.png" for i in range(60)]
    assert [row["kind"] for row in read_all(str(folder), files_per_unit=8)] == ["image"] * 60

    (folder / "img030b.png").write_bytes(blob)
    after = discover_units(str(folder), files_per_unit=8)
    changed = {(u.key, u.fingerprint) for u in after} - {(u.key, u.fingerprint) for u in before}
    assert len(changed) in (1, 2)  # the unit it landed in (split in two if it is a boundary)
    assert discover_units(str(folder), files_per_unit=8) == after  # deterministic


def test_text_corpus_from_txt_files_and_jsonl(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("The first document.")
    (docs / "b.txt").write_bytes(b"\xff\xfe broken")
    rows = by_id(read_all(str(docs)))
    assert {unit.format for unit in discover_units(str(docs))} == {"text_files"}
    assert json.loads(rows["docs/a.txt"]["payload"]) == {"text": "The first document."}
    assert rows["docs/a.txt"]["kind"] == "text"
    assert rows["docs/b.txt"]["error"] == "invalid_utf8"

    corpus = write_jsonl(
        tmp_path / "corpus.jsonl", [{"text": "one"}, {"id": "d2", "text": "two"}, {"title": "x"}]
    )
    assert [unit.format for unit in discover_units(str(corpus))] == ["text_jsonl"]
    rows = read_all(str(corpus))
    assert [(row["id"], row["kind"], row["error"]) for row in rows] == [
        ("corpus.jsonl/L1", "text", ""),
        ("corpus.jsonl/d2", "text", ""),
        ("corpus.jsonl/L3", "text", "invalid_record"),
    ]


# ---- WebDataset and Parquet ----------------------------------------------------------------------------


def write_tar(path: Path, files: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_webdataset_tar_samples_with_txt_or_json_captions(tmp_path):
    path = write_tar(
        tmp_path / "00000.tar",
        [
            ("000.jpg", png_bytes(0)),
            ("000.txt", b"first caption"),
            ("001.jpg", png_bytes(1)),
            ("001.json", json.dumps({"caption": "from json", "url": "http://x"}).encode()),
            ("002.png", png_bytes(2)),
            ("003.txt", b"no image here"),
            ("004.jpg", png_bytes(4)),
            ("004.json", b"{not json"),
        ],
    )
    assert [unit.format for unit in discover_units(str(path))] == ["webdataset"]
    rows = by_id(read_all(str(path)))
    assert json.loads(rows["00000.tar/000"]["payload"]) == {"caption": "first caption"}
    assert rows["00000.tar/000"]["image_bytes"] == [png_bytes(0)] and rows["00000.tar/000"]["image_refs"] == [
        ""
    ]
    assert json.loads(rows["00000.tar/001"]["payload"]) == {"caption": "from json"}
    assert rows["00000.tar/002"]["kind"] == "image"
    assert rows["00000.tar/003"]["error"] == "missing_image"
    assert rows["00000.tar/004"]["error"] == "invalid_json"


def test_cut_off_tar_keeps_its_good_samples_and_ends_with_an_unreadable_row(tmp_path):
    files = [
        (f"{i:03d}.{ext}", png_bytes(i) if ext == "png" else b"caption")
        for i in range(6)
        for ext in ("png", "txt")
    ]
    data = write_tar(tmp_path / "full.tar", files).read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: data.index(png_bytes(3)) + 100])  # inside 003.png
    rows = read_all(str(tmp_path / "cut.tar"))
    assert [row["id"] for row in rows[:-1]] == ["cut.tar/000", "cut.tar/001", "cut.tar/002"]
    assert all(row["error"] == "" for row in rows[:-1])
    assert rows[-1]["error"] == "unreadable_file" and "cut.tar" in rows[-1]["detail"]


def test_folder_of_tars_ignores_img2dataset_metadata_parquet(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_tar(shards / "00000.tar", [("a.jpg", png_bytes()), ("a.txt", b"cap")])
    write_tar(shards / "00001.tar", [("b.jpg", png_bytes()), ("b.txt", b"cap")])
    pq.write_table(
        pa.table({"key": ["a"], "caption": ["cap"], "status": ["success"]}), shards / "00000.parquet"
    )
    (shards / "00000_stats.json").write_text("{}")
    units = discover_units(str(shards))
    assert [unit.format for unit in units] == ["webdataset", "webdataset"]
    assert [row["id"] for row in read_all(str(shards))] == ["shards/00000.tar/a", "shards/00001.tar/b"]


def test_parquet_with_an_hf_image_struct_column(tmp_path):
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "id": ["r0", "r1", "r2", "r3"],
            "image": pa.array(
                [
                    {"bytes": png_bytes(0), "path": "a.png"},
                    {"bytes": None, "path": "files/b.png"},
                    {"bytes": None, "path": None},
                    {"bytes": png_bytes(3), "path": None},
                ],
                type=image_type,
            ),
            "text": ["a caption", "another", "third", None],
        }
    )
    path = tmp_path / "train-00000.parquet"
    pq.write_table(table, path, row_group_size=2)
    assert [unit.format for unit in discover_units(str(path))] == ["parquet"]
    rows = by_id(read_all(str(path)))
    assert rows["train-00000.parquet/r0"]["image_bytes"] == [png_bytes(0)]
    assert json.loads(rows["train-00000.parquet/r0"]["payload"]) == {"caption": "a caption"}
    assert rows["train-00000.parquet/r1"]["image_refs"] == ["files/b.png"]
    assert rows["train-00000.parquet/r1"]["root"] == str(tmp_path)
    assert rows["train-00000.parquet/r2"]["error"] == "missing_image"
    assert rows["train-00000.parquet/r3"]["kind"] == "image"


def test_parquet_without_image_or_text_column_fails_at_discovery(tmp_path):
    pq.write_table(pa.table({"x": [1, 2]}), tmp_path / "numbers.parquet")
    with pytest.raises(SourceError, match="no image column"):
        discover_units(str(tmp_path / "numbers.parquet"))


# ---- units ---------------------------------------------------------------------------------------------


def test_work_unit_round_trips_through_a_plain_dict(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    (tmp_path / "a.txt").write_text("cap")
    unit = discover_units(str(tmp_path))[0]
    row = json.loads(json.dumps(unit.to_dict()))
    assert WorkUnit.from_dict(row) == unit
    assert list(read_unit(row)) == list(read_unit(unit))


def test_fingerprint_changes_with_the_content(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"conversations": conversation()}])
    first = discover_units(str(path))[0]
    assert discover_units(str(path))[0].fingerprint == first.fingerprint
    write_jsonl(path, [{"conversations": conversation()}, {"conversations": conversation("more")}])
    assert discover_units(str(path))[0].fingerprint != first.fingerprint


def test_missing_or_unknown_inputs_fail_with_a_clear_error(tmp_path):
    with pytest.raises(SourceNotFound):
        discover_units(str(tmp_path / "nope"))
    (tmp_path / "model.bin").write_bytes(b"\0")
    with pytest.raises(SourceError, match="unsupported"):
        discover_units(str(tmp_path / "model.bin"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="nothing to read"):
        discover_units(str(tmp_path / "empty"))


# ---- the dataset-root boundary -------------------------------------------------------------------------


def test_safe_resolve_keeps_paths_inside_the_root(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "secret.png").write_bytes(b"x")
    (root / "sub" / "a.png").write_bytes(b"x")
    os.symlink(tmp_path / "secret.png", root / "link_out.png")
    os.symlink(root / "sub" / "a.png", root / "link_in.png")
    assert safe_resolve(str(root), "sub/a.png") == str(root / "sub" / "a.png")
    assert safe_resolve(str(root), "link_in.png") == str(root / "sub" / "a.png")
    for ref in (
        "../secret.png",
        "sub/../../secret.png",
        str(tmp_path / "secret.png"),
        "link_out.png",
        "s3://b/k",
    ):
        with pytest.raises(UnsafePath):
            safe_resolve(str(root), ref)
    assert safe_resolve("s3://bucket/data", "./img/a.png") == "s3://bucket/data/img/a.png"
    for ref in ("../x.png", "img/../../x.png", "/etc/passwd"):
        with pytest.raises(UnsafePath):
            safe_resolve("s3://bucket/data", ref)


# ---- s3:// -----------------------------------------------------------------------------------------------


def test_jsonl_with_images_on_s3(tmp_path, s3_bucket):
    from pipelines.preprocess import preprocess_row

    fs = s3fs.S3FileSystem()
    bucket = s3_bucket.removeprefix("s3://")
    fs.pipe(f"{bucket}/raw/images/a.png", png_bytes(1))
    records = [
        {"id": "a", "image": "images/a.png", "conversations": conversation()},
        {"id": "gone", "image": "images/missing.png", "conversations": conversation()},
        {"id": "escape", "image": "../other/x.png", "conversations": conversation()},
        b"{oops",
    ]
    fs.pipe(f"{bucket}/raw/llava.jsonl", write_jsonl(tmp_path / "l.jsonl", records).read_bytes())

    units = discover_units(f"{s3_bucket}/raw/llava.jsonl")
    assert [(unit.uri, unit.root, unit.format) for unit in units] == [
        (f"{s3_bucket}/raw/llava.jsonl", f"{s3_bucket}/raw", "conversation_jsonl")
    ]
    rows = list(read_unit(units[0].to_dict()))
    assert [row["id"] for row in rows] == [
        "llava.jsonl/a",
        "llava.jsonl/gone",
        "llava.jsonl/escape",
        "llava.jsonl/L4",
    ]
    assert rows[3]["error"] == "invalid_json"

    ctx = build_context("tiny", "instruct", val_fraction=0.0)
    results = [preprocess_row(row, ctx) for row in rows]
    shard, _ = results[0]
    assert shard is not None and shard["tiles_per_image"] == [3]
    assert [reject["reason"] for _, reject in results[1:]] == ["missing_image", "unsafe_path", "invalid_json"]
    folder_units = discover_units(f"{s3_bucket}/raw")  # a folder on S3: the JSONL plus the loose image
    assert sorted(unit.format for unit in folder_units) == ["conversation_jsonl", "image_folder"]
