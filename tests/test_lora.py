"""LoRA (train.lora, model/lora.py): only the adapters train, exports merge or keep them, both load back
to the adapted model's logits, a DeepSpeed checkpoint holds them, and a registered adapter model answers.

In-process tests use the tiny preset and a few plain optimizer steps. The end-to-end run (Ray Train +
DeepSpeed, an adapter export registered and asked through pyfunc) is tests/test_llm_families.py's Gemma 2
run, which tunes instruct with LoRA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from jobs.export import write_export
from jobs.train_config import parse_train_config
from model import apply_stage, load_pretrained, stage_spec
from model.config import ConfigError
from model.lora import ADAPTER_FOLDER, add_lora, split_adapter
from tests.conftest import REPO_ROOT
from tests.helpers import chat_batch, tiny_model

TARGETS = ["q_proj", "v_proj"]


def adapted_model(parts=("llm",), steps: int = 3):
    """A tiny HoVLE with LoRA on `parts`, trained `steps` plain AdamW steps as the instruct stage;
    returns (model, processor, its weights before LoRA, a batch)."""
    model, processor = tiny_model(init_std=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = add_lora(model, r=4, alpha=8.0, dropout=0.0, target_modules=TARGETS, parts=list(parts))
    spec = stage_spec("hovle", "instruct").with_options(adapted=adapted)
    optimizer = torch.optim.AdamW(apply_stage(model, spec), lr=1e-2)
    batch = chat_batch(processor)
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), processor, before, batch


MERGED = {"atol": 2e-4, "rtol": 1e-4}  # W + s*B@A rounds apart from W x + s*B(A x) in fp32


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def lora_info(export: str) -> dict:
    return {"stage": "instruct", "lora": {"r": 4, "lora_alpha": 8.0, "export": export, "base": "preset"}}


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("r", 0, "train.lora.r: Input should be greater than or equal to 1"),
        ("on", ["vision"], "train.lora.on.0: Input should be 'llm' or 'embedding'"),
        ("target_modules", ["q_proj.*"], "train.lora.target_modules.0: String should match pattern"),
        ("target_modules", [], "train.lora.target_modules: List should have at least 1 item"),
        ("export", "gguf", "train.lora.export: Input should be 'merged' or 'adapter'"),
        ("rank", 8, "train.lora.rank: Extra inputs are not permitted"),
    ],
)
def test_a_bad_lora_setting_fails_with_its_dotted_name(field, value, expected):
    with pytest.raises(ConfigError, match="^config: " + expected.replace("(", r"\(").replace("*", r"\*")):
        parse_train_config({"lora": {field: value}})


def test_lora_settings_default_to_llama_attention_on_the_llm_merged():
    lora = parse_train_config({"lora": {}}).lora
    assert (lora.r, lora.lora_alpha, lora.on, lora.export) == (8, 16.0, ["llm"], "merged")
    assert parse_train_config({}).lora is None


def test_a_target_module_the_model_lacks_is_refused_with_the_layers_it_has():
    model, _ = tiny_model()
    with pytest.raises(
        ConfigError, match=r"train.lora.target_modules: \['qkv'\] name no linear layer.*q_proj"
    ):
        add_lora(model, 4, 8.0, 0.0, ["qkv"], ["llm"])


def test_with_lora_on_the_llm_only_its_adapters_and_the_embedding_train():
    model, _, before, _ = adapted_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    llm = {n for n in trainable if n.startswith("language_model.")}
    assert llm and all(".lora_A." in n or ".lora_B." in n for n in llm)
    assert any(n.startswith("embedding.") for n in trainable)  # instruct still trains it in full
    base, adapter = split_adapter(model.state_dict())
    for key, tensor in base.items():
        if key.startswith("language_model."):
            assert torch.equal(tensor, before[key]), key  # bit-identical after the steps
    assert adapter and all(torch.count_nonzero(t) > 0 for k, t in adapter.items() if ".lora_B." in k)
    assert any(not torch.equal(base[k], before[k]) for k in base if k.startswith("embedding."))


def test_lora_on_the_embedding_adapts_its_layers_and_freezes_their_base():
    model, _, before, _ = adapted_model(parts=("llm", "embedding"), steps=1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("embedding.layers.") and ".lora_A." in n for n in trainable)
    assert not any(n.startswith("embedding.layers.") and "base_layer" in n for n in trainable)
    assert "embedding.patch_embed.weight" in trainable  # outside the adapted layers: trained in full
    assert not any(n.startswith("language_model.") and "base_layer" in n for n in trainable)


def test_merged_export_loads_without_peft_to_the_adapted_models_logits(tmp_path):
    model, processor, _, batch = adapted_model()
    write_export(model, processor, model.state_dict(), str(tmp_path / "merged"), lora_info("merged"))
    assert not (tmp_path / "merged" / ADAPTER_FOLDER).exists()
    assert not any(
        "lora" in k or "base_layer" in k for k in load_file(tmp_path / "merged" / "model.safetensors")
    )
    torch.testing.assert_close(
        logits(load_pretrained(tmp_path / "merged").eval(), batch), logits(model, batch), **MERGED
    )
    # a plain process: transformers alone, peft never imported
    script = (
        "import sys\nfrom model import load_pretrained\n"
        f"load_pretrained({str(tmp_path / 'merged')!r})\n"
        "assert 'peft' not in sys.modules, 'peft imported'\nprint('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]


def test_adapter_export_loads_merged_kept_and_through_peft_to_the_same_logits(tmp_path):
    from peft import PeftModel

    model, processor, before, batch = adapted_model()
    folder = tmp_path / "adapter"
    write_export(model, processor, model.state_dict(), str(folder), lora_info("adapter"))
    config = json.loads((folder / ADAPTER_FOLDER / "adapter_config.json").read_text())
    assert (
        config["peft_type"] == "LORA" and config["r"] == 4 and config["base_model_name_or_path"] == "preset"
    )
    stored = load_file(folder / "model.safetensors")
    assert all(torch.equal(stored[k], before[k]) for k in stored if k.startswith("language_model."))
    want = logits(model, batch)
    merged = load_pretrained(folder).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, batch), want, **MERGED)
    kept = load_pretrained(folder, keep_adapter=True).eval()
    assert any(".lora_A." in n for n, _ in kept.named_parameters())
    torch.testing.assert_close(logits(kept, batch), want)
    # the base alone, and the adapter over it as peft's users load one (PeftModel)
    os.rename(folder / ADAPTER_FOLDER, tmp_path / "peft-adapter")
    plain = load_pretrained(folder).eval()
    assert not torch.allclose(logits(plain, batch), want)  # the adapter matters
    with_peft = PeftModel.from_pretrained(plain, str(tmp_path / "peft-adapter")).eval()
    torch.testing.assert_close(logits(with_peft, batch), want)


def test_a_pickled_adapter_is_refused(tmp_path):
    model, processor, _, _ = adapted_model(steps=1)
    folder = tmp_path / "adapter"
    write_export(model, processor, model.state_dict(), str(folder), lora_info("adapter"))
    weights = folder / ADAPTER_FOLDER / "adapter_model.safetensors"
    torch.save(load_file(weights), folder / ADAPTER_FOLDER / "adapter_model.bin")
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="adapters load from safetensors only"):
        load_pretrained(folder)


_CHECKPOINT_SCRIPT = """
import os, sys, torch
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed
from jobs.strategy import DeepSpeedStrategy, load_comm_op
load_comm_op()
deepspeed.init_distributed("gloo")
from jobs.train_config import parse_train_config
from jobs.train_loop import StageModule
from model import apply_stage, stage_spec
from model.lora import add_lora
from tests.helpers import chat_batch, tiny_model

