"""The sections a run starts from: the model (and its LoRA adapters), the data, and the built-in task.

`_Strict` is the base of every section (unknown keys refused, values frozen); `BUILTIN` names the built-in task.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mdpo_ray import storage

BUILTIN = "builtin:arith"  # the generated arithmetic task and its SFT-warmed tiny model


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

