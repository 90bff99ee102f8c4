"""The compositional baseline (frozen vision encoder -> projector -> LLM) and its use as stage 1's teacher."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from jobs.train import main as train_main
from jobs.train import resolve_teacher, stage_plan
from jobs.train_config import parse_train_config
from jobs.train_loop import StageModule, _parameter_groups, _stage_spec
from model import (
    CompositionalConfig,
    CompositionalVLM,
    ConfigError,
    HoVLEProcessor,
    ImageTokenMismatch,
    apply_stage,
    load_pretrained,
    stage_loss,
    stage_spec,
)
from model.backbones import load_mobilenet_v2
from model.presets import config_from_spec, parse_model_spec
from model.teachers import CompositionalTeacher, build_teacher
from tests.conftest import REPO_ROOT
from tests.helpers import (
    _tiny_compositional_spec,
    chat_batch,
    distill_batch,
    preset_processor,
    shapes_image,
    tiny_compositional_model,
    tiny_model,
)

COMPOSITIONAL = "hovle-compositional"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A tiny compositional model (random LLM and projector, the packaged MobileNetV2), saved with its
    processor."""
    model, processor = tiny_compositional_model(seed=3, init_std=0.3)
    folder = tmp_path_factory.mktemp("compositional")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _tiny_vit(folder: Path) -> Path:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=28,
        patch_size=7,
    )
    ViTModel(config).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3})
    )
    return folder


# ---- the model --------------------------------------------------------------------------------------------
def test_preset_builds_the_compositional_model_behind_the_same_processor():
    model, processor = tiny_compositional_model()
    assert isinstance(model.config, CompositionalConfig) and model.config.model_type == COMPOSITIONAL
    assert {name.split(".")[0] for name, _ in model.named_parameters()} == {
        "vision_encoder",
        "projector",
        "language_model",
    }
    # the packaged ImageNet MobileNetV2, untouched
    packaged = load_mobilenet_v2().state_dict()
    assert all(torch.equal(v, packaged[k]) for k, v in model.vision_encoder.backbone.state_dict().items())
    # the same tokens, tiles and chat template as the tiny HoVLE preset: prepared datasets serve both
    _, hovle_processor = tiny_model()
    ours, theirs = chat_batch(processor), chat_batch(hovle_processor)
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["pixel_values"], theirs["pixel_values"])


def test_forward_puts_projected_tokens_in_the_image_slots_and_the_llms_embeddings_elsewhere():
    model, processor = tiny_compositional_model()
    batch = chat_batch(processor)
    out = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "labels")},
                output_embedding_states=True)  # fmt: skip
    learnt = int((batch["labels"][:, 1:] != -100).sum())  # with labels: logits only where a label is learnt
    assert out.logits.shape == (learnt, model.config.text_config.vocab_size)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    image = batch["input_ids"] == model.config.img_context_token_id
    text = model.get_input_embeddings()(batch["input_ids"])
    assert torch.equal(out.embedding_states[~image], text[~image])
    tokens = model.image_tokens(batch["pixel_values"])
    assert tokens.shape == (batch["pixel_values"].shape[0], model.config.image_tokens_per_tile, 64)
    torch.testing.assert_close(out.embedding_states[image], tokens.reshape(-1, 64))
    with pytest.raises(ImageTokenMismatch):
        model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"][:1])


@pytest.mark.parametrize(
    ("stage", "trained"), [("align", {"projector"}), ("instruct", {"projector", "language_model"})]
)
def test_stage_gradients_reach_only_what_the_stage_trains(stage, trained):
    model, processor = tiny_compositional_model(seed=1)
    spec = stage_spec(COMPOSITIONAL, stage).with_options(text_preservation_weight=0.1)
    apply_stage(model, spec)
    model.train()
    assert not model.vision_encoder.training  # BatchNorm keeps ImageNet's statistics
    buffers = {k: v.clone() for k, v in model.vision_encoder.state_dict().items()}

    result = stage_loss(model, chat_batch(processor), spec)
    result.loss.backward()

    got = {name.split(".")[0] for name, p in model.named_parameters() if p.grad is not None}
    assert got == trained
    assert all(p.grad.abs().sum() > 0 for p in model.projector.parameters())
    assert all(p.grad is None for p in model.vision_encoder.parameters())
    assert all(torch.equal(v, model.vision_encoder.state_dict()[k]) for k, v in buffers.items())
    assert result.parts["text_preservation"] < 1e-5  # text positions are the LLM's own embeddings


