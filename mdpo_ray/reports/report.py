"""Sweep report: one table and a few plots from a sweep's MLflow parent run and its trial runs.

Reads only MLflow (the rows come from trials.py), so it works on a finished, running or crashed sweep.
Heatmaps put Δw next to the answer accuracy on purpose: reward accuracy and margins look best
exactly while DPO's answers collapse (docs/metrics.md), so a cell is read across all three.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.colors import Normalize, TwoSlopeNorm
from matplotlib.figure import Figure  # no pyplot: no global backend, PNGs are rendered by Agg
from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

from mdpo_ray.reports.report_html import write_html
from mdpo_ray.reports.trials import TABLE_METRICS, cell_means, trial_frame, trial_runs
from mdpo_ray.tracking import labels
from mdpo_ray.tracking.mlflow_runs import BEST_TRIAL_TAG, METRIC_TAG, MODE_TAG, SEARCH_KEYS_TAG, SWEEP_TAG

# (file, title, metrics tried in order, colormap, centred on 0). Eval numbers first: they are over
# held-out pairs at the last step, the training ones over the last logging window only.
HEATMAPS = (
    ("heatmap_answer_accuracy.png", "answer accuracy", ("eval/answer_accuracy",), "viridis", False),
    ("heatmap_reward_margin.png", "reward margin β·mean(Δw − Δl)", ("eval/rewards/margins", "rewards/margins"),
     "viridis", False),
    # Red is Δw < 0: the chosen answer pushed below the reference, the failure MinorDPO targets.
    ("heatmap_chosen_drift.png", "chosen log-prob drift Δw", ("eval/delta_chosen/mean", "delta_chosen/mean"),
     "RdBu", True),
)


@dataclass(frozen=True)
class SweepReport:
    out_dir: Path
    csv_path: Path
    markdown_path: Path
    html_path: Path  # the same report as one self-contained page: what to open in the MLflow UI
    table_path: Path  # trials.csv as an MLflow table (JSON), shown by the UI's artifact view as a table
    plots: list[Path]
    best_trial_id: str | None  # best FINISHED trial by the final value of the sweep metric, else None
    best_run_id: str | None  # its MLflow run
    best_value: float | None
    n_trials: int


def write_report(tracking_uri: str, parent_run_id: str, out_dir: Path, *, attach: bool = True) -> SweepReport:
    """Write trials.csv, trials.json, trials.md, trials.html and the PNGs into out_dir; with attach, log them to
    the parent under report/, mark trials.json as an MLflow table, and give the parent the best trial's final metrics and a link to it (tag mdpo.best_trial, its description)."""
    client = MlflowClient(tracking_uri=tracking_uri)
    parent = client.get_run(parent_run_id)
    tags = parent.data.tags
    sweep_name = tags.get(SWEEP_TAG, parent_run_id)
    metric, mode = tags.get(METRIC_TAG), tags.get(MODE_TAG)
    if not metric or mode not in ("max", "min"):
        raise ValueError(f"run {parent_run_id} is not a sweep parent: it needs tags {METRIC_TAG} and "
                         f"{MODE_TAG}=max|min (has {METRIC_TAG}={metric!r}, {MODE_TAG}={mode!r})")
    keys = [k.strip() for k in tags.get(SEARCH_KEYS_TAG, "").split(",") if k.strip()]
    children = trial_runs(client, parent.info.experiment_id, parent_run_id)
    if not children:
        raise ValueError(f"sweep {sweep_name!r} (parent run {parent_run_id}) has no trial runs yet")

    frame = trial_frame(client, children, keys, metric, mode)
    ranked = frame[(frame["status"] == "FINISHED") & frame[metric].notna()]
    best = ranked.iloc[0] if len(ranked) else None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = ["trial_id", "run_name", "status", "stop_reason", *keys, metric, f"{metric} (best)", f"{metric} step",
               *[m for m in TABLE_METRICS if m != metric]]
    csv_path = out_dir / "trials.csv"
    frame[columns].to_csv(csv_path, index=False)
    table_path = out_dir / "trials.json"
    # The layout MlflowClient.log_table writes. Not log_table itself: it appends to an existing file,
    # so `mdpo-ray report` after the sweep's own report would list every trial twice.
    frame[columns].to_json(table_path, orient="split", index=False, date_format="iso")
    plots = [p for p in (_heatmap(frame, keys, spec, out_dir) for spec in HEATMAPS) if p is not None]
    curves = _logps_curves(client, frame, keys, None if best is None else best["trial_id"], out_dir)
    plots += [curves] if curves is not None else []
    markdown_path = out_dir / "trials.md"
    markdown_path.write_text(_markdown(sweep_name, parent_run_id, metric, mode, keys, frame[columns], best, plots))
    html_path = write_html(out_dir / "trials.html", sweep_name, parent_run_id, metric, mode, keys, frame[columns],
                           best, plots, _fmt)
    if attach:
        client.log_artifacts(parent_run_id, str(out_dir), "report")
        _mark_table(client, parent, "report/trials.json")
        if best is not None:
            _record_best(client, parent, best, metric)
    return SweepReport(out_dir=out_dir, csv_path=csv_path, markdown_path=markdown_path, html_path=html_path,
                       table_path=table_path, plots=plots,
                       best_trial_id=None if best is None else str(best["trial_id"]),
                       best_run_id=None if best is None else str(best["run_id"]),
                       best_value=None if best is None else float(best[metric]), n_trials=len(frame))


