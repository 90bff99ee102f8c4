"""`hovle inspect CONFIG [--json] [--gpus N] ...`: size a HoVLE config before a run, on the meta device.

Parameters per part (holistic embedding module, LLM) and per training stage, ZeRO-1/2/3 model-state
memory per GPU, and each stage at HoVLE's data sizes (`PAPER_DATA`): FLOPs (jobs.flops), GPU-hours at a
stated MFU of a stated peak, wall-clock on the cluster, and its model states per GPU. A table, or with
`--json` one JSON object as the last line of stdout (libraries may print before it).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from jobs.cli import run_command
from jobs.logging_setup import setup_logging

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

GIB = 1024**3


@dataclass(frozen=True)
class StageData:
    """One stage's training data at paper scale: samples seen (one epoch) and the tokens one sample holds."""

    samples: float
    tokens_per_sample: int
    sample: str  # what one sample is assumed to be


# HoVLE's data per stage (HOVLE.md, "The three training stages"; the sizes are unconfirmed) and the tokens
# one sample is assumed to hold in the LLM's sequence (448-px tiles -> 256 image tokens each).
PAPER_DATA: dict[str, StageData] = {
    "distill": StageData(550e6, 256, "one 448-px tile (256 image tokens) or a 256-token text snippet"),
    "align": StageData(50e6, 320, "an image-text pair: one tile (256 image tokens) + 64 text tokens"),
    "instruct": StageData(7e6, 1536, "a conversation: 4 tiles + thumbnail (1,280 image tokens) + 256 text"),
}


@dataclass(frozen=True)
class Throughput:
    """What the GPU-hours are computed at: a model FLOPs utilisation of a peak, and the ZeRO stage whose
    per-GPU model states are shown."""

    mfu: float = 0.4
    peak_tflops: float = 989.0  # H100 / H200 SXM dense bf16 (no sparsity), per GPU
    zero_stage: int = 2  # the platform's default (jobs.train_config)


@dataclass(frozen=True)
class StageSizing:
    """One stage at paper scale on the report's cluster."""

    samples: float
    tokens: float
    flops_per_token: float
    flops: float
    gpu_hours: float
    wall_hours: float  # GPU-hours / GPUs: perfect scaling at the stated MFU
    nodes: int
    model_states_per_gpu: int  # bytes: trainable states under the ZeRO stage + frozen weights in bf16


@dataclass(frozen=True)
class ModelReport:
    """Parameter counts of one config, the ZeRO model-state memory it needs per GPU, and each stage's
    size at HoVLE's data sizes."""

    config: str
    params_total: int
    params_embedding: int  # the holistic embedding module
    params_llm: int  # the language model, minus any parameter it shares with the embedding module
    params_other: int  # anything outside both (0 for HoVLE)
    largest_layer_params: int
    trainable: dict[str, int]  # stage name -> trainable parameters (the distill teacher is not the model's)
    zero_basis_stage: str  # the stage whose trainable parameters the ZeRO estimates are for
    zero: dict[str, int]  # ZeRO stage ("1", "2", "3") -> bytes of model states per GPU
    gpus: int
    gpus_per_node: int
    nodes: int
    throughput: Throughput = field(default_factory=Throughput)
    sizing: dict[str, StageSizing] = field(default_factory=dict)  # stage -> its size at paper scale


def count_parameters(params: Iterable[nn.Parameter]) -> int:
    """Number of elements in `params`, each tensor counted once even if it appears twice (tied weights)."""
    return sum({id(p): p.numel() for p in params}.values())


