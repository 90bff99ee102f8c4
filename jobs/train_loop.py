"""The Ray Train worker loop (`train_loop_per_worker`): `train_stages` trains the run's stages in turn in
one worker group, skipping a stage whose export is complete. Per stage (`train_stage`):

    build   the model (the previous stage's export, or the preset), the stage's trainable split, the
            distill teacher, the DeepSpeed engine (jobs.strategy), this worker's batches (pipelines)
    resume  from the checkpoint Ray Train hands over (a restarted worker group, or a rerun of the run),
            when it was saved in this stage (its folder is `checkpoint_<stage>_<step>`)
    loop    micro-batches -> forward, backward, step, until `steps` or the CPU-seconds budget
            (jobs.budget); metrics and a progress line every N steps (jobs.meter); a checkpoint (engine +
            data position + RNG + step, CPU-seconds and tokens) every N steps and at the end, from every rank
    export  consolidated weights -> a Hugging Face folder (rank 0); with `train.lora`, the adapters merged
            into it or saved beside the base weights in peft's format (jobs.export)

Data: each worker reads its own rows of the prepared dataset in a deterministic order
(`pipelines.ingest.ShardSource`, Ray Data read tasks) instead of `ray.train.get_dataset_shard`, whose
streaming split hands blocks to whichever worker asks first: a resumed run could not know which rows were
consumed, and the final weights could not equal an uninterrupted run's. Every rank takes the same number
of steps (`TrainingStream`), so no collective waits for a rank that ran out of data.
"""

from __future__ import annotations

import copy
import gc
import logging
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from jobs.budget import StageClock
from jobs.checkpoints import checkpoint_stage, load_checkpoint, save_checkpoint, seed_everything
from jobs.export import is_export, load_export, local_copy, write_export
from jobs.hooks import Hooks, TrainStep
from jobs.logging_setup import quiet_libraries
from jobs.meter import StageMeter
from jobs.strategy import DeepSpeedStrategy
from jobs.tracking import StageLogger
from jobs.train_config import StageSettings, TrainConfig
from model import StageSpec, apply_stage, build_model, build_processor, stage_loss, stage_spec
from model.config import ConfigError
from model.lora import PART_PREFIXES, add_lora, is_adapter_key
from model.presets import config_from_spec, parse_model_spec
from pipelines.ingest import ShardSource
from pipelines.stream import TrainingStream, endless

logger = logging.getLogger("jobs.train")

LLM_PREFIX = "language_model."


@dataclass
class StageJob:
    """Everything a worker needs for one stage (plain data: Ray ships it to the workers)."""

    config: dict[str, Any]  # TrainConfig.model_dump(mode="json")
    model: dict[str, Any]  # the run config's resolved `model:` section: the model when there is no `init`
    stage: str
    data_uri: str
    export_uri: str
    init_uri: str | None = None  # the previous stage's export
    run_id: str | None = None  # the stage's MLflow run (None: no tracking)
    tracking_uri: str | None = None
    hooks: list[str] = field(default_factory=list)  # jobs/hooks.py specs, loaded on each worker


