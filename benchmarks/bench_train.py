"""One stage through Ray Train + DeepSpeed (1 worker) vs the same work in a bare PyTorch loop.

Both train the same model (the config's preset), on the same prepared dataset, with the same batches
(`ShardSource` + `TrainingStream`: the same packs in the same order), the same AdamW + warmup/cosine and
gradient clipping, the same number of torch threads. The bare loop runs in this process with no Ray, no
DeepSpeed and no MLflow. Throughput is taken over the steps after `--warmup` (start-up, the first
allocations and DeepSpeed's set-up are not steady state); the end-to-end wall time of the Ray run,
start-up included, is printed beside it.

    python benchmarks/bench_train.py [--config smollm2-135m] [--stage align] [--steps 12] [--warmup 3]

Prints the table and writes results/bench_train.json: samples/s and tokens/s of each, the overhead
(target <= 10%), the data-wait fraction of the Ray run (target < 5%), FLOPs per token and the FLOP/s
reached (MFU needs a GPU's peak; on CPU it is not defined).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.results import default_output, save  # noqa: E402
from jobs.flops import flops_per_token  # noqa: E402
from jobs.strategy import warmup_cosine  # noqa: E402
from jobs.train import train  # noqa: E402
from jobs.train_config import load_train_config  # noqa: E402
from jobs.train_loop import StageModule, _endless, _stage_spec, _to_device  # noqa: E402
from model import apply_stage, build_model, build_processor, load_preset  # noqa: E402
from pipelines.ingest import ShardSource  # noqa: E402
from pipelines.prepare import prepare  # noqa: E402
from pipelines.settings import PrepareSettings  # noqa: E402
from pipelines.stream import TrainingStream  # noqa: E402
from pipelines.synthetic import generate  # noqa: E402


def bare_loop(args, config, data: str) -> dict[str, float]:
    """The stage in this process: plain torch, same model, batches, optimizer and schedule."""
    settings = config.stages[args.stage]
    torch.manual_seed(config.seed)
    hovle = load_preset(args.config)
    model, processor = build_model(hovle).train(), build_processor(hovle)
    spec = _stage_spec(args.stage, settings)
    parameters = apply_stage(model, spec)
    module = StageModule(model, spec)
    optimizer = torch.optim.AdamW(
        parameters, lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(settings))
    stream = TrainingStream(
        ShardSource(data, "train", 0, 1, config.seed, tile_size=hovle.tile_size, reader="local"),
        batch_size=settings.micro_batch_size,
        pad_token_id=processor.tokenizer.pad_token_id,
        max_tokens=settings.max_tokens,
    )
    batches = _endless(stream)
    samples = tokens = 0
    wait = 0.0
    for step in range(settings.steps):
        if step == args.warmup:
            start, samples, tokens, wait = time.perf_counter(), 0, 0, 0.0
        fetched = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - fetched
        loss, _ = module(_to_device(batch, torch.device("cpu"), torch.float32))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, config.deepspeed.gradient_clipping)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        samples += int(batch["num_samples"])
        tokens += int(batch["num_tokens"])
    seconds = time.perf_counter() - start
    context = tokens / max(samples, 1)
    return {
        "samples_per_s": samples / seconds,
        "tokens_per_s": tokens / seconds,
        "data_wait_fraction": wait / seconds,
        "flops_per_token": flops_per_token(model, args.stage, context),
    }


def ray_run(args, config_overrides: dict, data: str, workdir: Path) -> dict[str, float]:
    """The stage through `jobs.train` (Ray Train, 1 DeepSpeed worker); steady-state figures from MLflow."""
    from mlflow.tracking import MlflowClient

    config = load_train_config(args.config, config_overrides)
    start = time.perf_counter()
    report = train(args.config, config, args.stage, data=data)
    wall = time.perf_counter() - start
    client = MlflowClient(config.tracking_uri)
    [child] = client.search_runs(
        [client.get_experiment_by_name(config.tracking.experiment).experiment_id],
        f"tags.`mlflow.parentRunId` = '{report['mlflow_run_id']}'",
    )

    def steady(metric: str) -> float:
        """Mean over the logged intervals after warm-up (equal-length intervals of `--warmup` steps)."""
        values = [
            m.value for m in client.get_metric_history(child.info.run_id, metric) if m.step > args.warmup
        ]
        return sum(values) / len(values)

    return {
        "samples_per_s": steady("samples_per_s"),
        "tokens_per_s": steady("tokens_per_s"),
        "data_wait_fraction": steady("data_wait_fraction"),
        "wall_s_with_startup": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="smollm2-135m")
    parser.add_argument("--stage", default="align", choices=("distill", "align", "instruct"))
    parser.add_argument("--samples", type=int, default=160, help="synthetic samples to prepare")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the throughput")
    parser.add_argument("--micro-batch", type=int, default=2, help="packs per step")
    parser.add_argument("--max-tokens", type=int, default=512, help="tokens per pack")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, both sides")
    parser.add_argument("--output", type=Path, default=default_output("bench_train"))
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")
    torch.set_num_threads(args.threads)

    import ray

    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as scratch:
        work = Path(scratch)
        os.chdir(work)  # runs/ and mlflow.db of the Ray run land here
        jsonl = generate(args.stage, args.samples, seed=0, output_dir=work / "corpus", image_size=224)
        inputs = [str(jsonl)] + ([str(jsonl.parent / "text.jsonl")] if args.stage == "distill" else [])
        data = str(work / "prepared")
        prepare(
            args.config, args.stage, inputs, data, PrepareSettings(max_tokens=args.max_tokens, val_fraction=0)
        )
        overrides = {
            f"stages.{args.stage}.steps": args.steps,
            f"stages.{args.stage}.micro_batch_size": args.micro_batch,
            f"stages.{args.stage}.max_tokens": args.max_tokens,
            "scaling.num_workers": 1,
            "scaling.cpus_per_worker": 1,
            "scaling.threads_per_worker": args.threads,
            "deepspeed.zero_stage": 2,
            "log_every_n_steps": args.warmup,
            "checkpoint.every_n_steps": 10**6,
            "data.reader": "local",
            "run_name": "bench",
        }
        config = load_train_config(args.config, overrides)
        bare = bare_loop(args, config, data)
        print(f"bare loop:  {bare['samples_per_s']:.2f} samples/s  {bare['tokens_per_s']:.0f} tokens/s")
        ray_side = ray_run(args, overrides, data, work)
        ray.shutdown()

    overhead = 1 - ray_side["tokens_per_s"] / bare["tokens_per_s"]
    flop_rate = bare["flops_per_token"] * ray_side["tokens_per_s"]
    print(f"{'':<22}{'samples/s':>10}{'tokens/s':>10}{'data wait':>10}")
    print(
        f"{'bare PyTorch loop':<22}{bare['samples_per_s']:>10.2f}{bare['tokens_per_s']:>10.0f}"
        f"{100 * bare['data_wait_fraction']:>9.1f}%"
    )
    print(
        f"{'Ray Train + DeepSpeed':<22}{ray_side['samples_per_s']:>10.2f}{ray_side['tokens_per_s']:>10.0f}"
        f"{100 * ray_side['data_wait_fraction']:>9.1f}%"
    )
    print(f"overhead {100 * overhead:.1f}% (target <= 10%): {'met' if overhead <= 0.10 else 'MISSED'}")
    print(
        f"data wait {100 * ray_side['data_wait_fraction']:.1f}% (target < 5%): "
        f"{'met' if ray_side['data_wait_fraction'] < 0.05 else 'MISSED'}"
    )
    print(
        f"{bare['flops_per_token'] / 1e6:.0f} MFLOP/token -> {flop_rate / 1e9:.1f} GFLOP/s "
        f"(MFU is logged on GPUs, against the device's peak)"
    )
    print(f"Ray run wall time, start-up included: {ray_side['wall_s_with_startup']:.0f} s")
    save(
        args.output,
        {
            "config": args.config,
            "stage": args.stage,
            "steps": args.steps,
            "warmup": args.warmup,
            "micro_batch": args.micro_batch,
            "max_tokens": args.max_tokens,
            "threads": args.threads,
            "bare": bare,
            "ray": ray_side,
            "overhead": overhead,
            "flop_rate": flop_rate,
        },
    )


if __name__ == "__main__":
    main()
