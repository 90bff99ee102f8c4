"""One stage through Ray Train + DeepSpeed (1 worker) vs the same work in a bare PyTorch loop, alternating.

Both train the same model (the config's preset), on the same prepared dataset, with the same batches
(`ShardSource` + `TrainingStream`: the same packs in the same order), the same trainable parameters and
optimizer groups, AdamW + warmup/cosine and gradient clipping, in the same dtype (fp32) with the same
torch threads and micro-batch (no gradient accumulation on either side). The bare loop runs in this
process with no Ray, no DeepSpeed and no MLflow.

The two sides alternate: bare, Ray, bare, Ray, ... (`--rounds` each), and the overhead is taken within
each round, 1 - Ray tokens/s / bare tokens/s, so a slow spell on a shared machine that hits one round
moves both sides of it. Throughput is the steady state of each run: the steps after `--warmup` (start-up,
first allocations and DeepSpeed's set-up are left out), timed the same way on both sides (per step, from
asking for the batch to the optimizer step; the Ray side's figures are what its workers log to MLflow).
The data-wait fraction is the share of those step times spent waiting for the next batch.

    python benchmarks/bench_train.py [--config smollm2-135m] [--stage align] [--steps 12] [--rounds 3]
        [--quick]

Prints the tables and writes results/bench_train.json. Targets: overhead <= 10%, data wait < 5%.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from itertools import count
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.results import (  # noqa: E402
    Report,
    Spread,
    Table,
    Target,
    alternate,
    command_line,
    default_output,
    parse_args,
    save,
)
from jobs.flops import flops_per_token  # noqa: E402
from jobs.run_config import load_run_config  # noqa: E402
from jobs.strategy import warmup_cosine  # noqa: E402
from jobs.train import train  # noqa: E402
from jobs.train_config import TrainConfig  # noqa: E402
from jobs.train_loop import (  # noqa: E402
    StageModule,
    _endless,
    _parameter_groups,
    _stage_spec,
    _to_device,
    advance_drop_path,
)
from model import apply_stage, build_model, build_processor, load_preset  # noqa: E402
from pipelines.corpora.synthetic import generate  # noqa: E402
from pipelines.ingest import ShardSource  # noqa: E402
from pipelines.prepare import prepare  # noqa: E402
from pipelines.settings import PrepareSettings  # noqa: E402
from pipelines.stream import TrainingStream  # noqa: E402

OVERHEAD_TARGET = 0.10
DATA_WAIT_TARGET = 0.05
QUICK = {"rounds": 2, "steps": 4, "warmup": 2, "samples": 48, "micro_batch": 1}


def bare_loop(args: argparse.Namespace, config: TrainConfig, data: str) -> dict[str, float]:
    """The stage in this process: plain torch, same model, batches, parameter groups, optimizer, schedule."""
    settings = config.stages[args.stage]
    torch.manual_seed(config.seed)
    hovle = load_preset(args.config)
    model, processor = build_model(hovle).train(), build_processor(hovle)
    spec = _stage_spec(args.stage, settings, config.recipe, model.config.model_type)
    apply_stage(model, spec)
    groups = [
        {"params": list(g["params"]), "lr": settings.lr * g["lr_ratio"]}
        for g in _parameter_groups(model, spec, settings)
        if g["params"]
    ]
    parameters = [p for g in groups for p in g["params"]]
    module = StageModule(model, spec)
    optimizer = torch.optim.AdamW(
        groups, lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(settings))
    stream = TrainingStream(
        ShardSource(data, "train", 0, 1, config.seed, tile_size=hovle.tile_size, reader=config.data.reader),
        batch_size=settings.micro_batch_size,
        pad_token_id=processor.tokenizer.pad_token_id,
        max_tokens=settings.max_tokens,
    )
    batches = _endless(stream)
    samples = tokens = 0
    wait = busy = 0.0
    for step in range(settings.steps):
        advance_drop_path(model, step, settings.steps)
        if step == args.warmup:
            samples, tokens, wait, busy = 0, 0, 0.0, 0.0
        start = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - start
        loss, _ = module(_to_device(batch, torch.device("cpu"), torch.float32))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, config.deepspeed.gradient_clipping)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        busy += time.perf_counter() - start
        samples += int(batch["num_samples"])
        tokens += int(batch["num_tokens"])
    return {
        "samples_per_s": samples / busy,
        "tokens_per_s": tokens / busy,
        "data_wait_fraction": wait / busy,
        "flops_per_token": flops_per_token(model, args.stage, tokens / max(samples, 1)),
    }


def ray_run(args: argparse.Namespace, overrides: dict, data: str) -> dict[str, float]:
    """The stage through `jobs.train` (Ray Train, 1 DeepSpeed worker); steady-state figures from MLflow."""
    from mlflow.tracking import MlflowClient

    run = load_run_config(args.config, {f"train.{key}": value for key, value in overrides.items()})
    config = run.train
    start = time.perf_counter()
    report = train(run, args.stage, data=data, source=args.config)
    wall = time.perf_counter() - start
    client = MlflowClient(config.tracking_uri)
    [child] = client.search_runs(
        [client.get_experiment_by_name(config.tracking.experiment).experiment_id],
        f"tags.`mlflow.parentRunId` = '{report['mlflow_run_id']}'",
    )

    def history(metric: str) -> list[float]:
        """The logged intervals after warm-up (log_every_n_steps = warmup: equal-length intervals)."""
        points = sorted(client.get_metric_history(child.info.run_id, metric), key=lambda m: m.step)
        return [m.value for m in points if m.step > args.warmup]

    # interval rates -> totals over the steady steps: an interval lasts step_time_s x its steps, and every
    # interval has the same number of steps, so step_time_s weighs it
    step_time, samples_s, tokens_s = history("step_time_s"), history("samples_per_s"), history("tokens_per_s")
    waits = history("data_wait_fraction")
    seconds = sum(step_time)
    return {
        "samples_per_s": sum(r * t for r, t in zip(samples_s, step_time)) / seconds,
        "tokens_per_s": sum(r * t for r, t in zip(tokens_s, step_time)) / seconds,
        "data_wait_fraction": sum(w * t for w, t in zip(waits, step_time)) / seconds,
        "wall_s_with_startup": wall,
    }


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="smollm2-135m")
    parser.add_argument("--stage", default="align", choices=("distill", "align", "instruct"))
    parser.add_argument("--samples", type=int, default=160, help="synthetic samples to prepare")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the throughput")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each side, alternating")
    parser.add_argument("--micro-batch", type=int, default=2, help="packs per step")
    parser.add_argument("--max-tokens", type=int, default=512, help="tokens per pack")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, both sides")
    parser.add_argument("--output", type=Path, default=default_output("bench_train"))
    args = parse_args(parser, QUICK, argv)
    if args.steps <= args.warmup or (args.steps - args.warmup) % args.warmup:
        parser.error("--steps must exceed --warmup by a multiple of it (equal logging intervals)")
    output = args.output.resolve()
    torch.set_num_threads(args.threads)

    import ray

    ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    runs = count()
    with tempfile.TemporaryDirectory(prefix="bench-train-") as scratch:
        work = Path(scratch)
        os.chdir(work)  # runs/ and mlflow.db of the Ray runs land here
        jsonl = generate(args.stage, args.samples, seed=0, output_dir=work / "corpus", image_size=224)
        inputs = [str(jsonl)] + ([str(jsonl.parent / "text.jsonl")] if args.stage == "distill" else [])
        data = str(work / "prepared")
        settings = PrepareSettings(max_tokens=args.max_tokens, val_fraction=0)
        prepare(build_processor(load_preset(args.config)), args.stage, inputs, data, settings)
        overrides = {
            f"stages.{args.stage}.steps": args.steps,
            f"stages.{args.stage}.micro_batch_size": args.micro_batch,
            f"stages.{args.stage}.max_tokens": args.max_tokens,
            "scaling.num_workers": 1,
            "scaling.cpus_per_worker": 1,
            "scaling.threads_per_worker": args.threads,
            "deepspeed.zero_stage": 2,
            "deepspeed.precision": "fp32",
            "deepspeed.gradient_accumulation_steps": 1,
            "log_every_n_steps": args.warmup,
            "checkpoint.every_n_steps": 10**6,
            "data.reader": "local",
            "run_name": "bench",
        }
        config = load_run_config(args.config, {f"train.{k}": v for k, v in overrides.items()}).train

        def show(index: int, side: str, out: dict) -> None:
            print(
                f"round {index + 1} {side:<5} {out['samples_per_s']:.2f} samples/s  "
                f"{out['tokens_per_s']:.0f} "
                f"tokens/s  data wait {100 * out['data_wait_fraction']:.1f}%",
                flush=True,
            )

        runs_by_side = alternate(
            {
                "bare": lambda: bare_loop(args, config, data),
                # a fresh run name per round: the same name would resume the finished stage
                "ray": lambda: ray_run(args, {**overrides, "run_name": f"bench-{next(runs)}"}, data),
            },
            args.rounds,
            on_result=show,
        )
        ray.shutdown()

    bare, ray_side = runs_by_side["bare"], runs_by_side["ray"]
    overheads = [1 - r["tokens_per_s"] / b["tokens_per_s"] for b, r in zip(bare, ray_side)]
    flops = bare[0]["flops_per_token"]
    table = Table(
        f"Steady-state throughput over steps {args.warmup + 1}-{args.steps} "
        f"(median, min–max over {args.rounds} alternating rounds)",
        ["side", "samples/s", "tokens/s", "data wait", "overhead vs bare (per round)"],
    )
    for name, runs_ in (("bare PyTorch loop", bare), ("Ray Train + DeepSpeed", ray_side)):
        table.add(
            name,
            Spread.of([r["samples_per_s"] for r in runs_]).text(2),
            Spread.of([r["tokens_per_s"] for r in runs_]).text(0),
            Spread.of([r["data_wait_fraction"] for r in runs_]).text(1, scale=100, unit="%"),
            "baseline" if runs_ is bare else Spread.of(overheads).text(1, scale=100, unit="%"),
        )
    rounds_table = Table(
        "Per round (bare then Ray)",
        [
            "round",
            "bare tokens/s",
            "Ray tokens/s",
            "overhead",
            "Ray data wait",
            "Ray wall s (start-up incl.)",
        ],
    )
    for i, (b, r) in enumerate(zip(bare, ray_side)):
        rounds_table.add(
            i + 1,
            f"{b['tokens_per_s']:.0f}",
            f"{r['tokens_per_s']:.0f}",
            f"{100 * overheads[i]:.1f}%",
            f"{100 * r['data_wait_fraction']:.1f}%",
            f"{r['wall_s_with_startup']:.0f}",
        )
    targets = [
        Target(
            "Ray Train + DeepSpeed overhead vs a bare loop", "<=", OVERHEAD_TARGET, overheads, "%", 100, 1
        ),
        Target(
            "data-wait fraction of the Ray run",
            "<",
            DATA_WAIT_TARGET,
            [r["data_wait_fraction"] for r in ray_side],
            "%",
            100,
            1,
        ),
    ]
    for t in (table, rounds_table):
        print(f"\n{t.title}\n" + " | ".join(t.columns))
        for row in t.rows:
            print(" | ".join(row))
    for target in targets:
        print(
            f"{target.name}: {target.to_dict()['measured_text']} (target {target.threshold_text()}): "
            f"{'met' if target.met else 'NOT met'}"
        )
    flop_rate = flops * Spread.of([r["tokens_per_s"] for r in ray_side]).median
    print(f"{flops / 1e6:.0f} MFLOP/token -> {flop_rate / 1e9:.1f} GFLOP/s (MFU needs a GPU's peak)")

    report = Report(
        title="train: Ray Train + DeepSpeed vs a bare PyTorch loop",
        description=(
            f"The {args.stage} stage of {args.config}: {args.steps} steps of {args.micro_batch} packs x "
            f"{args.max_tokens} tokens, fp32, {args.threads} torch threads on both sides, 1 Ray Train worker "
            f"(DeepSpeed ZeRO-2 over gloo). Sides alternate (bare, Ray) x {args.rounds}; the overhead is "
            f"taken per round. {flops / 1e6:.0f} MFLOP/token, {flop_rate / 1e9:.1f} GFLOP/s on the Ray side."
        ),
        command=command_line("bench_train.py", argv),
        quick=args.quick,
        duration_s=time.perf_counter() - started,
        tables=[table, rounds_table],
        targets=targets,
    )
    save(
        output,
        {
            "config": args.config,
            "stage": args.stage,
            "steps": args.steps,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "micro_batch": args.micro_batch,
            "max_tokens": args.max_tokens,
            "threads": args.threads,
            "dtype": "float32",
            "bare": bare,
            "ray": ray_side,
            "overheads": overheads,
            "overhead": Spread.of(overheads).to_dict(),
            "flop_rate": flop_rate,
        },
        report,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
