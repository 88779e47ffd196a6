"""The model card (README.md) of an exported model: what it was trained from, with which loss and knobs, on
which data, for how long, how it scored on the held-out sets, and which MLflow run holds the rest.

Written with huggingface_hub's ModelCard, so its YAML front matter is what the Hub reads (library_name,
base_model, tags); a local base model or data file is named in the text only, since the Hub checks
those fields against its own repositories.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

import mdpo_ray
from mdpo_ray.config import RunConfig
from mdpo_ray.tracking.labels import LOSS_KNOBS
from mdpo_ray.tracking.sinks import shown_uri
from mdpo_ray.training.metrics import EVAL_PREFIX, GLOSSARY, PAIR_METRICS

TAGS = ["mdpo-ray", "minor-dpo", "dpo"]
CARD_FILE = "README.md"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # "name" or "org/name"
_FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".arrow", ".txt")
# The symbols of LOSS_KNOBS, for the loss this platform is about; the others are named (training/losses.py).
_MINOR_DPO = "−log σ(β(Δw − w·max(τ, Δl))), Δ = log π − log π_ref of the chosen (w) and rejected (l) answer"


@dataclass
class RunFacts:
    """What the loop knows at export time beyond the config."""

    steps: int  # optimizer steps done
    data_counts: list[tuple[str, str, dict[str, int]]]  # (split, source, DataStats.counts()) per source read
    n_train_pairs: int
    n_eval_pairs: int
    n_problems: int  # generation-eval problems
    before: dict[str, float] = field(default_factory=dict)  # held-out metrics before training
    after: dict[str, float] = field(default_factory=dict)  # ... at the last step
    mlflow_run_id: str | None = None
    stop_reason: str | None = None


def write_model_card(out_dir: Path, cfg: RunConfig, facts: RunFacts) -> Path:
    """README.md in `out_dir` (replacing the stub peft writes beside an adapter)."""
    adapter = cfg.model.lora.r > 0 and cfg.export.lora == "adapter"
    metadata = ModelCardData(
        library_name="peft" if adapter else "transformers",
        base_model=_hub_id(cfg.model.name_or_path),
        datasets=[d for d in (_hub_id(cfg.data.train), _hub_id(cfg.data.eval or "")) if d] or None,
        tags=TAGS, pipeline_tag="text-generation")
    card = ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n{_body(out_dir, cfg, facts, adapter)}")
    path = out_dir / CARD_FILE
    card.save(path)
    return path


def _body(out_dir: Path, cfg: RunConfig, facts: RunFacts, adapter: bool) -> str:
    loss, optim = cfg.loss, cfg.optim
    knobs = [f"{symbol} (`loss.{name}`) = {getattr(loss, name):g}" for symbol, name in LOSS_KNOBS[loss.name]]
    stopped = f", stopped early: {facts.stop_reason}" if facts.stop_reason else ""
    lora = (f"LoRA r={cfg.model.lora.r}, alpha={cfg.model.lora.alpha:g}, exported "
            f"{'as a peft adapter' if adapter else 'merged into the weights'}"
            if cfg.model.lora.r else "full fine-tuning")
    lines = [
        f"# {cfg.name}",
        "",
        f"Preference-trained from {_origin(cfg, cfg.model.name_or_path)} with mdpo-ray {mdpo_ray.__version__}.",
        "",
        "## Training",
        "",
        "| | |",
        "|---|---|",
        f"| loss | `{loss.name}`{': ' + _MINOR_DPO if loss.name == 'minor_dpo' else ''} |",
        (f"| knobs | {', '.join(knobs) or 'none'}"
        f"{'; length-averaged log-probs' if loss.average_log_prob else ''} |"),
        f"| steps | {facts.steps} of `optim.max_steps` = {optim.max_steps}{stopped} |",
        f"| batch | {optim.batch_size} pairs per step ({facts.steps * optim.batch_size} pairs seen) |",
        f"| learning rate | {optim.lr:g} (AdamW, {optim.schedule} after {optim.warmup_steps} warm-up steps) |",
        f"| adapters | {lora} |",
        (f"| workers | {cfg.scaling.num_workers} × {'GPU' if cfg.scaling.use_gpu else 'CPU'}, "
        f"mixed precision `{cfg.scaling.mixed_precision}`, seed {cfg.seed} |"),
        "",
        "## Data",
        "",
        "| split | source | rows | kept | bad rows | prompt too long | truncated |",
        "|---|---|---|---|---|---|---|",
        *(f"| {split} | {_origin(cfg, source)} | {c['rows']} | {c['kept']} | {c['bad_rows']} | "
          f"{c['prompt_too_long']} | {c['truncated']} |" for split, source, c in facts.data_counts),
        "",
        f"Trained on {facts.n_train_pairs} pairs; evaluated on {facts.n_eval_pairs} held-out pairs"
        + (f" (held out from the training data, `data.eval_fraction` = {cfg.data.eval_fraction:g})"
           if cfg.data.eval is None and cfg.data.eval_fraction else "")
        + (f" and {facts.n_problems} problems of {_origin(cfg, cfg.data.generation_eval)} (greedy answer accuracy)"
           if cfg.data.generation_eval else "") + ".",
        "",
        *_results(facts),
        "## Tracking",
        "",
        (f"MLflow run `{facts.mlflow_run_id}` in experiment `{cfg.tracking.experiment}` at "
         f"`{shown_uri(cfg.mlflow_uri)}`: every metric, the full config (params and `config.yaml`)."
         if facts.mlflow_run_id else "Not tracked: MLflow was unreachable when the run started."),
        "",
        "## Use",
        "",
        f"Written to `{out_dir}` (the run's MLflow tag `mdpo.export_path`); load it from wherever it lies now:",
        "",
        "```python",
        *(["from peft import AutoPeftModelForCausalLM  # loads the base model, then the adapter", "",
           'model = AutoPeftModelForCausalLM.from_pretrained("path/to/this/directory")'] if adapter else
          ["from transformers import AutoModelForCausalLM", "",
           'model = AutoModelForCausalLM.from_pretrained("path/to/this/directory")']),
        "```",
        "",
    ]
    return "\n".join(lines)


def _results(facts: RunFacts) -> list[str]:
    order = [m.name for m in GLOSSARY if m.kind == "eval"] + [EVAL_PREFIX + name for name in PAIR_METRICS]
    names = [name for name in order if name in facts.before or name in facts.after]
    if not names:
        return ["No held-out evaluation in this session (see the MLflow run).", ""]
    cell = lambda values, name: f"{values[name]:.4g}" if name in values else "—"
    return ["## Held-out results", "", "Before training and at the last step (docs/metrics.md defines each).", "",
            "| metric | before | after |", "|---|---|---|",
            *(f"| `{name}` | {cell(facts.before, name)} | {cell(facts.after, name)} |" for name in names), ""]


def _origin(cfg: RunConfig, location: str) -> str:
    """A model or data location as the reader should see it: the built-in task's cached files by name."""
    if Path(location).is_absolute() and Path(location).is_relative_to(cfg.builtin.cache_dir):
        return f"the built-in arithmetic task (`builtin:arith`, `{location}`)"
    return f"`{shown_uri(location)}`"


def _hub_id(location: str) -> str | None:
    """`location` if it names a Hub repository (the front matter must name one), None for a local path or file."""
    if not location or Path(location).is_absolute() or location.lower().endswith(_FILE_SUFFIXES):
        return None
    return location if _HUB_ID.fullmatch(location) else None
