"""`make gpu-check`: the GPU path (bf16, SDPA / flash attention, NCCL, ZeRO-2/3, MFU) on one GPU, in one
prepared script that finishes inside a 10-minute slot with what the machine has.

Sections, in order, each in its own try/except with a share of a total time cap (`--time-cap`); a failing
or timed-out section is recorded (error type, message, the traceback's tail) and the next one runs:

    environment    torch / CUDA / device, bf16 support, which packages import (deepspeed, flash_attn)
    attention      each SDPA kernel (flash, memory-efficient, cuDNN, math) on a causal bf16 problem
    reference      every stage (distill, align, instruct) a few steps at the smollm2 shape (small batch) on
                   the CPU in fp32 and on the GPU in bf16 autocast, from the same random weights and batch:
                   finite losses, equal within bf16 tolerance step by step
    throughput     tokens/s and MFU per stage at the smollm2 shape and at a slice of the 2.6B shape (the
                   hovle-2.6b preset with fewer layers; full width, vocabulary and 448-px tiles), bf16, SDPA
    deepspeed      the platform's own DeepSpeedStrategy (jobs.strategy), single process over NCCL, ZeRO-2 and
                   ZeRO-3, the instruct stage at the smollm2 shape: tokens/s, MFU, losses agreeing across them
    flash-attn-2   the throughput of instruct with attn_implementation flash_attention_2 (when it imports)

Models have random weights built from the preset's shapes (no GGUF, no download); the vision teacher of
distill is a random patch convolution. FLOPs per token come from jobs.flops, the peak from the device's
name (jobs.flops.PEAK_TFLOPS) or `--peak-tflops`. Results: results/gpu_check.json (rewritten after every
section, so a killed run keeps what it measured) and a summary on stdout. Exit status 0 when every section
passed or was skipped, 1 otherwise; on a machine without a GPU it says so, writes a JSON saying so, exits 0.

What the project needs beyond torch and transformers (pydantic, pyyaml; deepspeed and hjson for the
deepspeed section) travels as wheels where the GPU machine lacks it (see the device tool's README).

    python benchmarks/gpu_check.py [--output results/gpu_check.json] [--time-cap 540] [--steps 6]
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import platform
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

DEFAULT_OUTPUT = REPO_ROOT / "results" / "gpu_check.json"
STAGES = ("distill", "align", "instruct")

# SmolLM2-135M-Instruct's shape (the smollm2 preset reads it from the GGUF, which a GPU machine lacks):
# 49,152 tokens + HoVLE's 9 added ones, which take the vocabulary's last ids when there is no tokenizer.
SMOLLM2_135M = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
    "vocab_size": 49161,
}

# bf16 autocast against an fp32 CPU run: |gpu - cpu| <= ATOL + RTOL * |cpu| per step.
RTOL, ATOL = 0.02, 0.02


# ---- models and batches ---------------------------------------------------------------------------------
def model_spec(shape: str, llm_layers: int | None = None, embedding_layers: int | None = None) -> dict:
    """The `model:` section of a preset with random LLM weights: `tiny`, `smollm2-135m` (its GGUF replaced
    by SmolLM2-135M's shape) or `hovle-2.6b`; `llm_layers` / `embedding_layers` cut it to a slice."""
    from model.config_files import read_run_document

    document, _ = read_run_document(shape)
    spec = json.loads(json.dumps(document["model"]))  # a deep copy
    if "config" not in spec["llm"]:
        spec["llm"] = {"config": dict(SMOLLM2_135M), "tokenizer": None}
    if llm_layers is not None:
        spec["llm"]["config"]["num_hidden_layers"] = llm_layers
    if embedding_layers is not None:
        spec.setdefault("embedding", {})["num_layers"] = embedding_layers
    return spec


def build(spec: dict, seed: int, attn: str = "sdpa"):
    """(model, distill teacher): the spec's HoVLE model with random weights from `seed` (fp32, on the CPU),
    and a random patch-convolution vision teacher with its trainable head."""
    from model import build_model
    from model.presets import config_from_spec, parse_model_spec
    from model.teachers import VisionTeacher

    spec = {**spec, "llm": {**spec["llm"], "attn_implementation": attn}}
    config = config_from_spec(parse_model_spec(spec, "gpu_check"))
    torch.manual_seed(seed)
    model = build_model(config)
    stride = config.tile_size // config.image_grid  # one teacher feature per student image token
    backbone = nn.Conv2d(3, 256, kernel_size=stride, stride=stride)
    teacher = VisionTeacher(backbone, 256, config.text_config.hidden_size)
    return model, teacher


def synthetic_batch(config, batch_size: int, seq_len: int, tiles: int, seed: int) -> dict[str, torch.Tensor]:
    """Rows of `seq_len` tokens: 8 text tokens, <img> + <IMG_CONTEXT> x (tiles x tokens per tile) + </img>,
    then text to the end, which is what the next-token stages learn; `tiles` random tiles per row."""
    generator = torch.Generator().manual_seed(seed)
    image_tokens = tiles * config.image_tokens_per_tile
    prefix, suffix = 8, seq_len - 8 - image_tokens - 2
    if suffix < 1:
        raise ValueError(f"seq_len {seq_len} holds no text after {tiles} tile(s) of {image_tokens} tokens")
    top = min(config.img_start_token_id, config.img_end_token_id, config.img_context_token_id)

    def text(n: int) -> torch.Tensor:
        return torch.randint(0, top, (batch_size, n), generator=generator)

    def token(token_id: int, n: int = 1) -> torch.Tensor:
        return torch.full((batch_size, n), token_id)

    input_ids = torch.cat(
        [
            text(prefix),
            token(config.img_start_token_id),
            token(config.img_context_token_id, image_tokens),
            token(config.img_end_token_id),
            text(suffix),
        ],
        dim=1,
    )
    labels = input_ids.clone()
    labels[:, : prefix + image_tokens + 2] = -100
    size = config.tile_size
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "pixel_values": torch.randn(batch_size * tiles, 3, size, size, generator=generator),
    }


