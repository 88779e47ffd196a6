"""What a run says it is in the MLflow UI: its one-line description, its source, a sweep trial's name.

Pure functions of the config (and, for the source, of the command line and the git checkout); the
tracking module writes them as MLflow's own tags, which the UI shows: `mlflow.note.content` as the
run's description, `mlflow.source.*` in its Source column, `mlflow.runName` as its name.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

from mdpo_ray.config import BUILTIN, LossConfig, RunConfig

NOTE_TAG = "mlflow.note.content"
RUN_NAME_TAG = "mlflow.runName"  # the name the UI shows; setting it renames the run
SOURCE_NAME_TAG, SOURCE_TYPE_TAG, GIT_COMMIT_TAG = "mlflow.source.name", "mlflow.source.type", "mlflow.source.git.commit"
MAX_RUN_NAME = 250  # MLflow's runs.name column is VARCHAR(250)

# Each loss's knobs, as docs/losses.md's table writes them: (symbol, LossConfig field).
LOSS_KNOBS = {
    "minor_dpo": (("β", "beta"), ("τ", "reject_threshold"), ("w", "reject_weight")),
    "dpo": (("β", "beta"),),
    "dpop": (("β", "beta"), ("λ", "dpop_lambda")),
    "ipo": (("β", "beta"),),
    "robust": (("β", "beta"), ("ε", "label_smoothing")),
    "hinge": (("β", "beta"),),
    "sft": (),
}
# Short names for a trial's overrides: "minor_dpo b=0.1 tau=-1 lr=3e-5"; any other key by its last segment.
SHORT_KEYS = {"loss.beta": "b", "loss.reject_threshold": "tau", "loss.reject_weight": "w", "loss.dpop_lambda": "lambda",
              "loss.label_smoothing": "eps", "loss.nll_weight": "nll", "optim.lr": "lr"}


def describe_loss(loss: LossConfig) -> str:
    """'minor_dpo β=0.1 τ=0 w=1' (length-averaged log-probs and an NLL term said when on: '+ nll 1')."""
    knobs = " ".join(f"{symbol}={getattr(loss, field):g}" for symbol, field in LOSS_KNOBS[loss.name])
    nll = f"+ nll {loss.nll_weight:g}" if loss.nll_weight else ""
    return " ".join(filter(None, (loss.name, knobs, nll, "avg-logp" if loss.average_log_prob else "")))


def run_description(cfg: RunConfig) -> str:
    """One line: loss and knobs, optimizer, model, data, length and scale of the run."""
    optim, scaling = cfg.optim, cfg.scaling
    lora = f" + LoRA r={cfg.model.lora.r}" if cfg.model.lora.r else ""
    data = _shown(cfg, cfg.data.train)
    if data == BUILTIN:
        data += f" ({cfg.builtin.rejected_kind} rejected)"
    return (f"{describe_loss(cfg.loss)} · lr {optim.lr:g} ({optim.schedule}, warm-up {optim.warmup_steps}) · "
            f"model {_shown(cfg, cfg.model.name_or_path)}{lora} · data {data} · {optim.max_steps} steps × "
            f"{optim.batch_size} pairs · {scaling.num_workers} {'GPU' if scaling.use_gpu else 'CPU'} "
            f"worker{'s' if scaling.num_workers > 1 else ''} · seed {cfg.seed}")


def _shown(cfg: RunConfig, location: str) -> str:
    """A model or data location as a reader knows it: builtin:arith for the built-in task's cached files
    (launch resolves them to paths), a local path by its last component, a hub id as it is."""
    path = Path(location)
    if not path.is_absolute():
        return location
    if path.is_relative_to(cfg.builtin.cache_dir):
        return BUILTIN
    return path.name


def trial_run_name(loss_name: str, overrides: dict[str, Any], *, rounds: int = 0) -> str:
    """A sweep trial's run name from its overrides: 'minor_dpo b=0.1 tau=-1 lr=3e-05' (the loss first,
    swept or not), an iterate trial's rounds said even when not swept ('sft seed=1 rounds=3'); cut to MLflow's
    limit."""
    parts = [str(overrides.get("loss.name", loss_name))]
    parts += [f"{SHORT_KEYS.get(key, key.rsplit('.', 1)[-1])}={_value(value)}"
              for key, value in overrides.items() if key != "loss.name"]
    parts += [f"rounds={rounds}"] if rounds and "iterate.rounds" not in overrides else []
    return " ".join(parts)[:MAX_RUN_NAME]


def _value(value: Any) -> str:
    """3 significant digits, exponents unpadded: 3e-05 -> 3e-5."""
    return re.sub(r"e([+-])0*(\d)", r"e\1\2", f"{value:.3g}") if isinstance(value, float) else str(value)


def sweep_description(name: str, search_keys: list[str], metric: str, mode: str) -> str:
    return (f"Sweep `{name}` over {' × '.join(f'`{k}`' for k in search_keys)}; metric `{metric}` ({mode}). "
            "Its trials are the child runs, named by their overrides.")


def best_trial_note(note: str, best_name: str, best_url: str, metric: str, value: float) -> str:
    """The sweep's description with its best trial linked (replacing an earlier best line)."""
    head = note.split("\n\n**Best trial**")[0]
    return f"{head}\n\n**Best trial**: [{best_name}]({best_url}), `{metric}` = {value:.4g}"


def source_tags(argv: list[str], cwd: Path | None = None) -> dict[str, str]:
    """mlflow.source.* of the command that runs: its command line (`argv` as sys.argv, redacted by the
    caller) and the git commit of the working directory when it is a git checkout (else no commit tag)."""
    program = Path(argv[0]).name
    program = "mdpo-ray" if program == "__main__.py" else program  # python -m mdpo_ray: the same command
    # JOB, not LOCAL: the UI shows a LOCAL source as a file, by what follows its last '/', so any path in
    # the command line cut it ("problems.jsonl --set ..."); a JOB source (without Databricks job ids) it
    # shows whole.
    tags = {SOURCE_NAME_TAG: " ".join([program, *argv[1:]])[:500], SOURCE_TYPE_TAG: "JOB"}
    commit = git_commit(cwd or Path.cwd())
    if commit:
        tags[GIT_COMMIT_TAG] = commit
    return tags


def git_commit(directory: Path) -> str | None:
    """HEAD of the git checkout holding `directory`; None outside one (or without git)."""
    try:
        found = subprocess.run(["git", "-C", str(directory), "rev-parse", "HEAD"], capture_output=True, text=True,
                               timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = found.stdout.strip()
    return commit if found.returncode == 0 and len(commit) == 40 else None
