"""`retrain.retention` (jobs/retention.py): finished cycles' files cleaned by policy, on local folders and
on S3 (moto's server), the champion's lineage and unfinished or current cycles never touched (the cycle
that calls it is tests/test_retrain.py's second cycle); and where a cycle evaluates (jobs/cycle.py)."""

from __future__ import annotations

import json

import pytest

from jobs import retention
from jobs.run_config import load_run_config
from model.config import ConfigError
from pipelines import storage


def export(root: str, folder: str, init: str | None = None) -> str:
    uri = storage.join(root, folder)
    storage.write_text_atomic(storage.join(uri, "model.safetensors"), "weights")
    storage.write_text_atomic(
        storage.join(uri, "export.json"), json.dumps({"stage": "instruct", "init": init})
    )
    return uri


def layout(root: str) -> dict:
    """Five cycles' files: v1 (the first champion), v2 (fine-tuned from v1's copy, the champion now), v3
    (from v1's copy, not promoted), v4 (the cycle that just ran, from v2's copy), v5 (crashed: not done)."""
    retrain = storage.join(root, "retrain")
    copy1 = export(retrain, "champion-v1")
    copy2 = export(retrain, "champion-v2")
    exports = {
        "v1": export(root, "retrain-v1/exports/instruct"),
        "v2": export(root, "retrain-v2/exports/instruct", init=copy1),
        "v3": export(root, "retrain-v3/exports/instruct", init=copy1),
        "v4": export(root, "retrain-v4/exports/instruct", init=copy2),
        "v5": export(root, "retrain-v5/exports/instruct", init=copy2),
    }
    for version in exports:
        checkpoint = f"retrain-{version}-train/checkpoint_instruct_0000002/a"
        storage.write_text_atomic(storage.join(root, checkpoint), "x")
    storage.write_text_atomic(storage.join(root, "prepared/instruct/manifest.json"), "{}")
    storage.write_text_atomic(storage.join(retrain, "state.json"), "{}")
    cycles = {
        v: {"done": v != "v5", "model_version": str(i + 1), "summary": {"export": exports[v]}}
        for i, v in enumerate(exports)
    }
    del cycles["v5"]["model_version"]
    return {"retrain": retrain, "exports": exports, "cycles": cycles, "copy1": copy1, "copy2": copy2}


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "runs")
    return storage.join(request.getfixturevalue("s3_bucket"), "runs")


def test_older_finished_cycles_go_and_the_champion_s_lineage_stays(root):
    files = layout(root)
    removed = retention.remove(
        retention.plan(
            files["cycles"], "v4", 2, root, files["retrain"], files["exports"]["v2"], files["copy2"]
        )
    )
    gone = {uri.removeprefix(root).strip("/") for uri in removed}
    # v1: older than the newest two (v4, v3) and not the champion's: its export and checkpoints go
    # v2: the champion: its export stays (and the copy it started from), its checkpoints go
    assert gone == {"retrain-v1", "retrain-v1-train", "retrain-v2-train"}
    for uri in removed:
        assert not storage.exists(uri)
    kept = [files["exports"][v] for v in ("v2", "v3", "v4", "v5")] + [files["copy1"], files["copy2"]]
    assert all(storage.exists(storage.join(uri, "export.json")) for uri in kept)
    for version in ("v3", "v4", "v5"):  # kept cycles keep their checkpoints; v5 may still resume
        assert storage.exists(storage.join(root, f"retrain-{version}-train/checkpoint_instruct_0000002/a"))
    assert storage.exists(storage.join(root, "prepared/instruct/manifest.json"))
    assert storage.exists(storage.join(files["retrain"], "state.json"))
    assert retention.plan(files["cycles"], "v4", 2, root, files["retrain"], files["exports"]["v2"]) == []


def test_keeping_one_cycle_keeps_only_the_current_one_and_the_champion_s_lineage(root):
    files = layout(root)
    doomed = retention.plan(
        files["cycles"], "v4", 1, root, files["retrain"], files["exports"]["v2"], files["copy2"]
    )
    retention.remove(doomed)
    assert not storage.exists(files["exports"]["v3"])  # not the champion's, and older than v4
    assert storage.exists(files["exports"]["v2"]) and storage.exists(files["copy1"])  # the champion's line
    assert storage.exists(files["exports"]["v4"]) and storage.exists(files["copy2"])  # what v4 started from
    assert storage.exists(files["exports"]["v5"])  # not finished


def test_a_champion_copy_that_no_kept_export_starts_from_goes(root):
    files = layout(root)
    stale = export(files["retrain"], "champion-v0")  # an earlier champion's copy nothing kept starts from
    removed = retention.remove(
        retention.plan(
            files["cycles"], "v4", 2, root, files["retrain"], files["exports"]["v2"], files["copy2"]
        )
    )
    assert stale in removed and not storage.exists(stale)
    assert files["copy1"] not in removed and files["copy2"] not in removed


def test_the_lineage_follows_init_links_and_stops_at_a_missing_export(tmp_path):
    root = str(tmp_path)
    first = export(root, "a")
    second = export(root, "b", init=first)
    third = export(root, "c", init=second)
    assert retention.lineage(third) == [third, second, first]
    storage.remove(first, recursive=True)
    assert retention.lineage(third) == [third, second, first]  # the link is named, then the chain ends
    assert retention.lineage(storage.join(root, "nowhere")) == [storage.join(root, "nowhere")]


def test_keep_cycles_is_validated_with_its_dotted_name(tmp_path):
    raw = {"instruct": ["data.jsonl"]}
    good = {
        "retrain.raw": json.dumps(raw),
        "retrain.prepared": "prepared",
        "retrain.retention.keep_cycles": "3",
    }
    assert load_run_config("tiny", good).retrain.retention.keep_cycles == 3
    unset = load_run_config("tiny", {**good, "retrain.retention.keep_cycles": "null"})
    assert unset.retrain.retention.keep_cycles is None
    with pytest.raises(ConfigError, match=r"retrain\.retention\.keep_cycles"):
        load_run_config("tiny", {**good, "retrain.retention.keep_cycles": "0"})


# ---- where a cycle evaluates and logs its model (jobs/cycle.py: placement) ---------------------------------
def test_a_single_node_evaluates_in_the_driver_and_task_placement_runs_elsewhere(ray_session):
    import os

    from jobs.cycle import placement
    from jobs.run_config import EvalSettings

    def pid() -> int:
        return os.getpid()

    auto = placement(EvalSettings(data="held-out.jsonl"))  # one node: nothing to place
    assert auto(pid) == os.getpid()
    task = placement(EvalSettings(data="held-out.jsonl", placement="task", num_cpus=0.5))
    assert task(pid) != os.getpid()  # a Ray worker process, with the resources declared
    assert task(pid, gpus=True) != os.getpid()  # num_gpus 0 here: schedulable without a GPU
    with pytest.raises(ConfigError):
        load_run_config("tiny", {"eval.data": "x.jsonl", "eval.placement": "head"})