# ---- one stage, a few steps ------------------------------------------------------------------------------
@dataclass
class StageRun:
    """A few training steps of one stage on one device."""

    stage: str
    device: str
    bf16: bool
    losses: list[float]
    seconds: float  # the timed steps (after `warmup`)
    tokens_per_s: float
    flops_per_token: float
    peak_memory_gib: float | None = None
    mfu: float | None = None

    @property
    def finite(self) -> bool:
        return all(math.isfinite(loss) for loss in self.losses)


def run_stage_steps(
    spec: dict,
    stage: str,
    device: str | torch.device = "cpu",
    *,
    steps: int = 2,
    warmup: int = 0,
    batch_size: int = 2,
    seq_len: int = 64,
    tiles: int = 1,
    bf16: bool = False,
    lr: float = 1e-4,
    seed: int = 0,
    attn: str = "sdpa",
    peak_flops: float | None = None,
) -> StageRun:
    """`steps` AdamW steps of `stage` (model.stages' loss, trainable split and teacher) on one synthetic
    batch, from the random weights `seed` gives: fp32, or bf16 autocast over fp32 weights with `bf16`.
    Tokens/s counts the steps after `warmup`; MFU needs `peak_flops` (FLOP/s of the device)."""
    from jobs.flops import flops_per_token
    from model import apply_stage, stage_loss, stage_spec

    device = torch.device(device)
    model, teacher = build(spec, seed, attn)
    spec_ = stage_spec("hovle", stage)
    trainable = apply_stage(model, spec_)
    if spec_.needs_teacher:
        trainable += list(teacher.trainable_parameters())
    model.to(device).train()
    teacher.to(device).train()
    batch = {
        k: v.to(device) for k, v in synthetic_batch(model.config, batch_size, seq_len, tiles, seed).items()
    }
    optimizer = torch.optim.AdamW(trainable, lr=lr, betas=(0.9, 0.95))
    _reset_peak(device)
    losses, start = [], time.perf_counter()
    for step in range(steps):
        if step == warmup:
            _sync(device)
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            result = stage_loss(model, batch, spec_, teacher if spec_.needs_teacher else None)
        result.loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(result.loss.detach()))
    _sync(device)
    seconds = time.perf_counter() - start
    tokens_per_s = batch_size * seq_len * (steps - warmup) / seconds if steps > warmup else 0.0
    per_token = flops_per_token(model, stage, seq_len)
    return StageRun(
        stage=stage,
        device=str(device),
        bf16=bf16,
        losses=losses,
        seconds=seconds,
        tokens_per_s=tokens_per_s,
        flops_per_token=per_token,
        peak_memory_gib=_peak_memory(device),
        mfu=tokens_per_s * per_token / peak_flops if peak_flops else None,
    )


