"""`DeepSpeedStrategy`: everything about DeepSpeed in one object (config, engine, step, save/load, export).

    strategy = DeepSpeedStrategy(config, stage_settings, world_size)
    strategy.setup(module, parameter_groups, progress)  # AdamW + warmup/cosine, deepspeed.initialize
    loss, parts = strategy.forward(batch); strategy.backward(loss); strategy.step()
    strategy.save(dir, client_state) / strategy.load(dir) -> client_state   # load: weights_only=True
    strategy.full_state_dict()                          # consolidated weights on rank 0 (ZeRO-3 too)

The training loop (jobs.train_loop) never calls `engine.*` itself. The optimizer is torch's AdamW passed
as a client optimizer (DeepSpeed's own Adam would compile a C++/CUDA op at start-up); only the stage's
trainable parameters go into it, so frozen parameters have no optimizer state and are never updated.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from jobs import environ_set
from jobs.train_config import StageSettings, TrainConfig

logger = logging.getLogger(__name__)

CHECKPOINT_TAG = "state"  # one DeepSpeed tag per checkpoint directory (Ray keeps one directory per step)
# The DeepSpeed classes its checkpoint files hold besides tensors and builtins (found by loading ZeRO-0..3
# checkpoints with weights_only=True): the only globals its unpickler may build.
DEEPSPEED_CHECKPOINT_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def weights_only_checkpoint_engine(ds_config=None):
    """DeepSpeed's torch checkpoint engine, loading with `torch.load(weights_only=True)` and only
    `DEEPSPEED_CHECKPOINT_GLOBALS` allowed (DeepSpeed's own loads with weights_only=False: any pickled
    object in a checkpoint folder would run). `ds_config` (the engine's DeepSpeedConfig) keeps its saving
    as configured: without it DeepSpeed writes the legacy non-zip format, which its own offline tools
    (zero_to_fp32, which memory-maps) cannot read."""
    import importlib

    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    allowed = []
    for name in DEEPSPEED_CHECKPOINT_GLOBALS:
        module, _, attribute = name.rpartition(".")
        allowed.append(getattr(importlib.import_module(module), attribute))

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)

    return WeightsOnlyCheckpointEngine(ds_config)


COMM_OP = "ShareMemCommBuilder"  # DeepSpeed's CPU shared-memory all-reduce, compiled at a CPU run's start-up


def comm_op_folder(name: str = "deepspeed_shm_comm") -> Path:
    """Where the comm op builds: a folder per install of DeepSpeed and torch under TORCH_EXTENSIONS_DIR (or
    torch's default). torch's build file names the sources by the installs' paths, so two virtualenvs (two
    clones) sharing one folder would rebuild it, a minute each time, at every switch between them."""
    import deepspeed
    from torch.utils.cpp_extension import _get_build_directory  # the folder torch itself would build in

    installs = f"{Path(deepspeed.__file__).parent}\n{Path(torch.__file__).parent}"
    key = hashlib.sha256(installs.encode()).hexdigest()[:12]
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or str(
        Path(_get_build_directory(name, verbose=False)).parent
    )
    return Path(root) / f"{name}-{key}" / name


def load_comm_op() -> None:
    """Build or load DeepSpeed's CPU comm op in `comm_op_folder()`, holding a lock that the kernel releases
    when its holder dies.

    torch's JIT build marks a build in progress with a `lock` file that only the builder removes: a build
    killed midway (SIGKILL, out of memory, a node lost) leaves it, and every later DeepSpeed start on the
    machine waits on it forever. While this process holds the flock, no other process of the platform is
    building, so a `lock` found there is such a leftover and is removed. DeepSpeed's own start then finds
    the op loaded. A no-op where the accelerator has no such op (CUDA) or it is not compatible."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder(COMM_OP)
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return
    folder = comm_op_folder(builder.name)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{folder.name}.flock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        leftover = folder / "lock"
        if leftover.exists():
            logger.warning("%s was left by a build that did not finish: removed, building again", leftover)
            leftover.unlink(missing_ok=True)
        with environ_set("TORCH_EXTENSIONS_DIR", str(folder.parent)):  # read by torch when it builds
            builder.load(verbose=False)  # kept loaded in this process: DeepSpeed's start does not build again


def cpu_bf16_is_native() -> bool:
    """Whether this CPU multiplies bf16 through oneDNN (AVX-512 or AMX). Without it torch's bf16 matmul
    falls back to a single-threaded reference kernel: on a 2-core AVX2 EPYC, 1.1 GFLOP/s against 61 in
    fp32, and a demo step ~40x slower than in fp32. Decided on the process that trains (a worker)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return False


def deepspeed_config(config: TrainConfig, stage: StageSettings, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config for one stage, from the validated run config."""
    ds = config.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": config.scaling.use_gpu}
    if ds.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": stage.micro_batch_size,
        "gradient_accumulation_steps": ds.gradient_accumulation_steps,
        "train_batch_size": stage.micro_batch_size * ds.gradient_accumulation_steps * world_size,
        "gradient_clipping": ds.gradient_clipping,
        "zero_optimization": zero,
        "bf16": {"enabled": config.precision == "bf16"},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,  # torch AdamW as the client optimizer
        "zero_force_ds_cpu_optimizer": False,  # ... also when offloading: no compiled CPU Adam
        "steps_per_print": 2**31 - 1,  # progress lines are ours
        "wall_clock_breakdown": False,
    }


