"""A sweep's trials read back from MLflow: one row per trial run under the sweep's parent run.

Reads only MLflow, so it works on a finished, running or crashed sweep, from any machine that can
reach the tracking server. The sweep driver's conventions it relies on are the tag names it imports.
The sweep report (report.py) and the evidence page (results.py) are both built on these rows.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from mdpo_ray.tracking.mlflow_runs import OVERRIDE_PREFIX, ROLE_TAG, STOP_REASON_TAG, SWEEP_TAG, TRIAL_TAG

TABLE_METRICS = (
    "eval/answer_accuracy", "eval/rewards/accuracies", "eval/rewards/margins", "eval/delta_chosen/mean",
    "eval/delta_rejected/mean", "rewards/margins", "logps/chosen", "logps/rejected", "stability/nonfinite_steps",
)
_EXTRA_METRICS = ("delta_chosen/mean",)  # only a heatmap fallback, not a table column


def find_sweep_parent(tracking_uri: str, experiment: str, sweep_name: str) -> str:
    """The newest parent run of the sweep called `sweep_name` in `experiment`."""
    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ValueError(f"no MLflow experiment {experiment!r} at {tracking_uri}")
    runs = client.search_runs(
        [found.experiment_id],
        filter_string=f"tags.`{SWEEP_TAG}` = '{sweep_name}' and tags.`{ROLE_TAG}` = 'sweep'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        raise ValueError(f"no sweep named {sweep_name!r} in experiment {experiment!r} at {tracking_uri} "
                         f"(looked for a run tagged {SWEEP_TAG}={sweep_name}, {ROLE_TAG}=sweep)")
    return runs[0].info.run_id


def trial_runs(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'",
                                  max_results=1000, page_token=token)
        runs += page
        token = page.token
        if not token:
            return runs


def _parse(value: str | None) -> float | str:
    """Override tags hold str(value): numbers come back as floats, anything else stays a string."""
    if value is None:
        return math.nan
    try:
        return float(value)
    except ValueError:
        return value


def trial_frame(client: MlflowClient, runs: list, keys: list[str], metric: str, mode: str) -> pd.DataFrame:
    rows = []
    for run in runs:
        tags, latest = run.data.tags, run.data.metrics  # MLflow keeps each metric's value at its latest step
        history = client.get_metric_history(run.info.run_id, metric)
        values = [m.value for m in history if not math.isnan(m.value)]
        row = {
            "run_id": run.info.run_id,
            "trial_id": tags.get(TRIAL_TAG, run.info.run_id),
            "run_name": run.info.run_name,  # as the MLflow UI names the trial: by its overrides
            "status": run.info.status,
            "stop_reason": tags.get(STOP_REASON_TAG, ""),
            **{key: _parse(tags.get(OVERRIDE_PREFIX + key)) for key in keys},
            f"{metric} (best)": (max if mode == "max" else min)(values) if values else math.nan,
            # An early-stopped or failed trial's "final" eval may be its step-0 one; the step says so.
            f"{metric} step": max((m.step for m in history), default=math.nan),
        }
        row.update({m: latest.get(m, math.nan) for m in (metric, *TABLE_METRICS, *_EXTRA_METRICS)})
        rows.append(row)
    # Trial id first so ties keep a stable order; NaN sorts last in both modes.
    frame = pd.DataFrame(rows).sort_values("trial_id", kind="stable")
    return frame.sort_values(metric, ascending=mode == "min", na_position="last", kind="stable").reset_index(drop=True)


def _ordered(values) -> list:
    values = list(values)
    numeric = all(isinstance(v, (float, int)) for v in values)
    return sorted(values) if numeric else sorted(values, key=str)


def cell_means(frame: pd.DataFrame, keys: list[str], value: str) -> tuple[list, list, np.ndarray, np.ndarray]:
    """(x values, y values, means (Y, X), counts (Y, X)) of `value` over keys[0] x keys[1].

    One key gives a single row (y values [None]). Trials differing only in a third searched key or
    in the seed share a cell, which shows their mean.
    """
    data = frame.dropna(subset=[value, *keys[:2]])
    xs = _ordered(data[keys[0]].unique())
    ys = _ordered(data[keys[1]].unique()) if len(keys) > 1 else [None]
    means, counts = np.full((len(ys), len(xs)), np.nan), np.zeros((len(ys), len(xs)), dtype=int)
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            cell = data[(data[keys[0]] == x) & ((data[keys[1]] == y) if y is not None else True)][value]
            counts[i, j] = len(cell)
            if len(cell):
                means[i, j] = cell.mean()
    return xs, ys, means, counts
