"""One pydantic schema for a run: loaded from YAML, overridden with dotted keys, validated once.

Everything downstream takes the validated sub-config it needs and trusts it. Paths are made absolute
here so that Ray workers, whose working directory differs from the driver's, see the same files.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable
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
    """Low-rank adapters (peft) on the policy's linear layers; the reference is the same model with them off.

    With `r` > 0 only the adapters train (the AdamW state and the checkpoints hold only them), and a
    `resident` reference is the policy itself with its adapters switched off: no second model in memory.
    """

    r: int = Field(0, ge=0, description="Adapter rank; 0: full fine-tuning (no adapters).")
    alpha: float = Field(16.0, gt=0, description="The adapter output is scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout probability on the adapter's input only.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="`all-linear`: every linear layer but the output head; or a list of layer names "
        "(suffixes such as `[q_proj, v_proj]`). A name that matches no linear layer is refused before Ray starts, "
        "with the model's layer names listed.")


def _read_location(value: str | None) -> str | None:
    """A model or data location: a path, a hub name, `builtin:...`, or an object on S3 (s3://bucket/key, read from
    a copy on each node); a URI of another scheme, or a mistyped one (s3:/x), is refused naming it."""
    return value if value is None or value.startswith("builtin:") else storage.check_location(value, read=True)


class ModelConfig(_Strict):
    """The starting policy (also the reference, unless `model.reference` names another) and its tokenizer."""

    name_or_path: str = Field(BUILTIN, description="A Hugging Face hub id, a local `save_pretrained` directory, one "
                              "on S3 (`s3://bucket/prefix`, copied to each node once), or `builtin:arith` (the "
                              "built-in task's SFT-warmed tiny model; only with `data.train: builtin:arith`).")
    tokenizer: str | None = Field(None, description="Where to load the tokenizer from (hub id, directory or "
                                  "s3://); null: `model.name_or_path`.")
    chat_template: str | None = Field(
        None, description="A Jinja chat template (text containing `{{` or `{%`), or the path of a file holding one, "
        "set on the tokenizer before conversational data is rendered; for base models whose tokenizer has none. "
        "null: the tokenizer's own. The exported tokenizer keeps it.")
    reference: str | None = Field(
        None, description="The frozen reference's weights (hub id, `save_pretrained` directory or s3://, same "
        "tokenizer); null: `model.name_or_path`. `iterate.reference: initial` sets it to the first round's model in "
        "later rounds.")
    trust_remote_code: bool = Field(False, description="Passed to transformers when loading the model, its config "
                                    "and the tokenizer: runs the repository's own Python code.")
    attn_implementation: str | None = Field(
        None, description="The attention kernel transformers runs (its `attn_implementation`): `sdpa` (PyTorch's "
        "scaled_dot_product_attention), `eager` (plain matmuls; keeps every layer's T x T probabilities for the "
        "backward, which the memory plan counts), `flash_attention_2` (GPU, needs the flash-attn package), "
        "`flex_attention`; null: transformers' choice for the model (sdpa where the model supports it). Checked "
        "before Ray starts; `data.padding_free` needs one that honours position_ids resets, checked as the run "
        "starts.")
    lora: LoraConfig = LoraConfig()

    @field_validator("name_or_path", "tokenizer", "reference")
    @classmethod
    def _model_location(cls, value: str | None) -> str | None:
        return _read_location(value)

    @field_validator("attn_implementation")
    @classmethod
    def _known_attention(cls, value: str | None) -> str | None:
        if value is None or value == "eager" or "/" in value:  # "/": a kernel from the hub (kernels package)
            return value
        from transformers import AttentionInterface  # lazily: loading a config stays light without the key

        known = ["eager", *AttentionInterface().valid_keys()]
        if value not in known:
            raise ValueError(f"{value!r} is not an attention implementation transformers knows; one of "
                             f"{', '.join(known)}, or null for transformers' choice")
        return value


class BuiltinTaskConfig(_Strict):
    """The generated arithmetic preference task (`data.train: builtin:arith`): problems, a character tokenizer,
    a tiny Llama SFT-trained on the chosen answers, and the preference pairs. Built once per setting and cached
    in `cache_dir`; every key but `cache_dir` and `rejected_kind` is part of the cache key."""

    rejected_kind: Literal["near_miss", "wrong_final", "on_policy"] = Field(
        "near_miss", description="What the rejected answers are: `near_miss` (one digit of an intermediate result "
        "changed, final answer still right), `wrong_final` (the changed digit carried through to a wrong final "
        "answer), `on_policy` (sampled from the SFT model, the first of 4 samples at temperature 1 with a wrong "
        "final answer; problems it always gets right are left out). All kinds pose the same problems and share "
        "one SFT model.")
    n_layers: int = Field(2, ge=1, description="Decoder layers of the SFT model.")
    hidden_size: int = Field(128, ge=8, description="Hidden size of the SFT model; a multiple of `builtin.n_heads`.")
    n_heads: int = Field(4, ge=1, description="Attention heads of the SFT model.")
    intermediate_size: int = Field(512, ge=8, description="MLP width of the SFT model.")
    n_sft_problems: int = Field(20_000, ge=10, description="Problems the SFT warm-up trains on (chosen answers).")
    n_pref_pairs: int = Field(4_000, ge=10, description="Training preference pairs (fewer with `on_policy`: "
                              "problems without a wrong sample are left out).")
    n_eval_pairs: int = Field(300, ge=1, description="Held-out preference pairs (the `eval/` pair metrics).")
    n_eval_problems: int = Field(500, ge=1, description="Held-out problems for greedy answer accuracy "
                                 "(`eval/answer_accuracy`); the first of them also decide when SFT stops.")
    sft_target_accuracy: float = Field(0.4, ge=0.0, le=1.0, description="Stop SFT at the first evaluation whose "
                                       "held-out greedy answer accuracy reaches this fraction.")
    sft_max_steps: int = Field(4_000, ge=1, description="Stop SFT here even below `builtin.sft_target_accuracy` "
                               "(with a warning).")
    sft_eval_every_steps: int = Field(50, ge=1, description="SFT steps between held-out accuracy evaluations. "
                                      "Each scores the first 50 held-out problems, and the first 200 only once "
                                      "those reach half of `builtin.sft_target_accuracy`.")
    sft_batch_size: int = Field(32, ge=1, description="Problems per SFT step.")
    sft_lr: float = Field(1e-3, gt=0, description="AdamW peak learning rate of the SFT warm-up.")
    seed: int = Field(0, description="Seed of the generated problems, rejected answers and SFT initialisation.")
    cache_dir: str = Field("~/.cache/mdpo-ray", description="Where the SFT model and the generated data are cached "
                           "(`builtin-<hash>/`), reused by later runs with the same settings; `~` is expanded.")

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> BuiltinTaskConfig:
        if self.hidden_size % self.n_heads:
            raise ValueError(
                f"builtin.hidden_size ({self.hidden_size}) must be divisible by builtin.n_heads ({self.n_heads})"
            )
        return self


class DataConfig(_Strict):
    """Preference pairs: where they come from, how they are read, and what is done with bad rows.

    Formats: `standard` ({prompt, chosen, rejected} strings), `conversational` (lists of {role, content}
    messages rendered with the tokenizer's chat template), `implicit` ({chosen, rejected}; the prompt is their
    longest common prefix)."""

    train: str = Field(BUILTIN, description="Training pairs: a hub dataset name, a .jsonl/.json/.parquet file, a "
                       "`save_to_disk` directory (either may be on S3, `s3://bucket/key`), or `builtin:arith` (the "
                       "generated task, see `builtin.*`).")
    train_split: str = Field("train", description="Split of `data.train` to read, for sources that have splits.")
    eval: str | None = Field(None, description="Held-out pairs, same kinds as `data.train`; null: hold out "
                             "`data.eval_fraction` of the training prompts (with `builtin:arith`: the task's own "
                             "held-out set; with neither: no pair evaluation).")
    eval_split: str = Field("train", description="Split of `data.eval` to read.")
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="Without `data.eval`: the fraction of distinct "
                                 "prompts held out (whole prompts, so no held-out prompt is trained on), drawn with "
                                 "the run's `seed`; 0: none.")
    format: Literal["auto", "standard", "conversational", "implicit"] = Field(
        "auto", description="Row format; `auto`: `conversational` if `chosen` holds message lists, else `standard` "
        "with a `prompt` column and `implicit` without.")
    max_length: int = Field(512, ge=2, description="Tokens of prompt + completion. The prompt is never cut: a pair "
                            "whose prompt alone has this many tokens is dropped (counted in "
                            "`data/train_prompt_too_long`); otherwise completions are cut from the end to fit.")
    on_bad_rows: Literal["drop", "error"] = Field(
        "drop", description="A bad row (missing field, wrong type, empty completion, chosen identical to rejected): "
        "`drop` it and count it (`data/train_bad_rows`), or `error`: stop, naming the row.")
    generation_eval: str | None = Field(None, description="JSONL of {prompt, answer} (a path or s3://): greedy "
                                        "decoding is scored by the integer after `####` (`eval/answer_accuracy`); "
                                        "null: none.")
    group_by_length: bool = Field(
        False, description="Sort each step's pairs by length (the longer of chosen and rejected) before cutting them "
        "into micro-batches, dealt to the workers in turn, so each micro-batch pads only to about its own pairs' "
        "length. Each step trains on the same pairs, so the loss and gradient are unchanged; needs "
        "`optim.micro_batch_size` below the per-worker batch or several workers to make any difference.")
    padding_free: bool | Literal["auto"] = Field(
        "auto", description="Pack each forward's chosen and rejected sequences end to end into as few rows as fit "
        "its longest sequence, without padding between them; each sequence attends only to itself, with its own "
        "`position_ids`. Log-probs equal the padded ones up to float rounding (tested to 1e-5 in fp32). Needs a "
        "model whose attention honours `position_ids` resets (transformers' sdpa, eager or flash-attention), "
        "checked by running it when the run starts: `true` stops the run if it does not, `auto` then pads (and "
        "says so), `false` always pads. Measured 1.2-1.4x the pairs/s of padded batches on long-tailed lengths "
        "(docs/performance.md).")

    @field_validator("train", "eval", "generation_eval")
    @classmethod
    def _data_location(cls, value: str | None) -> str | None:
        return _read_location(value)


class LossConfig(_Strict):
    """The preference loss (mdpo_ray/training/losses.py) and its knobs; each loss ignores the knobs that are not
    its own. Δw = log π(chosen) − log π_ref(chosen), Δl likewise for the rejected answer. MinorDPO:
    −log σ(β(Δw − w·max(τ, Δl)))."""

    name: Literal["minor_dpo", "dpo", "dpop", "ipo", "robust", "hinge", "sft"] = Field(
        "minor_dpo", description="`minor_dpo`, `dpo`, `dpop` (DPO-Positive), `ipo`, `robust` (cDPO), `hinge` "
        "(SLiC), or `sft` (negative log-likelihood of the chosen answer only).")
    beta: float = Field(0.1, gt=0, description="β: the strength of the implicit KL penalty; the rewards are β·Δw "
                        "and β·Δl.")
    reject_threshold: float = Field(0.0, le=0, description="MinorDPO τ in max(τ, Δl): the rejected answer is pushed "
                                    "down until Δl reaches τ. 0 is the paper; `-.inf` is DPO.")
    reject_weight: float = Field(1.0, ge=0, description="MinorDPO w, the weight of the clamped reject term; 0 "
                                 "leaves −log σ(βΔw) (chosen only).")
    dpop_lambda: float = Field(50.0, ge=0, description="DPOP λ: the penalty on max(0, −Δw), the chosen answer "
                               "falling below the reference.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="`robust` (cDPO) ε: the assumed fraction of "
                                   "pairs whose labels are flipped.")
    average_log_prob: bool = Field(False, description="Length-average the sequence log-probs instead of summing "
                                   "them over completion tokens (IPO's definition uses this).")
    nll_weight: float = Field(0.0, ge=0, description="λ: adds λ times the chosen answer's token-mean negative "
                              "log-likelihood, −(1/|y_w|)·Σ log π(y_w,t), to every pair's loss, whichever "
                              "`loss.name` (the Iterative RPO recipe uses 1 with DPO); token-mean with or without "
                              "`loss.average_log_prob`. 0: no NLL term, the loss is exactly the named one.")

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
    """AdamW, the learning-rate schedule and the batch; the learning rate and the data order are functions of
    the step, so a resumed run continues exactly."""

    lr: float = Field(1e-4, gt=0, description="AdamW peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW (decoupled) weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW β1, β2.")
    warmup_steps: int = Field(10, ge=0, description="Steps of linear warm-up to `optim.lr`.")
    schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="Learning rate after the warm-up: constant, or decaying to 0 at `optim.max_steps`.")
    max_steps: int = Field(100, ge=1, description="Optimizer steps of the run (raise it to continue a finished run "
                           "under the same `name`).")
    batch_size: int = Field(16, ge=1, description="Pairs per optimizer step, summed over all workers; a multiple of "
                            "`scaling.num_workers`.")
    micro_batch_size: int | None = Field(
        None, ge=1, description="Pairs per worker per forward; smaller values accumulate gradients over "
        "`batch_size / num_workers / micro_batch_size` forwards per step (it must divide that per-worker batch). "
        "Loss, gradient and metrics stay those of the whole batch. null: `batch_size / num_workers` (one forward).")
    sync_every_micro_batch: bool = Field(
        False, description="When accumulating: false reduce-scatters the gradients once per step (each rank holds "
        "an unsharded fp32 gradient in between); true after every micro-batch (gradients stay sharded: less "
        "memory, more traffic).")
    grad_clip: float = Field(1.0, gt=0, description="Clip the global gradient norm to this.")
    max_consecutive_nonfinite: int = Field(
        5, ge=1, description="Stability guard: a step with a non-finite loss or gradient is skipped; this many in "
        "a row fail the run with advice.")


class ScalingConfig(_Strict):
    """Ray Train workers: each is one FSDP2 rank, on one GPU or on CPU cores."""

    num_workers: int = Field(2, ge=1, description="Ray Train workers (FSDP2 ranks).")
    use_gpu: bool = Field(False, description="One GPU per worker (NCCL); false: CPU workers (gloo).")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs Ray reserves per worker.")
    gpus_per_worker: float = Field(
        1.0, gt=0, description="GPUs Ray reserves per worker, read only with `scaling.use_gpu`: 1, or a fraction "
        "for one-worker sweep trials sharing a GPU.")
    mixed_precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="`auto`: bf16 parameters with fp32 gradient reduction on a GPU with native bf16 "
        "(Ampere and later), fp32 elsewhere (CPU, older GPUs); `bf16`: force it (GPU only); `fp32`: full precision. "
        "The master weights and the export are fp32 either way.")
    max_failures: int = Field(0, ge=-1, description="Worker-group restarts from the latest checkpoint after a "
                              "failure; -1: unlimited.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How Ray places the run's workers over the cluster's nodes (Ray Train's "
        "ScalingConfig.placement_strategy, a placement group strategy): PACK fills as few nodes as fit, SPREAD "
        "puts them on as many nodes as it can, STRICT_* fail to schedule rather than do otherwise.")
    activation_checkpointing: bool = Field(
        False, description="Recompute each decoder block's activations in backward (non-reentrant): a block keeps "
        "only its input between forward and backward.")
    cpu_offload: bool = Field(
        False, description="FSDP2 CPUOffloadPolicy for the policy: its sharded parameters, gradients and AdamW state "
        "live in host memory and AdamW steps on the CPU; each block visits the GPU for its forward and backward.")


class CheckpointConfig(_Strict):
    """Sharded checkpoints (torch.distributed.checkpoint) reported through Ray Train, in `output_dir/<name>/`."""

    every_steps: int = Field(50, ge=1, description="Optimizer steps between checkpoints; the last step is always "
                             "checkpointed.")
    num_to_keep: int = Field(2, ge=1, description="Checkpoints kept; older ones are deleted.")


class ExportConfig(_Strict):
    """The final policy, written to `output_dir/<name>/export` with its tokenizer and a model card (README.md)."""

    lora: Literal["merged", "adapter", "both"] = Field(
        "merged", description="With `model.lora.r` > 0: `merged`, a plain transformers model with the adapters "
        "merged in (`AutoModelForCausalLM.from_pretrained`); `adapter`, a peft adapter directory "
        "(`PeftModel.from_pretrained(base_model, dir)`); `both`, the merged model with the adapter in its "
        "`adapter/` folder. With `iterate.rounds` > 0 every round exports `both` (the next round starts from its "
        "merged model), `adapter` is the rounds' adapters stacked into one over `model.name_or_path`, and `both` is "
        "refused (docs/iterate.md). Ignored without LoRA.")


class TrackingConfig(_Strict):
    """MLflow: the driver opens the run and logs the config as params; rank 0 logs the metrics."""

    mlflow_uri: str | None = Field(None, description="MLflow tracking URI (a server, `sqlite:///…`, `file:…`); "
                                   "null: `sqlite:///<output_dir>/mlflow.db`. Credentials in it are never logged.")
    experiment: str = Field("mdpo-ray", description="MLflow experiment of the run (a sweep uses its own name).")
    log_every_steps: int = Field(10, ge=1, description="Steps between metric logs and `ray.train.report` calls; "
                                 "training metrics are over every pair since the previous log.")
    system_metrics: bool = Field(
        True, description="MLflow's system metrics of rank 0's node (CPU, memory, disk, network; GPU with "
        "nvidia-ml-py), sampled every 10 s as `system/*`; false: none.")
    log_model: bool = Field(
        False, description="Also log the final export as an MLflow transformers model, the run's `model` artifact, "
        "which the Model Registry can register (`mlflow.register_model('runs:/<run id>/model', name)`). It is a "
        "second full copy of the weights in MLflow's artifact store, loaded once into rank 0's memory: meant for "
        "small models. Needs a full export (`export.lora: merged` or `both`, not `adapter`).")


class EvalConfig(_Strict):
    """Held-out evaluation: the pair metrics on `data.eval` and greedy answer accuracy on `data.generation_eval`,
    before training, every `eval.every_steps`, and at the end."""

    every_steps: int | None = Field(
        None, ge=0, description="Steps between evaluations, a multiple of `tracking.log_every_steps`; null: every "
        "fifth of `optim.max_steps`, rounded down to a multiple of `tracking.log_every_steps` (at least one); 0: "
        "before and after training only.")
    batch_size: int = Field(32, ge=1, description="Held-out pairs per forward, per worker.")
    max_new_tokens: int = Field(64, ge=1, description="Greedy decoding length limit for answer accuracy.")
    generation_batch_size: int = Field(128, ge=1, description="Problems decoded together, per worker.")
    max_generation_problems: int | None = Field(None, ge=1, description="Score only the first this many problems "
                                                "of `data.generation_eval`; null: all.")


class StopConfig(_Strict):
    """Stop an unstable run early (a sweep's stopper), checked at every log step; the reason is tagged in MLflow.

    A stopped run is still evaluated, checkpointed and exported, and its MLflow run ends FINISHED with the tag
    `mdpo.stop_reason`."""

    max_nonfinite_steps: int | None = Field(None, ge=1, description="Stop once this many steps were skipped as "
                                            "non-finite in all (`stability/nonfinite_steps`); null: never.")
    max_chosen_drop: float | None = Field(None, gt=0, description="Stop once the mean chosen log-prob drift Δw "
                                          "(`delta_chosen/mean`, nats) falls below minus this; null: never.")


class IterateConfig(_Strict):
    """Iterative on-policy training (issue 25; Iterative RPO, Pang et al. 2024): each round samples completions of
    the training prompts from the current policy, labels them with a verifier, pairs a correct with an incorrect
    completion of the same prompt, and trains one round of the configured loss on those pairs."""

    rounds: int = Field(0, ge=0, description="Rounds of sample, verify, train (docs/iterate.md); 0: a single run on "
                        "`data.train` as it is (no sampling). Each round samples the prompts of `data.train` with "
                        "Ray actors (one per worker, `scaling.*`'s resources), then trains `optim.max_steps` steps "
                        "from the previous round's export, under `output_dir/<name>/iterate/round_<r>/`.")
    samples_per_prompt: int = Field(4, ge=2, description="Completions sampled per training prompt each round; a "
                                    "prompt yields a pair only if at least one is correct and one incorrect.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (full distribution: no top-k, no "
                               "top-p).")
    prompts_per_round: int | None = Field(None, ge=1, description="Training prompts sampled each round, a seeded "
                                          "draw that changes with the round; null: every prompt of `data.train`.")
    reference: Literal["previous", "initial"] = Field(
        "previous", description="The reference of each round: `previous`, the policy the round starts from (Iterative "
        "RPO); `initial`, the starting model throughout.")
    verifier: str | None = Field(
        None, description="`package.module:function` called as function(prompt, completion, row) -> float or bool, "
        "`row` being the training row the prompt came from and `prompt` its prompt as the data holds it (a text, or "
        "conversational data's messages before the answers); a completion is correct when the result is at least "
        "0.5 (True is 1). null: the built-in final-answer check, the integer after the last `####` of the "
        "completion against the row's `answer` (or the integer after `####` in its chosen answer).")

    @field_validator("verifier")
    @classmethod
    def _verifier_imports(cls, value: str | None) -> str | None:
        if value is not None:
            import_function(value)
        return value


def import_function(spec: str) -> Callable:
    """The function a `package.module:function` string names (iterate.verifier); a ValueError that says what is
    wrong (format, import, attribute, not callable), which the config reports under its key."""
    if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", spec):
        raise ValueError(f"{spec!r} is not of the form package.module:function (e.g. my_pkg.checks:is_right)")
    module_name, _, name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001 (any failure of the user's module: ImportError, SyntaxError, its own)
        raise ValueError(f"cannot import {module_name!r} ({type(error).__name__}: {error}); install it or put its "
                         "folder on PYTHONPATH") from None
    function = getattr(module, name, None)
    if not callable(function):  # a ValueError, which pydantic reports under the key (a TypeError it would not)
        raise ValueError(  # noqa: TRY004
            f"{module_name!r} has no function {name!r}" if function is None else
            f"{spec} is not a function (it is a {type(function).__name__} value)")
    return function


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
    for section, keys in (("data", ("train", "eval", "generation_eval")), ("model", ("name_or_path", "tokenizer", "reference"))):
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
    model = out.get("model")
    if isinstance(model, dict) and isinstance(model.get("chat_template"), str):
        out["model"] = model | {"chat_template": _chat_template_source(model["chat_template"], base)}
    builtin = out.get("builtin") or {}
    if isinstance(builtin, dict):
        builtin = dict(builtin)
        builtin["cache_dir"] = str(Path(os.path.expanduser(builtin.get("cache_dir", "~/.cache/mdpo-ray"))).resolve())
        out["builtin"] = builtin
    return out


def is_jinja(text: str) -> bool:
    """model.chat_template: the template itself (Jinja markup) rather than the path of a file holding one."""
    return "{{" in text or "{%" in text


def _chat_template_source(value: str, base: Path) -> str:
    """The template text as given, or its file's absolute path (read by every worker); a ConfigError if it is
    neither, so a typo fails here rather than on each worker."""
    if is_jinja(value):
        return value
    path = base / os.path.expanduser(value)
    try:
        found = path.is_file()
    except (OSError, ValueError):  # e.g. a name too long for the file system: not a path
        found = False
    if not found:
        raise ConfigError(
            f"model.chat_template: {value!r} is neither a Jinja template (it has no {{{{ or {{%) nor a file "
            f"(looked for {path.resolve()}); give the template text or the path of a file holding it")
    return str(path.resolve())


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
