"""A stage trained to a CPU-seconds budget (`train.stages.<stage>.cpu_seconds`, jobs.budget): the LR and
De-focus's drop path follow the CPU-seconds spent, the stage stops when they are spent, and what it spent
is kept across a resume and recorded in the export and in MLflow."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest

from jobs.budget import StageClock
from jobs.strategy import warmup_cosine
from jobs.train import main as train_main
from jobs.train_config import StageSettings
from jobs.train_loop import advance_drop_path
from tests import faults
from tests.helpers import preset_processor, tiny_model


def cosine(floor: float, progress: float) -> float:
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def test_the_lr_follows_the_budget_spent_after_warmup_in_steps():
    stage = StageSettings(steps=10_000, warmup_steps=4, min_lr_ratio=0.1, cpu_seconds=100.0)
    spent = {"share": 0.0}
    lr = warmup_cosine(stage, lambda: spent["share"])
    assert [lr(s) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])  # warmup: steps, not seconds
    for share in (0.0, 0.25, 0.5, 0.9, 1.0):
        spent["share"] = share
        assert lr(4) == pytest.approx(cosine(0.1, share))
        assert lr(5000) == pytest.approx(cosine(0.1, share))  # the step no longer matters
    spent["share"] = 1.7  # overshoot on the last step: the floor
    assert lr(9) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="progress"):
        warmup_cosine(stage)  # a budget without a clock would silently fall back to steps


def test_without_a_budget_the_lr_follows_steps_and_ignores_any_clock():
    stage = StageSettings(steps=110, warmup_steps=10, min_lr_ratio=0.1)
    lr = warmup_cosine(stage, lambda: 0.99)
    assert lr(60) == pytest.approx(cosine(0.1, 0.5))


def test_the_clock_without_ranks_counts_cpu_seconds_and_tokens_and_resumes():
    clock = StageClock(steps=1000, cpu_seconds=0.05)
    clock.resume({"step": 3, "cpu_seconds": 0.01, "tokens": 40})
    clock.start()
    step = 3
    while not clock.done(step):
        sum(i * i for i in range(20_000))  # burn CPU
        clock.count(8)
        step += 1
        clock.tick()
    assert 3 < step < 1000 and clock.stopped_by == "cpu_seconds"
    assert clock.progress(step) == 1.0 and clock.spent >= 0.05
    clock.sync()
    assert clock.state_dict() == {"cpu_seconds": clock.spent, "tokens": 40 + 8 * (step - 3)}
    counted = clock.spent

    with clock.paused():  # bookkeeping: not counted
        sum(i * i for i in range(200_000))
    clock.sync()
    assert clock.spent == pytest.approx(counted, abs=0.005)

    bounded = StageClock(steps=4)
    bounded.start()
    assert bounded.progress(1) == 0.25 and not bounded.done(3) and bounded.done(4)
    assert bounded.stopped_by == "steps"


def test_drop_path_follows_the_budget_progress_when_given():
    model, _ = tiny_model(attention="defocus")  # 2 layers, rate 0.1 -> 0.7 over the stage
    assert advance_drop_path(model, 1, 1000, progress=0.5) == pytest.approx(0.4)
    assert advance_drop_path(model, 999, 1000, progress=0.0) == pytest.approx(0.1)
    assert advance_drop_path(model, 5, 10) == pytest.approx(0.4)  # no budget: step / steps


# ---- a real stage on Ray Train + DeepSpeed -----------------------------------------------------------------
BUDGET = 3.0  # CPU-seconds per rank: a few dozen tiny steps


@pytest.fixture(scope="module")
def align_data(tmp_path_factory, ray_session) -> str:
    from pipelines.corpora.synthetic import generate
    from pipelines.prepare import prepare
    from pipelines.settings import PrepareSettings

    root = tmp_path_factory.mktemp("budget-data")
    jsonl = generate("align", 24, seed=0, output_dir=root / "corpus", image_size=56)
    settings = PrepareSettings(max_tokens=256, val_fraction=0.0)
    prepare(preset_processor("tiny"), "align", [str(jsonl)], str(root / "align"), settings)
    return str(root / "align")


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_a_budgeted_stage_stops_on_its_cpu_seconds_and_keeps_them_across_a_resume(
    align_data, tmp_workdir, monkeypatch
):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("HOVLE_HOOKS", faults.spec("kill_last_rank_at_step_3"))
    argv = [
        "--config", "tiny", "--stage", "align", "--data", align_data, "--run-name", "budget",
        "--set", "train.stages.align.steps=100000", f"--set=train.stages.align.cpu_seconds={BUDGET}",
        "--set", "train.checkpoint.every_n_steps=2", "--set", "train.log_every_n_steps=2",
    ]  # fmt: skip
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert train_main(argv) == 0
    report = json.loads(out.getvalue().strip().splitlines()[-1])
    info = json.loads((Path(report["exports"]["align"]) / "export.json").read_text())
    assert info["stopped_by"] == "cpu_seconds" and 3 < info["steps"] < 100000
    assert info["cpu_seconds"] >= BUDGET and info["cpu_seconds_budget"] == BUDGET
    assert info["tokens"] > 0 and info["resumed_from_step"] == 2

    client = MlflowClient(f"sqlite:///{tmp_workdir / 'mlflow.db'}")
    [run] = client.search_runs(
        [client.get_experiment_by_name("hovle").experiment_id], "tags.`hovle.stage` = 'align'"
    )
    spent = client.get_metric_history(run.info.run_id, "cpu_seconds")
    tokens = client.get_metric_history(run.info.run_id, "tokens_seen")
    # the checkpoint at step 2 held what step 2's report logged (or a little more): the resumed attempt
    # started from it, not from zero
    before_crash = min(m.value for m in spent if m.step == 2)
    assert before_crash > 0 and info["resumed_from_cpu_seconds"] >= before_crash
    last = max(spent, key=lambda m: (m.step, m.value))
    assert last.step == info["steps"] and last.value == pytest.approx(info["cpu_seconds"], rel=0.05)
    assert max(m.value for m in tokens) == pytest.approx(info["tokens"], rel=0.05)
    assert max(m.value for m in client.get_metric_history(run.info.run_id, "progress")) == 1.0
