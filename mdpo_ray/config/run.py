"""RunConfig: the top-level keys of a run, its sections, the checks across sections, and the numbers derived
from them (per-worker and micro-batch sizes, the eval interval, the run's location, the MLflow store)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from mdpo_ray import storage
from mdpo_ray.config.model_data import BUILTIN, BuiltinTaskConfig, DataConfig, ModelConfig, _Strict
from mdpo_ray.config.training import (
    CheckpointConfig,
    EvalConfig,
    ExportConfig,
    IterateConfig,
    LossConfig,
    OptimConfig,
    ScalingConfig,
    StopConfig,
    TrackingConfig,
)


class RunConfig(_Strict):
    """The top-level keys of a run YAML; the sections below are nested mappings (`loss: {beta: 0.3}`) or dotted
    `--set` keys (`--set loss.beta=0.3`)."""

    name: str = Field("minor-dpo-arith", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                      description="Run name: the folder under `output_dir` and the MLflow run name. Re-running with "
                      "the same name resumes from its latest checkpoint.")
    output_dir: str = Field("mdpo_runs", description="Checkpoints, the export, the reference log-prob cache and the "
                            "default MLflow store; relative paths are taken from the current directory.")
    seed: int = Field(0, description="Seed of the data order, the LoRA adapters' initialisation and the "
                      "`data.eval_fraction` split.")
    reference: Literal["resident", "precompute"] = Field(
        "resident", description="`resident`: the frozen reference is sharded beside the policy (with LoRA: the "
        "policy with its adapters off); `precompute`: its log-probs are computed once before training, cached in "
        "`output_dir/reference_logps` (keyed by model, data, tokenisation, device type and precision), and the "
        "reference is freed.")
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    builtin: BuiltinTaskConfig = BuiltinTaskConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    scaling: ScalingConfig = ScalingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    export: ExportConfig = ExportConfig()
    tracking: TrackingConfig = TrackingConfig()
    eval: EvalConfig = EvalConfig()
    stop: StopConfig = StopConfig()
    iterate: IterateConfig = IterateConfig()

    @field_validator("output_dir")
    @classmethod
    def _storage_location(cls, value: str) -> str:
        return storage.check_location(value)

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        if storage.is_remote(self.output_dir) and self.tracking.mlflow_uri is None:
            # A local default would be a file on whichever node opened it: the driver's and rank 0's
            # (on another node) would be two stores, and the run rank 0 logs to would not be in its own.
            raise ValueError(
                f"output_dir is object storage ({self.output_dir}), where MLflow's default store, an sqlite file in "
                "output_dir, cannot live: set tracking.mlflow_uri to an MLflow server every node reaches "
                "(--set tracking.mlflow_uri=http://<head>:5000; cluster.yaml starts one), or on one machine to a "
                "local file (--set tracking.mlflow_uri=sqlite:////abs/path/mlflow.db)")
        if self.optim.batch_size % self.scaling.num_workers:
            raise ValueError(
                f"optim.batch_size ({self.optim.batch_size}) must be a multiple of scaling.num_workers "
                f"({self.scaling.num_workers}): each worker takes an equal slice of every batch"
            )
        micro = self.optim.micro_batch_size
        if micro is not None and self.per_worker_batch_size % micro:
            raise ValueError(
                f"optim.micro_batch_size ({micro}) must divide the per-worker batch, optim.batch_size "
                f"({self.optim.batch_size}) / scaling.num_workers ({self.scaling.num_workers}) = "
                f"{self.per_worker_batch_size}: each optimizer step accumulates whole micro-batches"
            )
        budget = self.optim.micro_batch_tokens
        if budget is not None:
            if micro is not None:
                raise ValueError(
                    f"optim.micro_batch_tokens ({budget}) and optim.micro_batch_size ({micro}) both cut a step into "
                    "forwards: set one of them, and the other to null")
            if budget < 2 * self.data.max_length:
                raise ValueError(
                    f"optim.micro_batch_tokens ({budget}) must hold the longest pair, 2 x data.max_length "
                    f"({self.data.max_length}) = {2 * self.data.max_length} tokens, since a pair's chosen and rejected "
                    f"sequences run in one forward: raise it to at least {2 * self.data.max_length}, or lower "
                    "data.max_length")
            if self.data.group_by_length:
                raise ValueError(
                    "data.group_by_length sorts a step's pairs into micro-batches of optim.micro_batch_size pairs; "
                    "with optim.micro_batch_tokens set, forwards are cut by tokens already: set "
                    "data.group_by_length=false (data.padding_free leaves no padding to save)")
        if self.data.group_by_length and self.accumulation_steps == 1 and self.scaling.num_workers == 1:
            raise ValueError(
                f"data.group_by_length groups a step's pairs into micro-batches, but one worker runs the whole batch "
                f"({self.optim.batch_size} pairs) in one forward: set optim.micro_batch_size to a divisor of it "
                f"(e.g. {max(1, self.optim.batch_size // 4)}), or data.group_by_length=false"
            )
        if self.scaling.mixed_precision == "bf16" and not self.scaling.use_gpu:
            raise ValueError("scaling.mixed_precision=bf16 needs scaling.use_gpu=true; use auto or fp32 on CPU")
        if self.model.attn_implementation == "flex_attention" and not self.scaling.use_gpu:
            raise ValueError("model.attn_implementation=flex_attention needs scaling.use_gpu=true: torch has no "
                             "flex-attention backward on CPU; use sdpa or eager on CPU")
        gpus = self.scaling.gpus_per_worker
        if self.scaling.use_gpu and (gpus > 1 or (gpus < 1 and self.scaling.num_workers > 1)):
            # Each worker is one FSDP2 rank on one GPU: more GPUs per worker would sit idle, and NCCL refuses
            # two ranks of one group on the same GPU, which a fraction would allow.
            raise ValueError(
                f"scaling.gpus_per_worker ({gpus:g}) must be 1 with scaling.use_gpu=true: each worker is one "
                "FSDP2 rank on one GPU, so to use more GPUs raise scaling.num_workers; a fraction (several "
                "sweep trials on one GPU) fits only scaling.num_workers=1"
            )
        every, log = self.eval.every_steps, self.tracking.log_every_steps
        if every and every % log:
            raise ValueError(
                f"eval.every_steps ({every}) must be a multiple of tracking.log_every_steps ({log}): evals run "
                f"at logging steps, so the others would be skipped; e.g. eval.every_steps={max(log, every // log * log)}"
            )
        if self.tracking.log_model and self.model.lora.r > 0 and self.export.lora == "adapter":
            raise ValueError(
                "tracking.log_model=true logs the export as a whole transformers model, but export.lora=adapter "
                "exports only the LoRA adapters: set export.lora=merged, or tracking.log_model=false and register "
                "the adapter directory yourself"
            )
        if self.iterate.rounds and self.model.lora.r and self.export.lora == "both":
            raise ValueError(
                "export.lora=both with iterate.rounds > 0: every round exports both already, and the iterate run's "
                "own export is one adapter, the rounds' stacked over model.name_or_path. Set export.lora=adapter for "
                "that adapter (output_dir/<name>/export) beside the last round's merged model (its round's export), "
                "or export.lora=merged for the merged model alone")
        if self.model.reference is not None and self.model.lora.r and self.reference == "resident":
            # A resident LoRA reference is the policy with its adapters off: the policy's base, not model.reference.
            raise ValueError(
                "model.reference with model.lora.r > 0 needs reference=precompute (a resident LoRA reference is the "
                "policy with its adapters off): set reference=precompute, or model.reference=null")
        if self.iterate.rounds and self.iterate.reference == "initial" and self.model.lora.r \
                and self.reference == "resident":
            raise ValueError(
                "iterate.reference=initial with model.lora.r > 0 needs reference=precompute (a resident LoRA reference "
                "is the round's start policy with its adapters off): set reference=precompute or "
                "iterate.reference=previous")
        if self.model.name_or_path == BUILTIN and self.data.train != BUILTIN:
            raise ValueError(
                "model.name_or_path=builtin:arith is the SFT model of the built-in task and only fits "
                "data.train=builtin:arith; set model.name_or_path to your own model"
            )
        return self

    # Derived numbers, computed once here rather than at each use.
    @property
    def per_worker_batch_size(self) -> int:
        return self.optim.batch_size // self.scaling.num_workers

    @property
    def micro_batch_size(self) -> int:
        return self.optim.micro_batch_size or self.per_worker_batch_size

    @property
    def accumulation_steps(self) -> int:
        """Forwards per worker per optimizer step; with optim.micro_batch_tokens, at most this many (one a pair)."""
        if self.optim.micro_batch_tokens is not None:
            return self.per_worker_batch_size
        return self.per_worker_batch_size // self.micro_batch_size

    @property
    def eval_every_steps(self) -> int:
        """eval.every_steps; by default every fifth of the run at logging steps, so eval curves have 5 points
        after the one before training (100 steps, logging every 10: every 20). 0: before and after only."""
        if self.eval.every_steps is not None:
            return self.eval.every_steps
        log = self.tracking.log_every_steps
        return max(log, self.optim.max_steps // 5 // log * log)

    @property
    def run_dir(self) -> Path:
        """The run's local directory; an object-store output_dir has none: use run_location."""
        if storage.is_remote(self.output_dir):
            raise ValueError(f"output_dir {self.output_dir} is object storage, not a local directory: use run_location")
        return Path(self.output_dir) / self.name

    @property
    def run_location(self) -> str:
        """output_dir/name: a path, or a URI for object storage."""
        return storage.join(self.output_dir, self.name)

    @property
    def mlflow_uri(self) -> str:
        return self.tracking.mlflow_uri or f"sqlite:///{Path(self.output_dir) / 'mlflow.db'}"

