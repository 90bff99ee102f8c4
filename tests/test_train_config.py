"""The train: config, the DeepSpeed config built from it, the LR schedule, FLOPs accounting and MLflow runs.

No Ray here: these are the parts a run checks or builds before any worker starts.
"""

import math
import subprocess
import sys

import pytest

from jobs.flops import flops_per_token, peak_flops
from jobs.run_config import load_run_config
from jobs.strategy import deepspeed_config, warmup_cosine
from jobs.tracking import RunTracker
from jobs.train_config import StageSettings, parse_train_config
from model.config import ConfigError
from tests.conftest import REPO_ROOT
from tests.helpers import tiny_model


def test_defaults_fill_every_stage_and_pick_cpu_settings():
    config = parse_train_config({})
    assert set(config.stages) == {"distill", "align", "instruct"}
    assert (config.precision, config.backend) == ("fp32", "gloo")
    gpu = parse_train_config({"scaling": {"use_gpu": True}})
    assert (gpu.precision, gpu.backend) == ("bf16", "nccl")
    asked = parse_train_config({"deepspeed": {"precision": "bf16"}})
    assert (asked.precision, asked.backend) == ("bf16", "gloo")


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"stages": {"align": {"lr": -1}}}, "train.stages.align.lr"),
        ({"stages": {"align": {"learning_rate": 1e-3}}}, "train.stages.align.learning_rate"),
        ({"stages": {"pretrain": {}}}, "train.stages.pretrain"),
        ({"deepspeed": {"zero_stage": 4}}, "train.deepspeed.zero_stage"),
        ({"scaling": {"num_workers": 0}}, "train.scaling.num_workers"),
        ({"run_name": "../escape"}, "train.run_name"),
    ],
)
def test_a_bad_field_is_named(raw, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        parse_train_config(raw, "test.yaml")


def test_overrides_are_parsed_as_yaml_and_set_by_dotted_key():
    overrides = {"train.scaling.num_workers": "1", "train.stages.align.lr": "0.5", "train.seed": "7"}
    config = load_run_config("tiny", overrides).train
    assert config.scaling.num_workers == 1 and config.stages["align"].lr == 0.5 and config.seed == 7
    assert config.stages["align"].steps == 4  # the rest of the file's stage settings stay
    flat = config.flat()
    assert flat["stages.align.lr"] == 0.5 and flat["deepspeed.zero_stage"] == 2


def test_cli_fails_on_a_bad_field_before_starting_ray(tmp_workdir):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.train",
            "--config",
            "tiny",
            "--stage",
            "align",
            "--set",
            "train.stages.align.lr=-1",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "train.stages.align.lr" in done.stderr
    assert "Started a local Ray instance" not in done.stderr


def test_deepspeed_config_follows_the_run_config():
    config = parse_train_config(
        {
            "deepspeed": {"zero_stage": 3, "offload_optimizer": True, "gradient_accumulation_steps": 4},
            "stages": {"align": {"micro_batch_size": 3}},
        }
    )
    ds = deepspeed_config(config, config.stages["align"], world_size=2)
    assert ds["train_batch_size"] == 3 * 4 * 2
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False


def test_warmup_then_cosine_to_the_floor():
    stage = StageSettings(steps=110, warmup_steps=10, min_lr_ratio=0.1)
    lr = warmup_cosine(stage)
    warm = [lr(s) for s in range(10)]
    assert warm == sorted(warm) and warm[0] > 0 and warm[-1] < 1
    assert lr(10) == pytest.approx(1.0)
    assert lr(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr(110) == pytest.approx(0.1) and lr(500) == pytest.approx(0.1)


def test_flops_per_token_grow_with_what_trains():
    model, _ = tiny_model()
    distill, align, instruct = (
        flops_per_token(model, s, context=128) for s in ("distill", "align", "instruct")
    )
    assert distill < align < instruct
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("Some CPU") is None and peak_flops("x", override_tflops=2.0) == 2e12


def test_runs_are_found_again_by_name_and_stage(tmp_workdir):
    uri = f"sqlite:///{tmp_workdir / 'mlflow.db'}"
    runs = RunTracker(uri, "exp")
    parent = runs.pipeline_run("nightly", {"a.b": 1, "c": "x"})
    child = runs.stage_run(parent, "align", {"stage": "align"})
    again = RunTracker(uri, "exp")
    assert again.pipeline_run("nightly", {"a.b": 1, "c": "x"}) == parent
    assert again.stage_run(parent, "align", {"stage": "align"}) == child
    assert again.stage_run(parent, "instruct", {}) != child
    assert again.pipeline_run("other", {}) != parent
    stored = runs.client.get_run(child)
    assert stored.data.tags["mlflow.parentRunId"] == parent
    assert runs.client.get_run(parent).data.params == {"a.b": "1", "c": "x"}


def test_the_paper_recipe_drops_the_project_terms_and_starts_the_embedding_layers_at_random():
    from jobs.train_loop import StageJob, _stage_spec, _start_model

    anchored = {"stages": {s: {"image_anchor_weight": 1.0} for s in ("align", "instruct")}}
    project, paper = parse_train_config(anchored), parse_train_config({**anchored, "recipe": "paper"})
    for stage in ("align", "instruct"):
        ours = _stage_spec(stage, project.stages[stage], project.recipe)
        theirs = _stage_spec(stage, paper.stages[stage], paper.recipe)
        assert ours.text_preservation_weight > 0 and ours.norm_weight > 0
        assert ours.image_anchor_weight == 1.0 and ours.needs_teacher
        assert theirs.text_preservation_weight == 0 and theirs.norm_weight == 0
        assert theirs.image_anchor_weight == 0 and not theirs.needs_teacher
        compositional = _stage_spec(stage, project.stages[stage], "project", "hovle-compositional")
        assert compositional.image_anchor_weight == 0  # its encoder is frozen: nothing to anchor
    assert _stage_spec("distill", paper.stages["distill"], "paper").norm_weight == 0

    def first_layer_out(config):
        model = load_run_config("tiny").model.model_dump(mode="json")
        job = StageJob(config=config.model_dump(mode="json"), model=model, stage="distill",
                       data_uri="unused", export_uri="unused")  # fmt: skip
        model, _ = _start_model(job, config)
        return model.embedding.layers[0].self_attn.o_proj.weight

    assert not first_layer_out(project).any()  # the tiny preset's identity init: zeroed output projections
    assert first_layer_out(paper).abs().sum() > 0  # the paper's: random layers


def test_llm_lr_ratio_puts_the_llm_in_its_own_optimizer_group_and_zero_freezes_it():
    from jobs.train_loop import _parameter_groups, _stage_spec

    model, _ = tiny_model()
    llm = {id(p) for p in model.language_model.parameters()}
    settings = StageSettings(llm_lr_ratio=0.1)
    groups = _parameter_groups(model, _stage_spec("instruct", settings), settings)
    by_ratio = {g["lr_ratio"]: {id(p) for p in g["params"]} for g in groups}
    assert set(by_ratio) == {1.0, 0.1} and by_ratio[0.1] == llm and not by_ratio[1.0] & llm

    frozen = StageSettings(llm_lr_ratio=0)
    spec = _stage_spec("instruct", frozen)
    [group] = _parameter_groups(model, spec, frozen)
    assert group["lr_ratio"] == 1.0 and not {id(p) for p in group["params"]} & llm
    names = [n for n, _ in model.language_model.named_parameters(prefix="language_model")]
    assert names and not any(spec.is_trainable(n) for n in names)


@pytest.mark.parametrize("native", [True, False])
def test_the_demo_trains_in_bf16_only_where_the_cpu_multiplies_it_natively(native, tmp_path, monkeypatch):
    """The CPU's bf16 support is hardware: the detector stands in for both kinds of CPU (this machine has
    one of them), the demo's run config follows it."""
    import yaml

    import jobs.demo as demo

    monkeypatch.setattr(demo, "cpu_bf16_is_native", lambda: native)
    path = demo.run_config("tiny", demo.PLANS["tiny"], tmp_path, steps=None)
    config = load_run_config(str(path)).train
    assert yaml.safe_load(path.read_text())["train"]["deepspeed"]["precision"] == config.precision
    assert config.precision == ("bf16" if native else "fp32")


@pytest.mark.parametrize(
    ("uri", "local"),
    [
        ("sqlite:////work/mlflow.db", True),
        ("file:///work/mlruns", True),
        ("/work/mlruns", True),
        ("mlruns", True),
        ("http://mlflow:5000", False),
        ("https://mlflow.example.com", False),
        ("databricks", False),  # MLflow's name for a hosted server
        ("postgresql://mlflow@db/mlflow", False),
    ],
)
def test_a_node_local_tracking_store_is_refused_on_a_multi_node_cluster_only(uri, local):
    from jobs.tracking import node_local_store, require_shared_tracking
    from model.config import ConfigError

    assert node_local_store(uri) is local
    require_shared_tracking(uri, nodes=1)  # one machine: a SQLite file is the default and fine
    if local:
        with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI=http"):
            require_shared_tracking(uri, nodes=2)
    else:
        require_shared_tracking(uri, nodes=2)


@pytest.mark.parametrize(
    ("wait", "limits"),
    [(None, (60.0, -1)), (6, (6, 0)), (60, (60.0, 0)), (90, (60.0, 1)), (1800, (60.0, 29))],
)
def test_wait_for_workers_s_becomes_ray_trains_start_timeout_and_retry_limit(wait, limits):
    """(seconds one worker-group start waits, starts that may time out after the first): `wait` in all."""
    from jobs.train import start_limits

    assert start_limits(wait) == limits
    assert parse_train_config({}).wait_for_workers_s == 1800
    with pytest.raises(ConfigError, match="train.wait_for_workers_s"):
        parse_train_config({"wait_for_workers_s": 0})