def test_instruct_trains_the_llm_at_the_configured_ratio_and_the_vision_encoder_never():
    model, _ = tiny_compositional_model()
    settings = parse_train_config({"stages": {"instruct": {"llm_lr_ratio": 0.1}}}).stages["instruct"]
    spec = _stage_spec("instruct", settings, "project", COMPOSITIONAL)
    apply_stage(model, spec)
    groups = {g["lr_ratio"]: g["params"] for g in _parameter_groups(model, spec, settings)}
    assert {id(p) for p in groups[0.1]} == {id(p) for p in model.language_model.parameters()}
    assert {id(p) for p in groups[1.0]} == {id(p) for p in model.projector.parameters()}
    frozen = parse_train_config({"stages": {"instruct": {"llm_lr_ratio": 0}}}).stages["instruct"]
    assert _stage_spec("instruct", frozen, "project", COMPOSITIONAL).trainable == ("projector.",)


def test_a_batch_without_images_still_gives_the_projector_a_gradient():
    model, processor = tiny_compositional_model()
    spec = stage_spec(COMPOSITIONAL, "align")
    apply_stage(model, spec)
    text = processor.collate(
        [processor([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])]
    )
    loss, _ = StageModule(model, spec)(text)
    loss.backward()
    assert all(p.grad is not None for p in model.projector.parameters())


def test_distill_is_refused_before_any_worker_starts(tmp_workdir):
    with pytest.raises(ConfigError, match="no distill stage"):
        stage_spec(COMPOSITIONAL, "distill")
    config = parse_train_config({})
    with pytest.raises(ConfigError, match="no distill stage"):
        stage_plan(config, "distill", None, None, None, COMPOSITIONAL)
    with pytest.raises(
        ConfigError, match="train.data.align"
    ):  # `all` is align -> instruct: no distill data asked
        stage_plan(config, "all", None, None, None, COMPOSITIONAL)
    # a list of stages (how the reproduction trains a row in one run): each checked, in training order
    with pytest.raises(ConfigError, match="no distill stage"):
        stage_plan(config, "distill,align", None, None, None, COMPOSITIONAL)
    with pytest.raises(ConfigError, match="in training order"):
        stage_plan(config, "instruct,align", None, None, None, COMPOSITIONAL)
    with pytest.raises(ConfigError, match="train.data.align"):  # both named stages are planned
        stage_plan(config, "align,instruct", None, None, None, COMPOSITIONAL)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert train_main(["--config", "tiny-compositional", "--stage", "distill"]) == 2
    assert "no distill stage" in err.getvalue()


def test_preset_sections_must_fit_the_architecture():
    spec = _tiny_compositional_spec()
    with pytest.raises(ConfigError, match="model.embedding"):
        parse_model_spec({**spec, "embedding": {"num_layers": 2}})
    with pytest.raises(ConfigError, match="model.vision"):
        parse_model_spec({**spec, "architecture": "hovle"})
    with pytest.raises(ConfigError, match="model.vision.encoder"):
        config_from_spec(parse_model_spec({**spec, "vision": {"encoder": "/no/such/folder"}}))


