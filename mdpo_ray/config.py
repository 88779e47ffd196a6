"""One pydantic schema for a run: loaded from YAML, overridden with dotted keys, validated once.

Everything downstream takes the validated sub-config it needs and trusts it. Paths are made absolute
here so that Ray workers, whose working directory differs from the driver's, see the same files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mdpo_ray import storage

BUILTIN = "builtin:arith"  # the generated arithmetic task and its SFT-warmed tiny model
# Where Ray unpacks a job's --working-dir (ray_constants.DEFAULT_RUNTIME_ENV_DIR_NAME, under the session dir).
RAY_RUNTIME_RESOURCES = "runtime_resources"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraConfig(_Strict):
    """Low-rank adapters (peft) on the policy's linear layers; the reference is the same model with them off."""

    r: int = Field(0, ge=0)  # adapter rank; 0: full fine-tuning (no adapters)
    alpha: float = Field(16.0, gt=0)  # the adapter output is scaled by alpha / r
    dropout: float = Field(0.0, ge=0, lt=1)  # on the adapter's input only
    target_modules: list[str] | Literal["all-linear"] = "all-linear"  # module names (suffixes), or every linear but the head


class ModelConfig(_Strict):
    name_or_path: str = BUILTIN  # a hub id, a local save_pretrained dir, or builtin:arith
    tokenizer: str | None = None  # defaults to name_or_path
    trust_remote_code: bool = False
    lora: LoraConfig = LoraConfig()


class BuiltinTaskConfig(_Strict):
    """The generated arithmetic preference task."""

    # near_miss / wrong_final: synthetic edits of the right chain; on_policy: sampled from the SFT model, judged wrong
    rejected_kind: Literal["near_miss", "wrong_final", "on_policy"] = "near_miss"
    n_layers: int = Field(2, ge=1)
    hidden_size: int = Field(128, ge=8)
    n_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(512, ge=8)
    n_sft_problems: int = Field(20_000, ge=10)
    n_pref_pairs: int = Field(4_000, ge=10)
    n_eval_pairs: int = Field(300, ge=1)
    n_eval_problems: int = Field(500, ge=1)
    sft_target_accuracy: float = Field(0.4, ge=0.0, le=1.0)  # stop SFT at the first eval reaching this
    sft_max_steps: int = Field(4_000, ge=1)
    sft_eval_every_steps: int = Field(100, ge=1)
    sft_batch_size: int = Field(64, ge=1)
    sft_lr: float = Field(1e-3, gt=0)
    seed: int = 0
    cache_dir: str = "~/.cache/mdpo-ray"  # SFT model + generated data, reused by later runs

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> BuiltinTaskConfig:
        if self.hidden_size % self.n_heads:
            raise ValueError(
                f"builtin.hidden_size ({self.hidden_size}) must be divisible by builtin.n_heads ({self.n_heads})"
            )
        return self


class DataConfig(_Strict):
    train: str = BUILTIN  # hub dataset name, .jsonl/.json/.parquet file, save_to_disk dir, or builtin:arith
    train_split: str = "train"
    eval: str | None = None  # same kinds as `train`; None: hold out eval_fraction of train (builtin: its own set)
    eval_split: str = "train"
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    format: Literal["auto", "standard", "conversational", "implicit"] = "auto"
    max_length: int = Field(512, ge=2)  # prompt + completion tokens; pairs whose prompt alone fills it are dropped
    on_bad_rows: Literal["drop", "error"] = "drop"
    generation_eval: str | None = None  # JSONL of {prompt, answer}: greedy answer accuracy ("#### N" answers)


class LossConfig(_Strict):
    name: Literal["minor_dpo", "dpo", "dpop", "ipo", "robust", "hinge", "sft"] = "minor_dpo"
    beta: float = Field(0.1, gt=0)
    reject_threshold: float = Field(0.0, le=0)  # MinorDPO tau in max(tau, Δl); 0 is the paper, -inf is DPO
    reject_weight: float = Field(1.0, ge=0)  # MinorDPO weight on the (clamped) reject term
    dpop_lambda: float = Field(50.0, ge=0)  # DPO-Positive penalty on max(0, -Δw)
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)  # robust / cDPO epsilon
    average_log_prob: bool = False  # length-average the sequence log-probs (IPO's definition uses this)

    def knobs(self) -> dict[str, float]:
        """The keyword arguments every loss in mdpo_ray.training.losses accepts."""
        return dict(
            beta=self.beta,
            reject_threshold=self.reject_threshold,
            reject_weight=self.reject_weight,
            dpop_lambda=self.dpop_lambda,
            label_smoothing=self.label_smoothing,
        )