def _mark_table(client: MlflowClient, parent, artifact: str) -> None:
    """Tag the artifact as a table the way log_table does: the artifact view then offers "view as table"
    (sortable, paged) and MlflowClient.load_table finds it."""
    logged = json.loads(parent.data.tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]"))
    entry = {"path": artifact, "type": "table"}
    if entry not in logged:
        client.set_tag(parent.info.run_id, MLFLOW_LOGGED_ARTIFACTS, json.dumps(logged + [entry]))


def _record_best(client: MlflowClient, parent, best, metric: str) -> None:
    """The parent run shows the sweep's outcome in the runs table: the best trial's final metrics (system
    metrics aside) at its final step, its run id as tag mdpo.best_trial, and a link in the description."""
    run = client.get_run(best["run_id"])
    now, step = int(time.time() * 1000), int(best[f"{metric} step"])
    metrics = [Metric(key, value, now, step) for key, value in run.data.metrics.items() if not key.startswith("system/")]
    url = f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    note = labels.best_trial_note(parent.data.tags.get(labels.NOTE_TAG, ""), run.info.run_name, url, metric,
                                  float(best[metric]))
    client.log_batch(parent.info.run_id, metrics=metrics[:1000],
                     tags=[RunTag(BEST_TRIAL_TAG, run.info.run_id), RunTag(labels.NOTE_TAG, note)])


def _fmt(value) -> str:
    if isinstance(value, float) and math.isnan(value):
        return ""
    if isinstance(value, (float, int, np.floating, np.integer)) and not isinstance(value, bool):
        return f"{value:.4g}"
    return str(value)


def _heatmap(frame: pd.DataFrame, keys: list[str], spec: tuple, out_dir: Path) -> Path | None:
    filename, title, candidates, cmap_name, centred = spec
    # Only FINISHED trials reached their last eval: a FAILED one, or one KILLED by ASHA or an
    # interrupted driver, holds its step-0 eval, which no training produced.
    finished = frame[frame["status"] == "FINISHED"]
    metric = next((m for m in candidates if finished[m].notna().any()), None)
    if not keys or metric is None:
        return None
    xs, ys, means, counts = cell_means(finished, keys, metric)
    if not xs:
        return None
    fig = Figure(figsize=(max(4.5, 1.1 * len(xs) + 2.8), max(2.6, 0.75 * len(ys) + 2.0)), layout="constrained")
    ax = fig.subplots()
    cmap = colormaps[cmap_name].with_extremes(bad="0.85")
    low, high = np.nanmin(means), np.nanmax(means)
    if centred:
        span = max(abs(low), abs(high)) or 1.0
        norm = TwoSlopeNorm(0.0, -span, span)
    else:
        norm = Normalize(low, high if high > low else low + 1e-9)
    image = ax.imshow(np.ma.masked_invalid(means), cmap=cmap, norm=norm, origin="lower", aspect="auto")
    fig.colorbar(image, ax=ax, label=metric)
    ax.set_xticks(range(len(xs)), [_fmt(x) for x in xs], rotation=45 if len(xs) > 6 else 0)
    ax.set_xlabel(keys[0])
    if len(keys) > 1:
        ax.set_yticks(range(len(ys)), [_fmt(y) for y in ys])
        ax.set_ylabel(keys[1])
    else:
        ax.set_yticks([])
    several = counts.max() > 1
    ax.set_title(f"final {title}\n{metric}, finished trials" + (", mean per cell" if several else ""), fontsize=10)
    if len(xs) <= 15 and len(ys) <= 15:
        for i in range(len(ys)):
            for j in range(len(xs)):
                if counts[i, j] == 0:
                    ax.text(j, i, "n/a", ha="center", va="center", fontsize=9, color="0.4")
                    continue
                r, g, b, _ = cmap(norm(means[i, j]))
                label = f"{means[i, j]:.3g}" + (f"\n(n={counts[i, j]})" if several else "")
                ax.text(j, i, label, ha="center", va="center", fontsize=9,
                        color="white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black")
    path = out_dir / filename
    fig.savefig(path, dpi=120)
    return path


