"""`TrainConfig`: the `train:` section of a run config, validated once, before any worker starts.

    train:
      run_name: hovle                 # checkpoints at <storage_path>/<run_name>-train; reruns resume
      storage_path: runs              # local folder or s3://bucket/prefix
      seed: 0
      data: {distill: URI, align: URI, instruct: URI}     # prepared datasets (hovle prepare)
      scaling: {num_workers: 2, use_gpu: false, cpus_per_worker: 0.5, placement_strategy: PACK}
      deepspeed: {zero_stage: 2, precision: auto, gradient_accumulation_steps: 1, gradient_clipping: 1.0}
      checkpoint: {every_n_steps: 50, keep_last: 2}
      max_failures: 1
      tracking: {uri: null, experiment: hovle}       # null: sqlite:///<working folder>/mlflow.db
      log_every_n_steps: 10
      lora: null                      # or {r: 8, lora_alpha: 16, target_modules: [q_proj], export: adapter}
      recipe: project                 # or paper: HoVLE's recipe as published (see TrainConfig.recipe)
      stages:
        distill: {steps: 200, lr: 1.0e-4, micro_batch_size: 4, max_tokens: 2048, teacher: mobilenet_v2}
        align: {steps: 200, lr: 5.0e-5}      # or {steps: 10000, cpu_seconds: 600}: a CPU budget
        instruct: {steps: 200, lr: 2.0e-5, llm_lr_ratio: 0.1}

Every field has a default; a wrong or unknown field fails with its dotted name (`train.stages.align.lr`).
The whole run config (this section among the others) is loaded by `jobs.run_config.load_run_config`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from model.errors import ConfigError, config_problems
from model.stages import STAGE_NAMES


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StageSettings(_Strict):
    """One stage's optimisation and data settings."""

    steps: int = Field(100, ge=1, description="optimizer steps (with cpu_seconds: an upper bound)")
    cpu_seconds: float | None = Field(
        None,
        gt=0,
        description="train until the worker processes have spent this many CPU-seconds; `steps` is then "
        "only an upper bound, and the cosine LR and De-focus's drop path follow the CPU-seconds spent "
        "(jobs.budget)",
    )
    lr: float = Field(1e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine floor, as a share of lr")
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    micro_batch_size: int = Field(2, ge=1, description="rows per worker per micro-step (packs or samples)")
    max_tokens: int | None = Field(
        2048, ge=16, description="pack samples into rows of this many tokens; null pads to the longest"
    )
    text_preservation_weight: float | None = Field(
        None, ge=0, description="next-token stages: weight of the text-preservation term (null: the stage's)"
    )
    image_anchor_weight: float = Field(
        0.0,
        ge=0,
        description="next-token stages of HoVLE: weight of stage 1's image distillation kept as a term (the "
        "teacher's, with a fresh head), so the image tokens stay anchored to the teacher's features instead "
        "of collapsing onto one vector under the next-token loss (0: off)",
    )
    text_kl_weight: float = Field(
        0.0,
        ge=0,
        description="next-token stages: weight of KL(base LLM || model) on the answer tokens of text-only "
        "samples, the base being the LLM as the stage started, fed its own embeddings: it keeps the "
        "text-only answers the user sees (a frozen copy of the LLM is held when the stage trains it; 0: off)",
    )
    frozen: list[str] = Field(
        default_factory=list,
        description="parameter-name prefixes frozen in this stage although it trains them, e.g. "
        "[embedding.layers., embedding.embed_tokens.]: the image path learns and the text path stays "
        "exactly as the previous stage left it",
    )
    llm_lr_ratio: float = Field(
        1.0, ge=0, description="stages that train the LLM: its learning rate as a share of lr (0 freezes it)"
    )
    teacher: str = Field(
        "mobilenet_v2",
        description="distill and the image anchor: vision teacher: mobilenet_v2, a local HF vision folder, "
        "or compositional:<a compositional model's export, save_pretrained folder or models:/ URI>",
    )
    teacher_input_size: int | None = Field(224, ge=16, description="tiles resized for the teacher")


class ScalingSettings(_Strict):
    """Ray Train's ScalingConfig."""

    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(
        0.5, gt=0, description="fractional on small machines: whole CPUs starve Ray Data's readers"
    )
    gpus_per_worker: float = Field(1.0, gt=0)
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    threads_per_worker: int | None = Field(
        None, ge=1, description="torch CPU threads per worker; null: Ray's (its CPU reservation, at least 1)"
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"


class DeepSpeedSettings(_Strict):
    """The DeepSpeed engine each worker builds (see jobs.strategy.deepspeed_config)."""

    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 on GPU, fp32 on CPU (bf16 on CPU when asked)"
    )
    gradient_accumulation_steps: int = Field(1, ge=1)
    gradient_clipping: float = Field(1.0, ge=0, description="max global grad norm; 0 disables clipping")
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto: nccl on GPU, gloo on CPU")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="auto: the model config's; flash_attention_2 needs GPUs and flash-attn"
    )