class OptimConfig(_Strict):
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(10, ge=0)
    schedule: Literal["constant", "linear", "cosine"] = "constant"  # after warm-up
    max_steps: int = Field(100, ge=1)
    batch_size: int = Field(16, ge=1)  # pairs per optimizer step, summed over all workers
    micro_batch_size: int | None = Field(None, ge=1)  # pairs per worker per forward; None: batch_size / num_workers
    # Accumulating, reduce-scatter the gradients once per step (each rank holds an unsharded fp32 gradient
    # meanwhile) or after every micro-batch (gradients stay sharded: more traffic, less memory).
    sync_every_micro_batch: bool = False
    grad_clip: float = Field(1.0, gt=0)
    max_consecutive_nonfinite: int = Field(5, ge=1)  # stability guard: fail after this many skipped steps in a row


class ScalingConfig(_Strict):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, gt=0)  # only read when use_gpu
    mixed_precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 params + fp32 reduce on GPUs with native bf16, else fp32
    max_failures: int = Field(0, ge=-1)  # worker-group restarts from the latest checkpoint (-1: unlimited)
    activation_checkpointing: bool = False  # recompute each decoder block's activations in backward
    cpu_offload: bool = False  # FSDP2 CPUOffloadPolicy: the policy's params, grads and AdamW state live in host memory


class CheckpointConfig(_Strict):
    every_steps: int = Field(50, ge=1)
    num_to_keep: int = Field(2, ge=1)


class ExportConfig(_Strict):
    lora: Literal["merged", "adapter"] = "merged"  # with model.lora.r > 0: a plain model, or a peft adapter dir


class TrackingConfig(_Strict):
    mlflow_uri: str | None = None  # None: sqlite:///<output_dir>/mlflow.db
    experiment: str = "mdpo-ray"
    log_every_steps: int = Field(10, ge=1)
    # CPU, memory, disk, network (and GPU, with nvidia-ml-py) of rank 0's node, every 10 s, as MLflow's system/* metrics
    system_metrics: bool = True


class EvalConfig(_Strict):
    every_steps: int | None = Field(None, ge=0)  # None: about 5 evals a run (see RunConfig); 0: before and after only
    batch_size: int = Field(32, ge=1)  # pairs per eval forward, per worker
    max_new_tokens: int = Field(64, ge=1)
    generation_batch_size: int = Field(128, ge=1)
    max_generation_problems: int | None = Field(None, ge=1)


class StopConfig(_Strict):
    """Stop an unstable run early (a sweep's stopper), checked at every log step; the reason is tagged in MLflow."""

    max_nonfinite_steps: int | None = Field(None, ge=1)  # stop once this many steps were skipped in all
    max_chosen_drop: float | None = Field(None, gt=0)  # stop once mean Δw (chosen log-prob drift) < -this


