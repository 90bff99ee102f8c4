"""`python -m jobs.inspect CONFIG [--json] [--gpus N] [--nodes N]`: size a HoVLE config before a run.

Builds the model on the meta device (no weights, no memory), counts parameters per part
(holistic embedding module, LLM) and per training stage, and estimates the GPU memory
the model states need under ZeRO-1/2/3 on the given cluster. Prints a table, or with
`--json` one JSON object as the last line of stdout (libraries may print before it).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from jobs.cli import run_command
from jobs.logging_setup import setup_logging

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

GIB = 1024**3


@dataclass(frozen=True)
class ModelReport:
    """Parameter counts of one config and the ZeRO model-state memory it needs per GPU."""

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


def count_parameters(params: Iterable[nn.Parameter]) -> int:
    """Number of elements in `params`, each tensor counted once even if it appears twice (tied weights)."""
    return sum({id(p): p.numel() for p in params}.values())


def largest_layer_params(model: nn.Module) -> int:
    """Parameters held directly by the largest single module (what ZeRO-3 gathers at once).

    DeepSpeed's own `model_to_params` tells tied weights apart by `data_ptr()`, which is 0 for
    every tensor on the meta device, so the count is done here.
    """
    return max((count_parameters(m.parameters(recurse=False)) for m in model.modules()), default=0)


def zero_model_states_bytes(
    params: int, largest_layer: int, gpus_per_node: int, nodes: int
) -> dict[str, int]:
    """GPU bytes per device for the model states (weights, gradients, Adam) of `params` trainable
    parameters in mixed precision without CPU offload, per ZeRO stage.

    Activations, communication buckets and the allocator's fragmentation come on top.
    """
    # DeepSpeed is slow to import (~3 s); only this function needs it.
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


def inspect_config(config_path: str | Path, gpus_per_node: int = 8, nodes: int = 1) -> ModelReport:
    """Build the config's model on the meta device and report its size and ZeRO memory needs."""
    # The model package pulls in torch and transformers (seconds); importing it here keeps
    # `--help` and argument errors instant.
    from model import build_model, load_preset, stages_for

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
    # The stage that trains the most parameters sets the memory a cluster must have
    # (instruct trains the whole model).
    basis = max(trainable, key=trainable.__getitem__)
    largest = largest_layer_params(model)
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
        gpus=gpus_per_node * nodes,
        gpus_per_node=gpus_per_node,
        nodes=nodes,
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
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hovle inspect",
        description="Parameter counts per part and stage, and ZeRO model-state memory per GPU, for a config.",
    )
    parser.add_argument("config", help="a preset name (e.g. hovle-2.6b) or a YAML run config")
    parser.add_argument("--json", action="store_true", help="print one JSON object (the last line of stdout)")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs per node (default: 8)")
    parser.add_argument("--nodes", type=int, default=1, help="number of nodes (default: 1)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    if args.gpus < 1 or args.nodes < 1:
        parser.error(f"--gpus and --nodes must be at least 1, got --gpus {args.gpus} --nodes {args.nodes}")
    setup_logging(args.verbose)

    def body() -> int:
        report = inspect_config(args.config, gpus_per_node=args.gpus, nodes=args.nodes)
        print(json.dumps(asdict(report)) if args.json else format_report(report))
        return 0

    return run_command("hovle inspect", body)


if __name__ == "__main__":
    sys.exit(main())