def losses_agree(reference: list[float], other: list[float]) -> bool:
    """Step by step within bf16 tolerance (|other - reference| <= ATOL + RTOL * |reference|)."""
    return len(reference) == len(other) and all(
        abs(o - r) <= ATOL + RTOL * abs(r) for r, o in zip(reference, other)
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


# ---- sections ---------------------------------------------------------------------------------------------
class SectionTimeout(BaseException):
    """A section ran past its share of the time cap (a BaseException: no `except Exception` inside swallows
    it)."""


@dataclass
class Check:
    """The whole check's record: sections in order, written to `output` after each one."""

    output: Path
    deadline: float  # time.monotonic() by which everything must have ended
    report: dict[str, Any] = field(default_factory=dict)

    def save(self) -> None:
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.output.write_text(json.dumps(self.report, indent=2, default=str) + "\n")

    def section(self, name: str, body: Callable[[], dict], budget_s: float) -> dict:
        """Run `body` with at most `budget_s` seconds (and never past the deadline); record its result or
        its error and carry on."""
        left = self.deadline - time.monotonic()
        limit = min(budget_s, left)
        record: dict[str, Any] = {"status": "ok"}
        started = time.monotonic()
        if limit < 5:
            record = {"status": "skipped", "reason": f"the time cap left {max(left, 0):.0f} s"}
        else:
            previous = signal.signal(signal.SIGALRM, _raise_timeout)
            signal.setitimer(signal.ITIMER_REAL, limit)
            try:
                record["result"] = body()
                record["status"] = record["result"].pop("status", "ok")
            except SectionTimeout:
                record = {"status": "timeout", "error": f"past its {limit:.0f} s"}
            except Exception as err:  # a GPU check records every failure and goes on
                lines = traceback.format_exc().strip().splitlines()
                record = {
                    "status": "error",
                    "error": f"{type(err).__name__}: {err}",
                    "traceback": lines[-12:],
                }
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)
                _free_memory()
        record["seconds"] = round(time.monotonic() - started, 1)
        self.report.setdefault("sections", {})[name] = record
        self.save()
        print(f"[{name}] {record['status']} ({record['seconds']} s)" + _brief(record), flush=True)
        return record


def _raise_timeout(signum, frame) -> None:
    raise SectionTimeout


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _brief(record: dict) -> str:
    if "error" in record:
        return f": {record['error']}"
    return f": {record['reason']}" if "reason" in record else ""


def environment() -> dict:
    props = torch.cuda.get_device_properties(0)
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0),
        "memory_gib": round(props.total_memory / 2**30, 1),
        "multiprocessors": props.multi_processor_count,
        "bf16_supported": torch.cuda.is_bf16_supported(),
        "packages": {
            name: importlib.util.find_spec(name) is not None
            for name in ("transformers", "pydantic", "yaml", "deepspeed", "flash_attn")
        },
        "cpu_threads": torch.get_num_threads(),
    }