class RunConfig(_Strict):
    name: str = Field("minor-dpo-arith", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # resume key: same name resumes
    output_dir: str = "mdpo_runs"
    seed: int = 0
    reference: Literal["resident", "precompute"] = "resident"
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
        if self.scaling.mixed_precision == "bf16" and not self.scaling.use_gpu:
            raise ValueError("scaling.mixed_precision=bf16 needs scaling.use_gpu=true; use auto or fp32 on CPU")
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
        """Forwards per worker per optimizer step."""
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


class ConfigError(ValueError):
    """A config the user must fix; the message names the key and the fix."""


def _absolute(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """Resolve relative local paths against `base` so that every Ray worker reads the same files."""
    out = dict(raw)
    output_dir = out.get("output_dir", "mdpo_runs")
    if isinstance(output_dir, os.PathLike):
        output_dir = out["output_dir"] = os.fspath(output_dir)
    if isinstance(output_dir, str) and not storage.looks_like_uri(output_dir):  # a URI is checked by the schema
        out["output_dir"] = str((base / os.path.expanduser(output_dir)).resolve())
    for section, keys in (("data", ("train", "eval", "generation_eval")), ("model", ("name_or_path", "tokenizer"))):
        sub = out.get(section)
        if not isinstance(sub, dict):
            continue  # not a mapping: the schema reports it
        sub = dict(sub)
        for key in keys:
            value = sub.get(key)
            if isinstance(value, str) and not value.startswith("builtin:"):
                candidate = base / os.path.expanduser(value)
                if candidate.exists():  # otherwise a hub name: leave it
                    sub[key] = str(candidate.resolve())
        out[section] = sub
    builtin = out.get("builtin") or {}
    if isinstance(builtin, dict):
        builtin = dict(builtin)
        builtin["cache_dir"] = str(Path(os.path.expanduser(builtin.get("cache_dir", "~/.cache/mdpo-ray"))).resolve())
        out["builtin"] = builtin
    return out


def check_storage_outlives_job(cfg: RunConfig) -> None:
    """A ConfigError if checkpoints, the export or the MLflow store would be written inside Ray's copy of a
    job's --working-dir (a relative output_dir under `ray job submit`): Ray deletes that copy with its
    cache, and a re-submitted job gets a new one, so nothing would be found again to resume or compare.
    Refused rather than moved somewhere: only the user knows which storage every node reaches.
    An object-store output_dir is written to once (and the object deleted): a missing bucket, refused
    credentials or an endpoint that does not answer are said now, before Ray starts."""
    if storage.is_remote(cfg.output_dir):
        try:
            storage.probe_writable(cfg.output_dir)
        except OSError as error:
            raise ConfigError(
                f"output_dir ({cfg.output_dir}) cannot be written to: {error}. Check that the bucket exists and that "
                "this machine's AWS credentials may write there (an instance profile, or AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY; AWS_ENDPOINT_URL for an S3-compatible store). Nothing has started") from None
    inside = [f"output_dir ({cfg.output_dir})"] if RAY_RUNTIME_RESOURCES in Path(cfg.output_dir).parts else []
    store = _local_store(cfg.mlflow_uri)
    if store is not None and RAY_RUNTIME_RESOURCES in (Path.cwd() / store).parts:
        default = " (the default store, in output_dir)" if cfg.tracking.mlflow_uri is None else ""
        inside.append(f"tracking.mlflow_uri ({cfg.mlflow_uri}{default})")
    if inside:
        raise ConfigError(
            f"{' and '.join(inside)} would be inside Ray's copy of this job's working directory "
            f"({RAY_RUNTIME_RESOURCES}/...), which Ray deletes; a re-submitted job would not find the checkpoints, "
            "the export or the runs. Nothing has started. Set output_dir to an absolute path every node can reach "
            "(--set output_dir=/mnt/shared/mdpo_runs) or to object storage (--set output_dir=s3://bucket/prefix), "
            "and tracking.mlflow_uri to an MLflow server "
            "(--set tracking.mlflow_uri=http://<head>:5000)")


def _local_store(uri: str) -> str | None:
    """The path of a local MLflow store (sqlite:///<path>, file:<path>, a bare path; relative to the process
    cwd), None for a server."""
    if uri.startswith("sqlite:///"):
        return uri.removeprefix("sqlite:///")
    if uri.startswith("file:"):
        return uri.removeprefix("file://").removeprefix("file:")
    return None if "://" in uri or uri.split(":")[0] in ("databricks", "databricks-uc", "uc") else uri


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: `{part}` is a value, not a section")
        node = child
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`loss.beta=0.3` -> ("loss.beta", 0.3); the value is read as YAML so numbers and lists work."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set loss.beta=0.3")
    return key.strip(), yaml.safe_load(value)


def _explain(error: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "<top level>"
        if item["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key; check the spelling against docs/configuration.md")
        elif item["loc"]:
            lines.append(f"  {key}: {item['msg'].removeprefix('Value error, ')} (got {item.get('input')!r})")
        else:  # a cross-field check: its message names the keys and the fix
            lines.append(f"  {item['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)


def load_config(
    path: str | os.PathLike[str] | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> RunConfig:
    """Read YAML (or the defaults), apply `key=value` overrides, validate once; raise ConfigError."""
    raw: dict[str, Any] = {}
    source = "defaults"
    base = Path.cwd()
    if path is not None:
        file = Path(path)
        source = str(file)
        if not file.is_file():
            raise ConfigError(f"config file not found: {file}")
        try:
            loaded = yaml.safe_load(file.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{file} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{file}: the top level must be a mapping of sections (model:, data:, loss:, ...)")
        raw = loaded or {}
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(raw, key, value)
        source += f" + --set {text}"
    return validate_config(raw, source=source, base=base)


def validate_config(raw: dict[str, Any], *, source: str = "config", base: Path | None = None) -> RunConfig:
    try:
        return RunConfig.model_validate(_absolute(raw, base or Path.cwd()))
    except ValidationError as exc:
        raise ConfigError(_explain(exc, source)) from None


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def flatten(cfg: RunConfig) -> dict[str, str]:
    """Dotted keys -> values, for MLflow params."""
    flat: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else key, value)
        else:
            flat[prefix] = str(node)

    walk("", cfg.model_dump(mode="json"))
    return flat