def zero_model_states_bytes(
    params: int, largest_layer: int, gpus_per_node: int, nodes: int
) -> dict[str, int]:
    """GPU bytes per device for the model states (weights, gradients, Adam) of `params` trainable
    parameters in mixed precision without CPU offload, per ZeRO stage.

    Activations, communication buckets and the allocator's fragmentation come on top.
    """
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    gpus = gpus_per_node * nodes
    # DeepSpeed ships no ZeRO-1 estimator. Same per-parameter accounting as its ZeRO-2 one
    # (2 B bf16 weights replicated; 18 B = 2 bf16 grads + 4 fp32 grads + 4 fp32 master weights
    # + 8 Adam moments, partitioned), except that ZeRO-1 keeps the bf16 gradients replicated:
    # 4 B replicated + 16 B partitioned. At one GPU it equals ZeRO-2, as it should.
    zero1 = 4 * params + int(16 * params / gpus)
    _, zero2 = estimate_zero2_model_states_mem_needs(
        params, num_gpus_per_node=gpus_per_node, num_nodes=nodes, cpu_offload=False
    )
    _, zero3, _ = estimate_zero3_model_states_mem_needs(
        params,
        largest_layer,
        num_gpus_per_node=gpus_per_node,
        num_nodes=nodes,
        cpu_offload=False,
        cpu_offload_params=False,
        zero_init=True,
    )
    return {"1": zero1, "2": int(zero2), "3": int(zero3)}


def inspect_config(
    config_path: str | Path, gpus_per_node: int = 8, nodes: int = 1, throughput: Throughput | None = None
) -> ModelReport:
    """Build the config's model on the meta device and report its size, ZeRO memory needs and each
    stage's size at HoVLE's data sizes (`throughput`: the MFU, peak and ZeRO stage they assume)."""
    from jobs.flops import flops_per_token
    from model import build_model, load_preset, stages_for

    throughput = throughput or Throughput()
    config = load_preset(config_path)
    log.info("building %s on the meta device", config_path)
    model = build_model(config, device="meta")

    total = count_parameters(model.parameters())
    front = getattr(model, "embedding", None) or model.projector  # the compositional model: its projector
    embedding_ids = {id(p) for p in front.parameters()}
    embedding = count_parameters(front.parameters())
    llm = count_parameters(p for p in model.language_model.parameters() if id(p) not in embedding_ids)
    trainable = {
        name: count_parameters(param for _, param in spec.trainable_parameters(model))
        for name, spec in stages_for(config.model_type).items()
    }
    # the stage that trains the most parameters (instruct: the whole model) sets the memory a cluster needs
    basis = max(trainable, key=trainable.__getitem__)
    # the largest single module's own parameters: what ZeRO-3 gathers at once (counted here: DeepSpeed's
    # `model_to_params` tells tied weights apart by `data_ptr()`, 0 for every tensor on the meta device)
    largest = max((count_parameters(m.parameters(recurse=False)) for m in model.modules()), default=0)
    gpus = gpus_per_node * nodes
    rate = throughput.peak_tflops * 1e12 * throughput.mfu  # FLOP/s per GPU
    sizing = {}
    for stage in (stage for stage in trainable if stage in PAPER_DATA):
        # FLOPs at the sample's length as context; model states: the stage's trainable parameters under the
        # ZeRO stage + its frozen weights in bf16 (partitioned only under ZeRO-3)
        data, params = PAPER_DATA[stage], trainable[stage]
        tokens = data.samples * data.tokens_per_sample
        per_token = flops_per_token(model, stage, data.tokens_per_sample)
        gpu_hours = tokens * per_token / rate / 3600
        zero = throughput.zero_stage
        frozen_weights = 2 * (total - params)
        states = zero_model_states_bytes(params, largest, gpus_per_node, nodes)[str(zero)]
        states += frozen_weights // gpus if zero == 3 else frozen_weights
        sizing[stage] = StageSizing(
            samples=data.samples,
            tokens=tokens,
            flops_per_token=per_token,
            flops=tokens * per_token,
            gpu_hours=gpu_hours,
            wall_hours=gpu_hours / gpus,
            nodes=nodes,
            model_states_per_gpu=int(states),
        )
    return ModelReport(
        config=str(config_path),
        params_total=total,
        params_embedding=embedding,
        params_llm=llm,
        params_other=total - embedding - llm,
        largest_layer_params=largest,
        trainable=trainable,
        zero_basis_stage=basis,
        zero=zero_model_states_bytes(trainable[basis], largest, gpus_per_node, nodes),
        gpus=gpus,
        gpus_per_node=gpus_per_node,
        nodes=nodes,
        throughput=throughput,
        sizing=sizing,
    )