def _labels(frame: pd.DataFrame, keys: list[str]) -> list[str]:
    """'beta=0.3, reject_threshold=0' per trial: last key segment, unless two keys share it."""
    short = [k.rsplit(".", 1)[-1] for k in keys]
    names = short if len(set(short)) == len(short) else keys
    labels = [", ".join(f"{n}={_fmt(row[k])}" for n, k in zip(names, keys)) for _, row in frame.iterrows()]
    # Repeats of one point (seeds, num_samples) would share a label: the trial id's counter tells them apart.
    return [f"{label} #{trial.rsplit('_', 1)[-1]}" if not label or labels.count(label) > 1 else label
            for label, trial in zip(labels, frame["trial_id"])]


def _logps_curves(client: MlflowClient, frame: pd.DataFrame, keys: list[str], best_trial: str | None,
                  out_dir: Path) -> Path | None:
    panels = ("logps/chosen", "logps/rejected")
    histories = {m: [sorted((p.step, p.value) for p in client.get_metric_history(r, m)) for r in frame["run_id"]]
                 for m in panels}
    if not any(h for m in panels for h in histories[m]):
        return None
    fig = Figure(figsize=(11, 4.8), layout="constrained")
    axes = fig.subplots(1, 2, sharex=True)
    colors = colormaps["tab10" if len(frame) <= 10 else "tab20" if len(frame) <= 20 else "viridis"]
    legend = len(frame) <= 20  # beyond that only the best trial is named
    for i, (label, trial, status) in enumerate(zip(_labels(frame, keys), frame["trial_id"], frame["status"])):
        is_best = trial == best_trial
        color = colors(i % 20) if legend else "black" if is_best else colors(i / max(len(frame) - 1, 1))
        name = label + (" (best)" if is_best else "") + ("" if status == "FINISHED" else f" [{status}]")
        for ax, metric in zip(axes, panels):
            if histories[metric][i]:
                steps, values = zip(*histories[metric][i])
                ax.plot(steps, values, color=color, lw=2.6 if is_best else 1.3, alpha=1 if legend or is_best else 0.5,
                        ls="-" if status == "FINISHED" else "--", marker="o" if len(steps) == 1 else None,
                        label=name if legend or is_best else "_nolegend_", zorder=3 if is_best else 2)
    for ax, metric in zip(axes, panels):
        ax.set_title(f"{metric}: policy log-prob of the {metric.split('/')[1]} answer")
        ax.set_xlabel("step")
        ax.set_ylabel("mean log-prob (summed over tokens)")
        ax.grid(alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    if not handles:
        handles, names = axes[1].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="outside lower center", ncols=min(len(handles), 3), fontsize=8)
    path = out_dir / "logps_curves.png"
    fig.savefig(path, dpi=110)
    return path


def _markdown(sweep_name: str, parent_run_id: str, metric: str, mode: str, keys: list[str], table: pd.DataFrame,
              best, plots: list[Path]) -> str:
    counts = ", ".join(f"{n} {s.lower()}" for s, n in table["status"].value_counts().items())
    lines = [f"# Sweep `{sweep_name}`", "",
             f"Parent run `{parent_run_id}`; {len(table)} trials ({counts}); metric `{metric}` ({mode}).", ""]
    if best is None:
        lines.append(f"No FINISHED trial has logged `{metric}` yet.")
    else:
        overrides = ", ".join(f"`{k}={_fmt(best[k])}`" for k in keys) or "no overrides"
        lines.append(f"**Best trial: `{best['trial_id']}`** ({best['run_name']}): `{metric}` = {_fmt(best[metric])}"
                     f" with {overrides}.")
    lines += ["", "Rows are sorted by the final value of the metric, best first; empty cells were not logged.", "",
              "| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(_fmt(v).replace("|", "\\|") for v in row) + " |" for row in table.itertuples(index=False)]
    lines += [""] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"