def attention_kernels() -> dict:
    """Each SDPA backend on a causal bf16 problem (batch 2, 16 heads, 2048 tokens, head dim 128)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(2, 16, 2048, 128, device="cuda", dtype=torch.bfloat16)
    out = {}
    for backend in (
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.MATH,
    ):
        try:
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, q, q, is_causal=True)
            torch.cuda.synchronize()
            out[backend.name] = "ok"
        except RuntimeError as err:  # the kernel is not available for this device / build / shape
            out[backend.name] = f"unavailable: {str(err).splitlines()[0][:200]}"
    if out[SDPBackend.FLASH_ATTENTION.name] != "ok":
        out["status"] = "error"
    return out


def reference(args: argparse.Namespace) -> dict:
    """Each stage 2 steps at the smollm2 shape, CPU fp32 vs GPU bf16, same weights and batch."""
    preset, seq_len = ("tiny", 64) if args.dry_run else ("smollm2-135m", 192)
    spec = model_spec(preset)
    out: dict[str, Any] = {"tolerance": {"rtol": RTOL, "atol": ATOL}, "batch": [2, seq_len], "stages": {}}
    agree = True
    for stage in STAGES:
        kwargs = {"steps": 2, "batch_size": 2, "seq_len": seq_len, "tiles": 1, "seed": 0}
        cpu = run_stage_steps(spec, stage, "cpu", **kwargs)
        gpu = run_stage_steps(spec, stage, args.device, bf16=True, **kwargs)
        ok = cpu.finite and gpu.finite and losses_agree(cpu.losses, gpu.losses)
        agree &= ok
        out["stages"][stage] = {"cpu_fp32": cpu.losses, "gpu_bf16": gpu.losses, "agree": ok}
    if not agree:
        out["status"] = "mismatch"
    return out


# (shape, preset, llm layers, embedding layers, batch, seq_len, tiles)
THROUGHPUT_SHAPES = {
    "smollm2-135m": ("smollm2-135m", None, None, 16, 1024, 4),
    "hovle-2.6b-slice": ("hovle-2.6b", 6, 2, 8, 2048, 4),
}
DRY_RUN_SHAPES = {"tiny": ("tiny", None, None, 2, 64, 1)}  # --dry-run: this script's paths on a CPU


def throughput(args: argparse.Namespace, shape: str, stages=STAGES, attn: str = "sdpa") -> dict:
    preset, llm_layers, embedding_layers, batch, seq_len, tiles = args.shapes[shape]
    spec = model_spec(preset, llm_layers, embedding_layers)
    peak = _peak(args)
    out: dict[str, Any] = {
        "preset": preset,
        "llm_layers": llm_layers or "all",
        "embedding_layers": embedding_layers or "all",
        "batch": batch,
        "seq_len": seq_len,
        "tiles_per_row": tiles,
        "attn_implementation": attn,
        "peak_tflops": peak / 1e12 if peak else None,
        "stages": {},
    }
    for stage in stages:
        run = run_stage_steps(
            spec, stage, args.device, steps=args.warmup + args.steps, warmup=args.warmup, batch_size=batch,
            seq_len=seq_len, tiles=tiles, bf16=True, attn=attn, peak_flops=peak,
        )  # fmt: skip
        out["stages"][stage] = asdict(run) | {"finite": run.finite}
        if not run.finite:
            out["status"] = "error"
    return out


def deepspeed_zero(args: argparse.Namespace) -> dict:
    """ZeRO-2 and ZeRO-3 through jobs.strategy.DeepSpeedStrategy, one process over NCCL, the instruct stage
    at the smollm2 shape (bf16 weights, as the platform trains on GPUs; gloo and fp32 on a dry run)."""
    if importlib.util.find_spec("deepspeed") is None:
        return {"status": "skipped", "reason": "deepspeed does not import here (carry it as a wheel)"}
    import deepspeed
    import torch.distributed as dist

    from jobs.flops import flops_per_token
    from jobs.strategy import DeepSpeedStrategy
    from jobs.train_config import StageSettings, TrainConfig
    from model import apply_stage, stage_loss, stage_spec

    gpu = args.device == "cuda"
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517", "RANK": "0", "LOCAL_RANK": "0"}
    for key, value in {**rendezvous, "WORLD_SIZE": "1"}.items():
        os.environ.setdefault(key, value)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo")
    if gpu:
        torch.cuda.set_device(0)
    shape = next(iter(args.shapes))
    preset, _, _, batch_size, seq_len, tiles = args.shapes[shape]
    spec, peak, steps = model_spec(preset), _peak(args), args.warmup + args.steps
    precision = "bf16" if gpu else "fp32"  # a CPU without native bf16 matmul crawls (jobs.strategy)
    out: dict[str, Any] = {
        "backend": dist.get_backend(),
        "shape": shape,
        "precision": precision,
        "batch": batch_size,
        "seq_len": seq_len,
        "zero": {},
    }
    for zero in (2, 3):
        model, _ = build(spec, seed=0)
        stage = stage_spec("hovle", "instruct")
        apply_stage(model, stage)
        config = TrainConfig.model_validate(
            {"scaling": {"use_gpu": gpu}, "deepspeed": {"zero_stage": zero, "precision": precision}}
        )
        settings = StageSettings(steps=steps, lr=1e-4, warmup_steps=0, micro_batch_size=batch_size)
        strategy = DeepSpeedStrategy(config, settings, world_size=1)
        module = _LossModule(model, stage, stage_loss)
        strategy.setup(module, [{"params": [p for p in model.parameters() if p.requires_grad]}])
        device, dtype = strategy.device, strategy.dtype
        batch = synthetic_batch(model.config, batch_size, seq_len, tiles, seed=0)
        batch = {k: v.to(device, dtype if v.is_floating_point() else None) for k, v in batch.items()}
        _reset_peak(device)
        losses, start = [], time.perf_counter()
        for step in range(steps):
            if step == args.warmup:
                _sync(device)
                start = time.perf_counter()
            loss, _ = strategy.forward(batch)
            strategy.backward(loss)
            strategy.step()
            losses.append(float(loss.detach()))
        _sync(device)
        tokens_per_s = batch_size * seq_len * args.steps / (time.perf_counter() - start)
        per_token = flops_per_token(module.model, "instruct", seq_len)
        out["zero"][str(zero)] = {
            "losses": losses,
            "finite": all(math.isfinite(x) for x in losses),
            "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * per_token / peak if peak else None,
            "peak_memory_gib": _peak_memory(device),
        }
        del strategy, module, model
        _free_memory()
    zero2, zero3 = out["zero"]["2"]["losses"], out["zero"]["3"]["losses"]
    out["zero2_zero3_first_loss_agree"] = losses_agree(zero2[:1], zero3[:1])
    if not (out["zero2_zero3_first_loss_agree"] and all(z["finite"] for z in out["zero"].values())):
        out["status"] = "mismatch"
    return out


class _LossModule(nn.Module):
    """What the DeepSpeed engine wraps: forward(batch) = the stage's loss (loss, parts)."""

    def __init__(self, model: nn.Module, stage, loss_fn) -> None:
        super().__init__()
        self.model, self.stage, self.loss_fn = model, stage, loss_fn

    def forward(self, batch: dict[str, torch.Tensor]):
        result = self.loss_fn(self.model, batch, self.stage)
        return result.loss, result.parts