stages = {"instruct": {"lr": 1e-2, "warmup_steps": 0}}
config = parse_train_config({"deepspeed": {"zero_stage": int(sys.argv[3])}, "stages": stages})

def engine():
    model, processor = tiny_model()
    adapted = add_lora(model, 4, 8.0, 0.0, ["q_proj"], ["llm"])
    spec = stage_spec("hovle", "instruct").with_options(adapted=adapted)
    strategy = DeepSpeedStrategy(config, config.stages["instruct"], 1)
    strategy.setup(StageModule(model, spec), [{"params": apply_stage(model, spec)}])
    return strategy, processor

strategy, processor = engine()
batch = chat_batch(processor)
for _ in range(2):
    loss, _ = strategy.forward(batch); strategy.backward(loss); strategy.step()
strategy.save(sys.argv[1], {"step": 2})
trained = strategy.full_state_dict()
again, _ = engine()
assert again.load(sys.argv[1])["step"] == 2
restored = again.full_state_dict()
lora = [k for k in trained if ".lora_B." in k]
assert lora and all(torch.count_nonzero(trained[k]) for k in lora)
assert all(torch.equal(trained[k], restored[k]) for k in trained)
print("ok")
"""


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_a_deepspeed_checkpoint_holds_the_adapters_and_restores_them(tmp_path, zero_stage):
    port = str(29500 + (os.getpid() + zero_stage) % 400)
    done = subprocess.run(
        [sys.executable, "-c", _CHECKPOINT_SCRIPT, str(tmp_path / "ckpt"), port, str(zero_stage)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_lora_applies_only_to_the_parts_a_stage_trains_and_adapters_learn_at_the_stages_lr():
    from jobs.train_loop import _add_lora, _parameter_groups, _stage_spec

    config = parse_train_config({"lora": {"r": 2, "target_modules": ["q_proj"], "on": ["llm", "embedding"]}})
    model, _ = tiny_model()
    align = _stage_spec("align", config.stages["align"])
    spec = _add_lora(model, align, config)
    assert spec.adapted == ("embedding.layers.",)  # align does not train the LLM: no adapters there
    assert not any(n.startswith("language_model.") and "lora" in n for n, _ in model.named_parameters())

    model, _ = tiny_model()
    settings = config.stages["instruct"].model_copy(update={"llm_lr_ratio": 0.1})
    spec = _add_lora(model, _stage_spec("instruct", settings), config)
    assert spec.adapted == ("language_model.", "embedding.layers.")
    apply_stage(model, spec)
    groups = {g["lr_ratio"]: g["params"] for g in _parameter_groups(model, spec, settings)}
    adapters = {id(p) for n, p in model.named_parameters() if n.startswith("language_model.") and "lora" in n}
    assert adapters <= {id(p) for p in groups[1.0]}  # llm_lr_ratio is full fine-tuning's
    assert set(groups) == {1.0}  # nothing else of the LLM trains


def test_lora_on_the_embedding_of_a_compositional_model_is_refused():
    from jobs.train_loop import _add_lora, _stage_spec
    from tests.helpers import tiny_compositional_model

    model, _ = tiny_compositional_model()
    config = parse_train_config({"lora": {"on": ["llm", "embedding"]}})
    spec = _stage_spec("instruct", config.stages["instruct"], model_type=model.config.model_type)
    with pytest.raises(ConfigError, match="train.lora.on: embedding: this model has no embedding module"):
        _add_lora(model, spec, config)