def _count(n: int) -> str:
    return f"{n:>15,}  ({n / 1e9:.2f} B)" if n >= 1e8 else f"{n:>15,}  ({n / 1e6:.1f} M)"


def format_report(report: ModelReport) -> str:
    """The report as an aligned, human-readable table."""
    lines = [
        f"config: {report.config}",
        "parameters",
        f"  {'total':<18}{_count(report.params_total)}",
        f"  {'embedding module':<18}{_count(report.params_embedding)}",
        f"  {'language model':<18}{_count(report.params_llm)}",
    ]
    if report.params_other:
        lines.append(f"  {'other':<18}{_count(report.params_other)}")
    lines.append(f"  {'largest layer':<18}{_count(report.largest_layer_params)}")
    lines.append("trainable per stage (a distillation teacher is outside the model)")
    lines += [f"  {name:<18}{_count(n)}" for name, n in report.trainable.items()]
    basis_params = report.trainable[report.zero_basis_stage]
    lines.append(
        f"model states per GPU on {report.gpus} GPUs ({report.nodes} node(s) x {report.gpus_per_node}), "
        "bf16 + Adam, no offload,"
    )
    lines.append(f"for the {report.zero_basis_stage} stage's {basis_params / 1e9:.2f} B trainable params")
    lines += [f"  ZeRO-{stage:<13}{n / GIB:>15.1f} GiB" for stage, n in report.zero.items()]
    lines.append("activations, communication buffers and fragmentation come on top")
    if report.sizing:
        lines += format_sizing(report)
    return "\n".join(lines)


def _scaled(n: float) -> str:
    """1.4e11 -> '140.8 B', 5.5e8 -> '550 M'."""
    if n >= 1e9:
        return f"{n / 1e9:,.1f} B"
    return f"{n / 1e6:,.0f} M" if n >= 1e6 else f"{n:,.0f}"


def format_sizing(report: ModelReport) -> list[str]:
    """The per-stage sizing table and the assumptions behind it."""
    t = report.throughput
    lines = [
        f"training at HoVLE's data sizes, one epoch, on {report.gpus} GPUs ({report.nodes} node(s) x "
        f"{report.gpus_per_node}),",
        f"at MFU {t.mfu:.2f} of {t.peak_tflops:,.0f} TFLOP/s bf16 peak per GPU, "
        f"model states under ZeRO-{t.zero_stage}",
        f"  {'stage':<10}{'samples':>9}{'tok/sample':>12}{'tokens':>11}{'GFLOP/tok':>11}"
        f"{'GPU-hours':>11}{'wall-clock':>19}{'nodes':>7}{'states/GPU':>12}",
    ]
    for stage, size in report.sizing.items():
        per_sample = size.tokens / size.samples
        wall = f"{size.wall_hours:,.1f} h ({size.wall_hours / 24:,.1f} d)"
        lines.append(
            f"  {stage:<10}{_scaled(size.samples):>9}{per_sample:>12,.0f}{_scaled(size.tokens):>11}"
            f"{size.flops_per_token / 1e9:>11.2f}{size.gpu_hours:>11,.0f}{wall:>19}{size.nodes:>7}"
            f"{size.model_states_per_gpu / GIB:>8.1f} GiB"
        )
    total_gpu_hours = sum(size.gpu_hours for size in report.sizing.values())
    total_wall = total_gpu_hours / report.gpus
    lines.append(
        f"  {'all':<10}{'':>9}{'':>12}{'':>11}{'':>11}{total_gpu_hours:>11,.0f}"
        f"{f'{total_wall:,.1f} h ({total_wall / 24:,.1f} d)':>19}"
    )
    lines.append("assumptions:")
    lines += [
        f"  {stage}: {PAPER_DATA[stage].samples / 1e6:,.0f} M samples (HOVLE.md, unconfirmed), each "
        f"{PAPER_DATA[stage].sample}"
        for stage in report.sizing
    ]
    lines += [
        "  FLOPs per token: jobs.flops (2N per weight pass, attention over the sample's length);",
        "  the distill teacher's forward is left out (InternViT-300M at 1,025 tokens per tile would",
        "  add ~2.4 GFLOP per image token unless its features are precomputed)",
        "  GPU-hours = tokens x FLOP/token / (MFU x peak) / 3600;",
        "  wall-clock = GPU-hours / GPUs (no scaling loss)",
        "  states/GPU: the stage's trainable weights, gradients and Adam states (DeepSpeed's estimate) + its",
        "  frozen weights in bf16 (split over the GPUs only under ZeRO-3); activations come on top",
    ]
    return lines