def _peak(args: argparse.Namespace) -> float | None:
    """The device's dense bf16 peak FLOP/s (None on a dry run without --peak-tflops: no MFU then)."""
    from jobs.flops import peak_flops

    name = "cpu" if args.dry_run else torch.cuda.get_device_name(0)
    peak = peak_flops(name, args.peak_tflops)
    if peak is None and not args.dry_run:
        raise ValueError(f"no peak FLOP/s known for {name!r}: pass --peak-tflops")
    return peak


# ---- main -----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--time-cap", type=float, default=540, help="seconds for everything (default 540)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per stage (default 6)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them (default 2)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="every section on the CPU at the tiny shape (tests this script)",
    )
    args = parser.parse_args(argv)
    args.device = "cpu" if args.dry_run else "cuda"
    args.shapes = DRY_RUN_SHAPES if args.dry_run else THROUGHPUT_SHAPES
    check = Check(args.output, time.monotonic() + args.time_cap)
    check.report = {"gpu": torch.cuda.is_available(), "torch": torch.__version__, "time_cap_s": args.time_cap}
    check.report["dry_run"] = args.dry_run
    if not torch.cuda.is_available() and not args.dry_run:
        check.report["reason"] = "no GPU found (torch.cuda.is_available() is False): nothing to check"
        check.save()
        print(f"gpu-check: no GPU found (torch {torch.__version__}); wrote {args.output}")
        return 0

    # budgets: the sections after these still get their turn, each up to what the cap leaves
    if not args.dry_run:
        check.section("environment", environment, 30)
        check.section("attention", attention_kernels, 30)
    check.section("reference", lambda: reference(args), 120)
    for shape in args.shapes:
        check.section(f"throughput {shape}", lambda shape=shape: throughput(args, shape), 120)
    check.section("deepspeed", lambda: deepspeed_zero(args), 120)
    if importlib.util.find_spec("flash_attn") is not None and not args.dry_run:
        flash = lambda: throughput(args, "smollm2-135m", ("instruct",), "flash_attention_2")  # noqa: E731
        check.section("flash-attn-2", flash, 60)
    sections = check.report["sections"]
    print(summary(sections))
    print(f"wrote {args.output}")
    return 0 if all(s["status"] in ("ok", "skipped") for s in sections.values()) else 1


def summary(sections: dict[str, dict]) -> str:
    """Per stage tokens/s, MFU and peak memory of every timed section, and the reference's agreement."""
    lines = ["", f"{'section':<30}{'stage':<10}{'tokens/s':>12}{'MFU':>8}{'peak GiB':>10}"]
    for name, record in sections.items():
        result = record.get("result", {})
        for stage, run in result.get("stages", {}).items():
            if "tokens_per_s" in run:
                lines.append(f"{name:<30}{stage:<10}{_figures(run)}")
            elif "agree" in run:
                lines.append(
                    f"{name:<30}{stage:<10} agree {run['agree']}: cpu {run['cpu_fp32']} gpu {run['gpu_bf16']}"
                )
        for zero, run in result.get("zero", {}).items():
            lines.append(f"{name + ' ZeRO-' + zero:<30}{'instruct':<10}{_figures(run)}")
    return "\n".join(lines)


def _figures(run: dict) -> str:
    mfu = f"{run['mfu']:.1%}" if run.get("mfu") is not None else "-"
    memory = f"{run['peak_memory_gib']:.1f}" if run.get("peak_memory_gib") is not None else "-"
    return f"{run['tokens_per_s']:>12,.0f}{mfu:>8}{memory:>10}"


if __name__ == "__main__":
    raise SystemExit(main())