class StageModule(nn.Module):
    """What the engine trains: the model (+ the distill teacher's head, if any); forward = the stage's loss.

    The teacher's frozen backbone and the text KL's frozen copy of the LLM (made only when the stage trains
    the LLM) are deliberately not submodules: plain modules outside the engine (no ZeRO, no optimizer state).
    """

    def __init__(
        self,
        model: nn.Module,
        spec: StageSpec,
        teacher: nn.Module | None = None,
        base_llm: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.model, self.spec = model, spec
        self.head = teacher.head if teacher is not None else None
        object.__setattr__(self, "teacher", teacher)  # unregistered: see the docstring
        object.__setattr__(self, "base_llm", base_llm)  # the text KL's frozen base, unregistered too

    def forward(self, batch: dict[str, Any]):
        result = stage_loss(self.model, batch, self.spec, self.teacher, self.base_llm)
        loss = result.loss
        if batch.get("pixel_values") is None:
            # Every rank must give every trainable tensor a gradient each micro-step: DeepSpeed all-reduces
            # gradients in buckets as they arrive, and ranks whose buckets differ deadlock or crash gloo. A
            # batch without images sends one blank tile through the image path with weight 0 (as InternVL).
            loss = loss + 0.0 * self._blank_image(batch["input_ids"].device).sum()
        return loss, result.parts

    def _blank_image(self, device: torch.device) -> torch.Tensor:
        config = self.model.config
        ids = torch.full((1, config.image_tokens_per_tile), config.img_context_token_id, device=device)
        pixels = torch.zeros(1, 3, config.tile_size, config.tile_size, device=device)
        # through forward, so ZeRO-3 gathers its parameters
        embedding = getattr(self.model, "embedding", None)
        if embedding is None:  # the compositional model: the encoder + projector path
            return self.model.embed_inputs(ids, pixels)
        states = embedding(ids, pixels)
        return self.head(states) if self.head is not None else states


def train_stages(loop_config: dict[str, Any]) -> None:
    """Every stage of `loop_config["stages"]` (StageJob dicts, in order) in this worker group."""
    import ray.train

    quiet_libraries()  # no GGUF conversion bars in every worker (HOVLE_VERBOSE=1 keeps them)
    checkpoint = ray.train.get_checkpoint()  # the run's latest: of the stage it was saved in
    for raw in loop_config["stages"]:
        job = StageJob(**raw)
        if is_export(job.export_uri):  # trained before this worker group restarted
            continue
        train_stage(job, checkpoint if checkpoint_stage(checkpoint) == job.stage else None)
        checkpoint = None
        gc.collect()  # the stage's engine, model and batches, before the next stage builds its own


def train_stage(job: StageJob, checkpoint=None) -> None:
    """One stage on this worker, resumed from `checkpoint` (a Ray Train checkpoint of this stage) if given."""
    import ray.train

    started = time.perf_counter()
    config = TrainConfig.model_validate(job.config)
    settings = config.stages[job.stage]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if config.scaling.threads_per_worker:
        torch.set_num_threads(config.scaling.threads_per_worker)
    seed_everything(config.seed)
    hooks = Hooks(job.hooks)

    # ---- build ------------------------------------------------------------------------------------------
    model, processor = _start_model(job, config)
    spec = _stage_spec(job.stage, settings, config.recipe, model.config.model_type)
    names = [name for name, _ in model.named_parameters()]
    unknown = [prefix for prefix in spec.frozen if not any(name.startswith(prefix) for name in names)]
    if unknown:
        raise ConfigError(f"train.stages.{job.stage}.frozen: {unknown} names no parameter of the model")
    teacher = _teacher(model, settings) if spec.needs_teacher else None
    base_llm = None
    if spec.text_kl_weight > 0 and spec.is_trainable(LLM_PREFIX):
        base_llm = copy.deepcopy(model.language_model).eval().requires_grad_(False)
    spec = _add_lora(model, spec, config)  # after the copy: the text KL's base has no adapters
    apply_stage(model, spec)
    parameters = _parameter_groups(model, spec, settings)
    if teacher is not None:
        parameters.append({"params": list(teacher.trainable_parameters()), "lr_ratio": 1.0})
    module = StageModule(model, spec, teacher, base_llm)
    strategy = DeepSpeedStrategy(config, settings, world)
    clock = StageClock(settings.steps, settings.cpu_seconds)
    strategy.setup(module, parameters, clock.fraction)  # a CPU budget's cosine follows the clock
    clock.device = strategy.device
    _frozen_encoder_in_fp32(model, config)
    if teacher is not None:
        teacher.to(strategy.device)
    if base_llm is not None:
        base_llm.to(strategy.device, strategy.dtype)
    source = ShardSource(
        job.data_uri,
        "train",
        rank,
        world,
        config.seed,
        tile_size=model.config.tile_size,
        reader=config.data.reader,
    )
    stream = TrainingStream(
        source,
        batch_size=settings.micro_batch_size,
        pad_token_id=processor.tokenizer.pad_token_id,
        max_tokens=settings.max_tokens,
    )

    # ---- resume -----------------------------------------------------------------------------------------
    step, resumed_from = 0, None
    if checkpoint is not None:
        client_state = load_checkpoint(checkpoint, strategy, stream, rank)
        step = resumed_from = int(client_state["step"])
        clock.resume(client_state)  # the CPU-seconds and tokens spent before
        if rank == 0:
            logger.info(
                "%s: resumed at step %d/%d (%.0f CPU-s) from %s",
                job.stage, step, settings.steps, clock.spent, checkpoint.path,
            )  # fmt: skip

    # ---- loop -------------------------------------------------------------------------------------------
    tracking = config.tracking
    tracker = nullcontext()
    if rank == 0 and job.run_id:
        tracker = StageLogger(
            job.tracking_uri, job.run_id, tracking.system_metrics, tracking.system_metrics_interval_s
        )
    meter = StageMeter(model, job.stage, settings, strategy, clock)
    batches = endless(stream)
    accumulation = config.deepspeed.gradient_accumulation_steps
    resumed_cpu_seconds = clock.spent
    clock.start()
    with tracker as log:
        while not clock.done(step):
            # first at the resumed step, before any update
            advance_drop_path(model, step, settings.steps, clock.progress(step))
            meter.start_step()
            for _ in range(accumulation):
                batch = meter.timed_next(batches)
                loss, parts = strategy.forward(_to_device(batch, strategy.device, strategy.dtype))
                strategy.backward(loss)
                strategy.step()
                meter.add(batch, parts)
            step += 1
            meter.end_step()
            clock.tick()  # with a budget: every rank now agrees whether this was the last step
            hooks.emit("on_train_step", TrainStep(job.stage, step, rank, world, resumed_from))
            last = clock.done(step)
            with clock.paused():  # bookkeeping, not training: outside a CPU budget
                if step % config.log_every_n_steps == 0 or last:
                    metrics = meter.report(step)  # every rank: it all-reduces
                    if rank == 0:
                        logger.info(meter.progress_line(job.stage, step, metrics))
                        if log is not None:
                            log.metrics(metrics, step)
                if step % config.checkpoint.every_n_steps == 0 or last:
                    save_checkpoint(strategy, stream, clock, step, job.stage, rank)

    # ---- export -----------------------------------------------------------------------------------------
    clock.sync()  # every rank (a run resumed from its last checkpoint syncs here)
    weights = strategy.full_state_dict()  # every rank takes part in gathering
    if rank == 0:
        model_weights = {k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.")}
        info = {
            "stage": job.stage,
            "steps": step,
            "resumed_from_step": resumed_from,  # where this attempt resumed (None: it started fresh)
            "resumed_from_cpu_seconds": resumed_cpu_seconds if resumed_from is not None else None,
            "cpu_seconds": clock.spent,  # the training loop's, the slowest rank's, resumes included
            "cpu_seconds_budget": settings.cpu_seconds,
            "stopped_by": clock.stopped_by,
            "tokens": clock.tokens,  # tokens trained on, all ranks
            "data": job.data_uri,
            "init": job.init_uri,
            "run_id": job.run_id,
            "wall_s": round(time.perf_counter() - started, 3),  # this attempt's, from its start to here
        }
        if spec.adapted:  # the adapters' settings, and what they were trained on
            info["lora"] = {**config.lora.model_dump(), "base": job.init_uri or model.config.llm_name_or_path}
        write_export(model, processor, model_weights, job.export_uri, info)
        if isinstance(tracker, StageLogger):
            tracker.finish()  # the stage is done: its MLflow run ends now, not when the last stage does
    dist.barrier()
    strategy.close()


def advance_drop_path(
    model: nn.Module, step: int, total_steps: int, progress: float | None = None
) -> float | None:
    """De-focus attention: set the embedding's drop-path rates for the stage's progress: `progress` (a
    CPU-seconds budget's share spent, jobs.budget) when given, else step / total_steps.

    Returns the deepest layer's (largest) rate, or None when the model uses standard attention.
    """
    embedding = getattr(model, "embedding", None)  # the compositional model has none
    if embedding is None or not embedding.defocus:
        return None
    embedding.set_drop_path_progress(step / total_steps if progress is None else progress)
    return max(embedding.drop_path_rates)


# ---- build helpers ---------------------------------------------------------------------------------------
def _start_model(job: StageJob, config: TrainConfig):
    """(model, processor): the previous stage's export, else the run config's preset, in fp32 on CPU
    (the paper's recipe starts the embedding layers at random)."""
    if job.init_uri:
        model, processor = load_export(job.init_uri)  # an adapter export comes merged
    else:
        hovle_config = config_from_spec(parse_model_spec(job.model))
        if config.recipe == "paper":
            hovle_config.embedding_init = "random"
        model, processor = build_model(hovle_config), build_processor(hovle_config)
    attn = config.deepspeed.attn_implementation
    if attn != "auto":
        model.config.text_config._attn_implementation = attn
        model.language_model.config._attn_implementation = attn
    return model.train(), processor


def _stage_spec(
    stage: str, settings: StageSettings, recipe: str = "project", model_type: str = "hovle"
) -> StageSpec:
    """The stage's spec for the model's architecture (`model.stages.STAGES_BY_MODEL_TYPE`) with the run
    config's choices: the paper's recipe has none of the norm-matching, text-preservation, image-anchor
    and text KL terms (the compositional model has no image anchor: its encoder is frozen);
    `llm_lr_ratio` 0 freezes the LLM, `frozen` any other parameters by name."""
    spec = stage_spec(model_type, stage)
    options: dict[str, Any] = {"frozen": tuple(settings.frozen)} if settings.frozen else {}
    if spec.loss == "next_token":
        if settings.text_preservation_weight is not None:
            options["text_preservation_weight"] = settings.text_preservation_weight
        if settings.image_anchor_weight and model_type == "hovle":
            options["image_anchor_weight"] = settings.image_anchor_weight
        if settings.text_kl_weight:
            options["text_kl_weight"] = settings.text_kl_weight
    if recipe == "paper":
        options.update(
            text_preservation_weight=0.0, norm_weight=0.0, image_anchor_weight=0.0, text_kl_weight=0.0
        )
    if settings.llm_lr_ratio == 0:
        options["trainable"] = tuple(p for p in spec.trainable if p != LLM_PREFIX)
    return spec.with_options(**options)


def _add_lora(model: nn.Module, spec: StageSpec, config: TrainConfig) -> StageSpec:
    """`train.lora`'s adapters on the parts this stage trains (model/lora.py); the spec then trains only
    their adapters there (and the rest it trains in full). A stage training none of those parts: unchanged."""
    lora = config.lora
    if lora is None:
        return spec
    if "embedding" in lora.on and getattr(model, "embedding", None) is None:
        raise ConfigError("train.lora.on: embedding: this model has no embedding module (compositional)")
    parts = [part for part in lora.on if f"{PART_PREFIXES[part]}.".startswith(spec.trainable)]
    if not parts:
        return spec
    adapted = add_lora(model, lora.r, lora.lora_alpha, lora.lora_dropout, lora.target_modules, parts)
    return spec.with_options(adapted=adapted)


def _parameter_groups(model: nn.Module, spec: StageSpec, settings: StageSettings) -> list[dict[str, Any]]:
    """The stage's trainable parameters as optimizer groups: the LLM's at `llm_lr_ratio` of the stage's
    lr (keeping what the LLM knows while the rest learns), everything else at the stage's lr."""
    groups: dict[float, list[nn.Parameter]] = {}
    for name, param in spec.trainable_parameters(model):
        ratio = settings.llm_lr_ratio if name.startswith(LLM_PREFIX) and not is_adapter_key(name) else 1.0
        groups.setdefault(ratio, []).append(param)
    return [{"params": params, "lr_ratio": ratio} for ratio, params in groups.items()]


def _teacher(model: nn.Module, settings: StageSettings):
    """The distill teacher; a compositional teacher at a remote URI (jobs.train puts models:/ ones on the
    run's storage) is copied here first."""
    from model.teachers import COMPOSITIONAL_PREFIX, build_teacher

    hidden, spec = model.config.text_config.hidden_size, settings.teacher
    if not spec.startswith(COMPOSITIONAL_PREFIX):
        return build_teacher(spec, hidden, settings.teacher_input_size)
    with tempfile.TemporaryDirectory(prefix="hovle-teacher-") as scratch:
        folder = local_copy(spec.removeprefix(COMPOSITIONAL_PREFIX), scratch)
        return build_teacher(COMPOSITIONAL_PREFIX + folder, hidden)


def _frozen_encoder_in_fp32(model: nn.Module, config: TrainConfig) -> None:
    """Under bf16, give a frozen vision encoder (the compositional model's MobileNetV2) its fp32 weights back:
    DeepSpeed casts parameters to bf16 but keeps buffers in fp32, and BatchNorm cannot mix the two. It never
    trains, so fp32 costs only its 2M weights. Under ZeRO-3 (partitioned parameters) it is left as it is."""
    encoder = getattr(model, "vision_encoder", None)
    if encoder is None or config.precision != "bf16" or config.deepspeed.zero_stage == 3:
        return
    if any(p.requires_grad for p in encoder.parameters()):
        raise ValueError("the vision encoder is expected frozen in every stage")
    encoder.float()


def _to_device(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """`batch` for the model: tensors on `device` (floats in `dtype`), the stream's bookkeeping dropped."""
    return {
        key: value.to(device, dtype=dtype if value.is_floating_point() else None, non_blocking=True)
        if isinstance(value, torch.Tensor)
        else value
        for key, value in batch.items()
        if key not in ("ids", "num_samples", "num_tokens")
    }