def cluster_shape(gpus: int, gpus_per_node: int, nodes: int | None) -> tuple[int, int]:
    """(GPUs per node, nodes) for `gpus` GPUs in all: over `nodes` when given (an even split), else as few
    nodes of `gpus_per_node` as hold them (one node when `gpus` <= `gpus_per_node`).

    Raises:
        ValueError: the GPUs do not split evenly (the message says which option to change).
    """
    if gpus < 1 or gpus_per_node < 1 or (nodes is not None and nodes < 1):
        raise ValueError(
            f"--gpus, --gpus-per-node and --nodes must be at least 1 (got {gpus}, {gpus_per_node}, {nodes})"
        )
    if nodes is not None:
        if gpus % nodes:
            raise ValueError(f"--gpus {gpus} does not split evenly over --nodes {nodes}")
        return gpus // nodes, nodes
    if gpus <= gpus_per_node:
        return gpus, 1
    if gpus % gpus_per_node:
        raise ValueError(f"--gpus {gpus} is not a whole number of nodes of --gpus-per-node {gpus_per_node}")
    return gpus_per_node, gpus // gpus_per_node


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hovle inspect",
        description="Parameter counts per part and stage, ZeRO model-state memory per GPU, and GPU-hours and "
        "nodes per stage at HoVLE's data sizes, for a config.",
    )
    parser.add_argument("config", help="a preset name (e.g. hovle-2.6b) or a YAML run config")
    parser.add_argument("--json", action="store_true", help="print one JSON object (the last line of stdout)")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs in all (default: 8)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default: 8)")
    parser.add_argument(
        "--nodes",
        type=int,
        help="nodes to split --gpus over (default: as few nodes of --gpus-per-node as hold them)",
    )
    parser.add_argument(
        "--mfu",
        type=float,
        default=Throughput.mfu,
        help=f"model FLOPs utilisation the GPU-hours assume (default: {Throughput.mfu})",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=Throughput.peak_tflops,
        help="peak bf16 TFLOP/s of one GPU (default: 989, H100/H200 SXM dense)",
    )
    parser.add_argument(
        "--zero",
        type=int,
        choices=(1, 2, 3),
        default=Throughput.zero_stage,
        help="the ZeRO stage of the per-stage model states per GPU (default: 2)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    try:
        gpus_per_node, nodes = cluster_shape(args.gpus, args.gpus_per_node, args.nodes)
    except ValueError as err:
        parser.error(str(err))
    if not 0 < args.mfu <= 1 or args.peak_tflops <= 0:
        parser.error(
            f"--mfu must be in (0, 1] and --peak-tflops positive, got {args.mfu} and {args.peak_tflops}"
        )
    setup_logging(args.verbose)
    throughput = Throughput(mfu=args.mfu, peak_tflops=args.peak_tflops, zero_stage=args.zero)

    def body() -> int:
        report = inspect_config(args.config, gpus_per_node=gpus_per_node, nodes=nodes, throughput=throughput)
        print(json.dumps(asdict(report)) if args.json else format_report(report))
        return 0

    return run_command("hovle inspect", body)


if __name__ == "__main__":
    sys.exit(main())