def test_greedy_generation_with_cache_equals_without():
    model, processor = tiny_compositional_model(init_std=0.3)
    model.eval()
    one = processor(
        [{"role": "user", "content": "<image>\nWhat colour is the ellipse?"}],
        images=[shapes_image()],
        add_generation_prompt=True,
    )
    two = processor(
        [{"role": "user", "content": "Hi <image> there"}],
        images=[shapes_image(28, 28, 3)],
        add_generation_prompt=True,
    )
    batch = processor.collate([one, two], padding_side="left")  # rows with different numbers of tiles
    kwargs = dict(
        input_ids=batch["input_ids"],
        pixel_values=batch["pixel_values"],
        attention_mask=batch["attention_mask"],
        max_new_tokens=12,
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
        eos_token_id=None,
    )
    cached = model.generate(**kwargs)
    recomputed = model.generate(**kwargs, use_cache=False)
    assert torch.equal(cached.sequences, recomputed.sequences)
    for a, b in zip(cached.scores, recomputed.scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    new = cached.sequences[:, batch["input_ids"].shape[1] :]
    assert len(set(new[0].tolist())) > 3  # a real continuation, not one repeated token
    alone = model.generate(
        input_ids=one["input_ids"],
        pixel_values=one["pixel_values"],
        attention_mask=one["attention_mask"],
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=None,
    )
    assert torch.equal(alone[0, -12:], new[0])


# ---- save / load ------------------------------------------------------------------------------------------
def test_save_load_gives_identical_logits(saved):
    model, _ = tiny_compositional_model(seed=3, init_std=0.3)
    model.eval()
    loaded = AutoModelForImageTextToText.from_pretrained(saved)
    assert isinstance(loaded, CompositionalVLM) and isinstance(load_pretrained(saved), CompositionalVLM)
    processor = AutoProcessor.from_pretrained(saved)
    assert isinstance(processor, HoVLEProcessor)
    batch = chat_batch(processor)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    assert torch.equal(model(**inputs).logits, loaded.eval()(**inputs).logits)
    config = json.loads((saved / "config.json").read_text())
    assert config["model_type"] == COMPOSITIONAL and "embedding_num_layers" not in config


def test_saved_model_loads_and_generates_without_the_training_code(saved):
    script = textwrap.dedent(f"""
        import json, sys
        from transformers import AutoModelForImageTextToText, AutoProcessor
        import model.compositional  # registers "hovle-compositional" with the Auto classes
        from tests.helpers import shapes_image
        model = AutoModelForImageTextToText.from_pretrained({str(saved)!r})
        processor = AutoProcessor.from_pretrained({str(saved)!r})
        q = processor([{{"role": "user", "content": "<image> hello"}}], images=[shapes_image()],
                      add_generation_prompt=True)
        out = model.generate(input_ids=q["input_ids"], attention_mask=q["attention_mask"],
                             pixel_values=q["pixel_values"], max_new_tokens=3, min_new_tokens=3)
        heavy = sorted(m for m in ("ray", "deepspeed", "mlflow", "jobs") if m in sys.modules)
        print(json.dumps({{"heavy": heavy, "new": out.shape[1] - q["input_ids"].shape[1]}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"heavy": [], "new": 3}


def test_a_hugging_face_vision_encoder_builds_saves_and_loads(tmp_path):
    vit = _tiny_vit(tmp_path / "vit")
    model, processor = tiny_compositional_model(encoder=str(vit), input_size=28)
    assert model.config.vision_encoder == "hf" and model.config.vision_image_mean == [0.5] * 3
    from transformers import ViTModel

    vit_state = ViTModel.from_pretrained(vit).state_dict()
    assert all(
        torch.equal(v, vit_state[k]) for k, v in model.vision_encoder.backbone.model.state_dict().items()
    )
    assert model.projector[0].in_features == 32
    model.eval().save_pretrained(tmp_path / "saved")
    loaded = load_pretrained(tmp_path / "saved").eval()
    batch = chat_batch(processor)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)


# ---- the compositional teacher ----------------------------------------------------------------------------
def test_compositional_teacher_targets_are_the_models_projected_tokens_and_it_trains_nothing(saved):
    teacher = build_teacher(f"compositional:{saved}", student_hidden=64)
    assert isinstance(teacher, CompositionalTeacher) and teacher.in_input_space
    assert teacher.head is None and list(teacher.trainable_parameters()) == []
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not any(m.training for m in teacher.modules())

    model = load_pretrained(saved).eval()
    pixels = chat_batch(HoVLEProcessor.from_pretrained(saved))["pixel_values"]
    targets = teacher.targets(pixels, (2, 2))
    assert targets.shape == (pixels.shape[0], 4, 64) and not targets.requires_grad
    torch.testing.assert_close(targets, model.image_tokens(pixels))
    student = torch.randn(3, 4, 64)
    assert teacher.project(student) is student

    with pytest.raises(ValueError, match="student's LLM"):
        build_teacher(f"compositional:{saved}", student_hidden=32)


def test_compositional_teacher_refuses_other_models(saved, tmp_path):
    hovle, _ = tiny_model()
    hovle.save_pretrained(tmp_path / "hovle")
    from model.backbones import TeacherUnavailable

    with pytest.raises(TeacherUnavailable, match="'hovle' model"):
        build_teacher(f"compositional:{tmp_path / 'hovle'}", student_hidden=64)
    with pytest.raises(TeacherUnavailable, match="no config.json"):
        build_teacher(f"compositional:{tmp_path / 'missing'}", student_hidden=64)
    config = parse_train_config({"stages": {"distill": {"teacher": f"compositional:{tmp_path / 'hovle'}"}}})
    with pytest.raises(ConfigError, match="not a 'hovle-compositional' one"):
        resolve_teacher(config)
    config = parse_train_config({"stages": {"distill": {"teacher": f"compositional:{saved}"}}})
    assert resolve_teacher(config, student_hidden=64) == config  # a local folder: used where it is
    with pytest.raises(ConfigError, match="64 wide, the student's LLM takes 32"):
        resolve_teacher(config, student_hidden=32)


def test_distill_loss_with_the_compositional_teacher_is_zero_only_on_its_tokens(saved, monkeypatch):
    student, processor = tiny_model(seed=5)  # identity init: text positions already match the LLM's
    spec = stage_spec("hovle", "distill")
    teacher = build_teacher(f"compositional:{saved}", student_hidden=64)
    batch = distill_batch(processor)
    image = batch["input_ids"] == student.config.img_context_token_id
    with torch.no_grad():
        states = student.embedding(batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
    tokens = states[image].reshape(batch["pixel_values"].shape[0], -1, 64)

    real = stage_loss(student, batch, spec, teacher)
    assert real.parts["image_distill"] > 0.1 and real.parts["text_distill"] < 1e-5

    monkeypatch.setattr(teacher, "targets", lambda pixels, grid: tokens.float())
    assert stage_loss(student, batch, spec, teacher).loss.item() < 1e-5
    # the same direction at twice the size: the norm-matching term alone, (log 2)^2
    monkeypatch.setattr(teacher, "targets", lambda pixels, grid: 2 * tokens.float())
    assert stage_loss(student, batch, spec, teacher).parts["image_distill"] == pytest.approx(
        math.log(2) ** 2, 1e-4
    )

    # trains the embedding module only: nothing of the teacher's joins the optimizer
    monkeypatch.undo()
    apply_stage(student, spec)
    module = StageModule(student, spec, teacher)
    assert [n for n, _ in module.named_parameters() if not n.startswith("model.")] == []
    loss, _ = module(batch)
    loss.backward()
    assert {n.split(".")[0] for n, p in student.named_parameters() if p.grad is not None} == {"embedding"}


# ---- end to end: align -> instruct on Ray Train, then a HoVLE distill from its export ---------------------
@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_compositional_trains_on_ray_serves_and_resolves_as_a_distill_teacher_by_uri(
    tmp_path_factory, monkeypatch
):
    from safetensors.torch import load_file

    from jobs.export import load_export
    from jobs.registry import log_hovle_model
    from pipelines.corpora.synthetic import generate
    from pipelines.prepare import prepare
    from pipelines.settings import PrepareSettings

    root = tmp_path_factory.mktemp("compositional-e2e")
    monkeypatch.chdir(root)
    data = {}
    for stage in ("align", "instruct"):
        jsonl = generate(stage, 12, seed=0, output_dir=root / "corpus" / stage, image_size=56)
        inputs = [str(jsonl)]
        prepare(
            preset_processor("tiny"),
            stage,
            inputs,
            str(root / stage),
            PrepareSettings(max_tokens=256, val_fraction=0.0),
        )
        data[stage] = str(root / stage)

    def run(config: str, *args: str) -> dict:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert train_main(["--config", config, *args]) == 0
        return json.loads(out.getvalue().strip().splitlines()[-1])

    report = run(
        "tiny-compositional", "--stage", "all", "--run-name", "comp",
        "--set", f"train.data.align={data['align']}", "--set", f"train.data.instruct={data['instruct']}",
        "--set", "train.stages.align.steps=2", "--set", "train.stages.instruct.steps=2",
    )  # fmt: skip
    assert set(report["exports"]) == {"align", "instruct"}
    base, _ = tiny_compositional_model(
        seed=0
    )  # the workers build the preset's random weights from train.seed
    base = base.state_dict()
    align = load_file(str(Path(report["exports"]["align"]) / "model.safetensors"))
    instruct = load_file(str(Path(report["exports"]["instruct"]) / "model.safetensors"))
    for key, value in align.items():
        part = key.split(".")[0]
        assert torch.equal(value, base[key]) == (part != "projector"), key  # align: the projector only
        if part == "vision_encoder":
            assert torch.equal(instruct[key], base[key]), key
    assert any(not torch.equal(instruct[k], align[k]) for k in instruct if k.startswith("language_model."))
    model, _ = load_export(report["exports"]["instruct"])
    assert isinstance(model, CompositionalVLM)

    # the export as an MLflow model (its pyfunc serves it), then as a HoVLE distill teacher by models:/ URI
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    uri = log_hovle_model(report["exports"]["instruct"], report["mlflow_run_id"], tracking)
    import mlflow

    from jobs.tracking import use_tracking_uri

    shapes_image().save(root / "question.png")
    image = base64.b64encode((root / "question.png").read_bytes()).decode()  # a served model reads no paths
    with use_tracking_uri(tracking):  # not process-wide: later tests' MLflow stores stay their own
        answers = mlflow.pyfunc.load_model(uri).predict(
            [{"prompt": "What is it?", "image": image}], params={"max_new_tokens": 2}
        )
    assert list(answers.columns) == ["answer"] and len(answers) == 1
    # as a HoVLE distill teacher by its models:/ URI: resolved to a copy every worker reads (a distill
    # stage trained from a compositional teacher runs in tests/test_reproduce.py, row e)
    from jobs.run_config import load_run_config
    from model import load_preset

    teacher = {"train.stages.distill.teacher": f"compositional:{uri}", "train.run_name": "hovle"}
    hovle = load_run_config("tiny", teacher).train
    resolved = resolve_teacher(hovle, load_preset("tiny").text_config.hidden_size)
    copy = root / "runs" / "hovle" / "teacher"
    assert (copy / "config.json").is_file() and (copy / "model.safetensors").is_file()
    assert resolved.stages["distill"].teacher == f"compositional:{copy}"
