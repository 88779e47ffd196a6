"""The sections of how a run trains and what it writes: the loss, AdamW and the batch, the Ray workers,
checkpoints, the export, MLflow, evaluation, early stopping and iterate rounds (with the verifier's import)."""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Literal

from pydantic import Field, field_validator

from mdpo_ray.config.model_data import _Strict


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
    micro_batch_tokens: int | None = Field(
        None, ge=2, description="Tokens per worker per forward, in place of a fixed `optim.micro_batch_size`: each "
        "worker runs its pairs of a step, in order, in forwards of at most this many tokens (a packed forward counts "
        "its sequences' tokens, a padded one its rows times its width). Activation memory is then bounded by it "
        "whatever the lengths, and short pairs share a forward where long ones would not. At least "
        "2 x `data.max_length`, since a pair's two sequences run in one forward. Loss, gradient and metrics stay "
        "those of the whole batch. null: `optim.micro_batch_size`.")
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
    activation_checkpointing: bool | Literal["selective"] = Field(
        False, description="Recompute each decoder block's activations in backward (non-reentrant): `true` keeps "
        "only a block's input between forward and backward (its whole forward runs again); `selective` also keeps "
        "what its matmuls and attention return and recomputes only the cheap ops between them (norms, rotary "
        "embeddings, activation functions): less memory saved, little compute added.")
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