class CheckpointSettings(_Strict):
    every_n_steps: int = Field(50, ge=1)
    keep_last: int = Field(2, ge=1)


class TrackingSettings(_Strict):
    uri: str | None = Field(
        None, description="MLflow tracking URI; null: a SQLite file in the working folder"
    )
    experiment: str = "hovle"
    system_metrics: bool = True
    system_metrics_interval_s: float = Field(10.0, gt=0, description="CPU/GPU/memory sampling period")


class DataSettings(_Strict):
    distill: str | None = None
    align: str | None = None
    instruct: str | None = None
    reader: Literal["ray", "local"] = Field("ray", description="see pipelines.ingest.ShardSource")


class LoraSettings(_Strict):
    """LoRA (peft) in the stages that train its parts: there the parts' base weights stay frozen and only the
    adapters train, at the stage's lr (`llm_lr_ratio` is for full fine-tuning; 0 still leaves the LLM out)."""

    r: int = Field(8, ge=1, description="adapter rank")
    lora_alpha: float = Field(16.0, gt=0, description="scaling = lora_alpha / r")
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        min_length=1,
        description="names of the linear layers adapted inside each part (Llama's attention by default)",
    )
    on: list[Literal["llm", "embedding"]] = Field(
        default_factory=lambda: ["llm"], min_length=1, description="the parts that carry adapters"
    )
    export: Literal["merged", "adapter"] = Field(
        "merged",
        description="merged: adapters folded into the weights, a plain export; adapter: the base weights "
        "and adapter/ in peft's format (applied on load by model.load_pretrained)",
    )

    @model_validator(mode="after")
    def _distinct(self) -> LoraSettings:
        if len(set(self.on)) != len(self.on) or len(set(self.target_modules)) != len(self.target_modules):
            raise ValueError("on and target_modules must not repeat a name")
        return self


class TrainConfig(_Strict):
    run_name: str = Field("hovle", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    storage_path: str = "runs"
    seed: int = 0
    data: DataSettings = DataSettings()
    scaling: ScalingSettings = ScalingSettings()
    deepspeed: DeepSpeedSettings = DeepSpeedSettings()
    checkpoint: CheckpointSettings = CheckpointSettings()
    max_failures: int = Field(1, ge=-1, description="worker-group restarts per run; -1: no limit")
    wait_for_workers_s: float | None = Field(
        1800.0,
        gt=0,
        description="how long, in all, a run waits for its workers' resources (a lost node not replaced, "
        "a cluster smaller than `scaling` asks) before it fails; null: forever (an autoscaler adds nodes)",
    )
    tracking: TrackingSettings = TrackingSettings()
    log_every_n_steps: int = Field(10, ge=1)
    lora: LoraSettings | None = Field(None, description="null: full fine-tuning of what each stage trains")
    recipe: Literal["project", "paper"] = Field(
        "project",
        description="paper: HoVLE's own recipe (no norm-matching or text-preservation term, random init of "
        "the embedding layers); project: this platform's defaults (both terms, the preset's init)",
    )
    stages: dict[Literal["distill", "align", "instruct"], StageSettings] = Field(
        default_factory=lambda: {name: StageSettings() for name in STAGE_NAMES}
    )

    @model_validator(mode="after")
    def _every_stage(self) -> TrainConfig:
        for name in STAGE_NAMES:
            self.stages.setdefault(name, StageSettings())
        if self.scaling.use_gpu and self.deepspeed.backend == "gloo" and self.deepspeed.zero_stage == 3:
            raise ValueError("deepspeed.backend gloo with GPUs and ZeRO-3 is unsupported: use nccl (auto)")
        return self

    # ---- derived choices ----------------------------------------------------------------------------
    @property
    def precision(self) -> Literal["fp32", "bf16"]:
        if self.deepspeed.precision == "auto":
            return "bf16" if self.scaling.use_gpu else "fp32"
        return self.deepspeed.precision

    @property
    def backend(self) -> Literal["gloo", "nccl"]:
        if self.deepspeed.backend == "auto":
            return "nccl" if self.scaling.use_gpu else "gloo"
        return self.deepspeed.backend

    @property
    def tracking_uri(self) -> str:
        """MLFLOW_TRACKING_URI, else `tracking.uri`, else <working folder>/mlflow.db (jobs.tracking)."""
        from jobs.tracking import tracking_uri

        return tracking_uri(self.tracking.uri)

    @property
    def train_run_name(self) -> str:
        """The Ray Train run that trains every stage of this run (its checkpoints' folder)."""
        return f"{self.run_name}-train"

    def flat(self) -> dict[str, Any]:
        """The validated config as flat `a.b.c -> value` params (what MLflow logs)."""
        return _flatten(self.model_dump(mode="json"))


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        return {k: v for key, item in value.items() for k, v in _flatten(item, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def parse_train_config(raw: dict[str, Any], source: str = "config") -> TrainConfig:
    """Validate a `train:` mapping alone; errors name the dotted field (`train.stages.align.lr: ...`).
    A whole run config is loaded by `jobs.run_config.load_run_config`."""
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{source}: {config_problems(err, 'train')}") from None
