"""`StageMeter`: what rank 0 logs for a stage every N steps (jobs.train_loop), all-reduced over the ranks.

    meter = StageMeter(model, stage, settings, strategy, clock)
    meter.start_step(); batch = meter.timed_next(batches); ...; meter.add(batch, parts); meter.end_step()
    metrics = meter.report(step)      # every rank (collectives); loss parts, lr, grad norm, throughput,
                                      # data wait, MFU on GPUs, drop path, CPU-seconds and tokens so far
    meter.progress_line(stage, step, metrics)

Rates are over the steps since the last report; CPU-seconds and tokens are the stage's totals (jobs.budget).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from jobs.budget import StageClock
from jobs.flops import flops_per_token, peak_flops
from jobs.strategy import DeepSpeedStrategy
from jobs.train_config import StageSettings


class StageMeter:
    """Per-step timings and counts; `report` all-reduces them over the ranks since the last report."""

    def __init__(
        self,
        model: nn.Module,
        stage: str,
        settings: StageSettings,
        strategy: DeepSpeedStrategy,
        clock: StageClock,
    ) -> None:
        self.stage, self.settings, self.strategy, self.clock = stage, settings, strategy, clock
        self.model = model
        self.started = time.perf_counter()
        self.start_fraction = clock.fraction()  # of a budget, where this attempt (maybe resumed) began
        self._reset()
        cuda = strategy.device.type == "cuda"
        self.peak = peak_flops(torch.cuda.get_device_name(strategy.device)) if cuda else None

    def _reset(self) -> None:
        self.micro = self.samples = self.tokens = self.wait = self.busy = 0.0
        self.steps = 0
        self.parts: dict[str, float] = {}

    def start_step(self) -> None:
        self._step_start = time.perf_counter()

    def timed_next(self, batches):
        start = time.perf_counter()
        batch = next(batches)
        self.wait += time.perf_counter() - start
        return batch

    def add(self, batch: dict[str, Any], parts: dict[str, float]) -> None:
        self.micro += 1
        for key, value in parts.items():
            self.parts[key] = self.parts.get(key, 0.0) + value
        self.samples += int(batch["num_samples"])
        self.tokens += int(batch["num_tokens"])
        self.clock.count(int(batch["num_tokens"]))

    def end_step(self) -> None:
        self.busy += time.perf_counter() - self._step_start
        self.steps += 1

    def report(self, step: int) -> dict[str, float]:
        keys = sorted(self.parts)
        values = [self.micro, self.samples, self.tokens, self.wait, self.busy] + [self.parts[k] for k in keys]
        totals = torch.tensor(values, dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(totals)
        self.clock.sync()  # collectives too: every rank reports at the same steps
        world = dist.get_world_size() if dist.is_initialized() else 1
        micro, samples, tokens, wait, busy = totals[:5].tolist()
        seconds = busy / world  # wall time of the steps, averaged over ranks
        metrics = {k: v / micro for k, v in zip(keys, totals[5:].tolist())}
        metrics.update(
            {
                "lr": self.strategy.lr(),
                "grad_norm": self.strategy.grad_norm(),
                "samples_per_s": samples / seconds,
                "tokens_per_s": tokens / seconds,
                "data_wait_fraction": wait / busy if busy else 0.0,
                "step_time_s": seconds / self.steps,
                "cpu_seconds": self.clock.spent,  # the stage's so far (the slowest rank's), resumes included
                "tokens_seen": float(self.clock.tokens),
                "progress": self.clock.progress(step),
            }
        )
        if self.peak:
            context = tokens / max(samples, 1)
            per_token = flops_per_token(self.model, self.stage, context)
            metrics["mfu"] = per_token * metrics["tokens_per_s"] / (self.peak * world)
        embedding = getattr(self.model, "embedding", None)
        if embedding is not None and embedding.defocus:
            metrics["drop_path_rate"] = max(embedding.drop_path_rates)
        self.seconds_per_step = metrics["step_time_s"]
        done = metrics["progress"] - self.start_fraction
        self.wall_per_progress = (time.perf_counter() - self.started) / max(done, 1e-9)
        self._reset()
        return metrics

    def progress_line(self, stage: str, step: int, metrics: dict[str, float]) -> str:
        if self.clock.budget is None:
            eta = (self.settings.steps - step) * self.seconds_per_step
            where = f"step {step}/{self.settings.steps}"
        else:  # the rest of the budget at this attempt's pace so far
            eta = (1.0 - metrics["progress"]) * self.wall_per_progress
            where = f"step {step} cpu {self.clock.spent:.0f}/{self.clock.budget:.0f} s"
        return (
            f"{stage} {where} loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} "
            f"{metrics['samples_per_s']:.1f} samples/s {metrics['tokens_per_s']:.0f} tok/s "
            f"data {100 * metrics['data_wait_fraction']:.0f}% ETA {_duration(eta)}"
        )


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"