def warmup_cosine(stage: StageSettings, progress: Callable[[], float] | None = None):
    """LR multiplier per optimizer step: linear warmup to 1 over `warmup_steps`, then cosine down to
    `min_lr_ratio` over (step - warmup) / (steps - warmup), or with a CPU budget over `progress()`, the
    share spent (StageClock.fraction, the same on every rank; counted from the stage's start, warmup
    included, so the cosine resumes after warmup where the CPU-seconds spent put it)."""
    if stage.cpu_seconds is not None and progress is None:
        raise ValueError("a CPU-seconds budget needs the progress it spent (jobs.budget.StageClock)")

    def multiplier(step: int) -> float:
        if step < stage.warmup_steps:
            return (step + 1) / (stage.warmup_steps + 1)
        if stage.cpu_seconds is not None:
            done = min(1.0, max(0.0, progress()))
        else:
            span = max(1, stage.steps - stage.warmup_steps)
            done = min(1.0, (step - stage.warmup_steps) / span)
        return stage.min_lr_ratio + (1 - stage.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * done))

    return multiplier


class DeepSpeedStrategy:
    """One DeepSpeed engine for one stage on one worker (see the module docstring)."""

    def __init__(self, config: TrainConfig, stage: StageSettings, world_size: int) -> None:
        self.config, self.stage, self.world_size = config, stage, world_size
        self.ds_config = deepspeed_config(config, stage, world_size)
        self.engine = None

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.config.precision == "bf16" else torch.float32

    def setup(
        self,
        module: nn.Module,
        groups: Iterable[dict[str, Any]],
        progress: Callable[[], float] | None = None,
    ) -> None:
        """deepspeed.initialize over `module`, AdamW (warmup + cosine, `progress`: see `warmup_cosine`) over
        only `groups`' parameters; a group `{"params": [...], "lr_ratio": r}` trains at r x the stage's lr."""
        import deepspeed

        groups = [
            {"params": list(g["params"]), "lr": self.stage.lr * g.get("lr_ratio", 1.0)}
            for g in groups
            if g["params"]
        ]
        parameters = [p for g in groups for p in g["params"]]
        stage = self.stage
        optimizer = torch.optim.AdamW(groups, lr=stage.lr, betas=stage.betas, weight_decay=stage.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(self.stage, progress))
        if self.config.precision == "bf16" and not self.config.scaling.use_gpu and not cpu_bf16_is_native():
            logger.warning(
                "bf16 on a CPU without native bf16 matmul (%s): torch falls back to a single-threaded kernel "
                "~40x slower than fp32; set deepspeed.precision to fp32 or auto",
                torch.backends.cpu.get_cpu_capability(),
            )
        if not self.config.scaling.use_gpu:
            load_comm_op()
        self.engine, _, _, _ = deepspeed.initialize(
            model=module,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            model_parameters=parameters,
            config=self.ds_config,
        )
        self.engine.checkpoint_engine = weights_only_checkpoint_engine(self.engine._config)
        logger.info(
            "DeepSpeed: ZeRO-%d, %s, %d trainable tensors, micro-batch %d x accumulation %d x %d workers",
            self.config.deepspeed.zero_stage,
            self.config.precision,
            len(parameters),
            self.stage.micro_batch_size,
            self.config.deepspeed.gradient_accumulation_steps,
            self.world_size,
        )

    # ---- one micro-step ---------------------------------------------------------------------------------
    def forward(self, batch: dict[str, Any]):
        return self.engine(batch)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> bool:
        """Apply the micro-step (the optimizer steps on accumulation boundaries); True when it stepped."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        return boundary

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    # ---- state --------------------------------------------------------------------------------------------
    def save(self, directory: str, client_state: dict[str, Any]) -> None:
        """Engine state (weights, optimizer, scheduler) + `client_state` into `directory`; every rank calls it
        (each writes its own ZeRO partition; Ray merges the ranks' directories)."""
        self.engine.save_checkpoint(
            directory, tag=CHECKPOINT_TAG, client_state=client_state, save_latest=False
        )

    def load(self, directory: str) -> dict[str, Any]:
        """Restore what `save` wrote; returns the client state."""
        path, client_state = self.engine.load_checkpoint(
            directory, tag=CHECKPOINT_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint (tag {CHECKPOINT_TAG!r}) in {directory}")
        return client_state or {}

    def close(self) -> None:
        """Release the engine (its optimizer's buffers and hooks) before the next stage builds its own."""
        self.engine.destroy()
        self.engine = None

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole module's weights on CPU on rank 0 (None elsewhere); every rank must call it.

        Under ZeRO-3 the partitions are gathered (`stage3_gather_16bit_weights_on_model_save`); below it
        every rank holds the full weights and rank 0's are taken.
        """
        import torch.distributed as dist

        if self.config.deepspeed.zero_stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            state = self.engine.module.state_dict() if dist.get_rank() == 0 else None
        return None if state is None else {name: t.detach().to("cpu").clone() for name, t in state.items()}
