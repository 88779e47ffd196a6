"""The Ray Tune boundary: a thin driver that runs one `launch.train` per trial.

It reads each trial's data once, needs MLflow up, builds each built-in task (and, with `reference: precompute`,
each reference table) once, opens the sweep's parent MLflow run, fits the Tuner (or restores it with `--resume`),
closes unfinished trial runs and writes the report. What one trial runs, and the resources, concurrency and
Tune config it is given, are in sweep_trial.py.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from ray import tune

from mdpo_ray import cluster, launch, storage
from mdpo_ray.config import ConfigError, RunConfig
from mdpo_ray.reports.report import SweepReport, write_report
from mdpo_ray.sweep_config import SweepConfig, flat_overrides, trial_config
from mdpo_ray.sweep_trial import (
    _check_fits_locally,
    _in_trial,
    _max_concurrent,
    _max_reports,
    _trial,
    _trial_cpus,
    _tune_config,
)
from mdpo_ray.tracking import labels, mlflow_runs, sinks

# Search keys that change the reference log-probs: with none of them swept, trials share one table.
# LoRA's do not: the reference is the base model.
_REFERENCE_KEYS = ("model.", "data.", "builtin.", "loss.average_log_prob", "seed")
_NOT_REFERENCE_KEYS = ("model.lora.",)


@dataclass(frozen=True)
class SweepSummary:
    sweep: SweepConfig
    parent_run_id: str
    mlflow_uri: str
    experiment: str
    best_trial: str | None
    best_value: float | None
    report: SweepReport | None  # None: MLflow was unreachable at the end (said; `mdpo-ray report` writes it)
    n_trials: int
    unfinished: int  # trials left unfinished by an interruption: `--resume` continues them


def _domain(domain) -> Any:
    if domain.grid is not None:
        return tune.grid_search(domain.grid)
    if domain.choice is not None:
        return tune.choice(domain.choice)
    if domain.uniform is not None:
        return tune.uniform(*domain.uniform)
    return tune.loguniform(*domain.loguniform)


def shared_run_keys(sweep: SweepConfig, base: dict[str, Any]) -> dict[str, Any]:
    """Keys every trial gets: one output dir, one MLflow store and experiment (named after the sweep)."""
    cfg = trial_config(base, {})
    experiment = (base.get("tracking") or {}).get("experiment", sweep.name)
    return {"output_dir": storage.join(cfg.output_dir, sweep.name), "tracking.mlflow_uri": cfg.mlflow_uri,
            "tracking.experiment": experiment}


def _reference_configs(sweep: SweepConfig, base: dict[str, Any], shared: dict[str, Any]) -> list[RunConfig]:
    """One trial config per distinct reference (model + data) the trials will use, when the space names
    them all up front (grid or choice values); [] when a range over a reference key leaves each trial
    to compute its own."""
    fixed = {k: d.probe_values()[0] for k, d in sweep.space.items()}
    varying: dict[str, list[Any]] = {}
    for key, domain in sweep.space.items():
        values = domain.probe_values()
        if any(k.startswith(_REFERENCE_KEYS) and not k.startswith(_NOT_REFERENCE_KEYS)
               for v in values for k in flat_overrides({key: v})):
            if domain.grid is None and domain.choice is None:
                return []
            varying[key] = values
    configs: dict[str, RunConfig] = {}
    for combo in itertools.product(*varying.values()):
        cfg = trial_config(base, fixed | dict(zip(varying, combo)) | shared | {"name": sweep.name})
        # The run seed only reaches the data through a held-out split (data.eval_fraction).
        identity = (cfg.model, cfg.data, cfg.builtin, cfg.loss.average_log_prob,
                    cfg.seed if cfg.data.eval_fraction else None)
        configs.setdefault(repr(identity), cfg)
    return list(configs.values())



def run_sweep(sweep: SweepConfig, base: dict[str, Any], *, resume: bool = False) -> SweepSummary:
    shared = shared_run_keys(sweep, base)
    first = trial_config(base, {k: d.probe_values()[0] for k, d in sweep.space.items()} | shared | {"name": sweep.name})
    tune_dir = storage.join(first.output_dir, "tune")  # a path, or a URI Tune writes to through pyarrow.fs
    experiment_dir = storage.join(tune_dir, sweep.name)
    tune_path, filesystem = storage.for_ray(tune_dir)  # an S3 URI as its bucket/key path on the run's own client
    ray_experiment_dir = storage.for_ray(experiment_dir)[0]
    if resume and not tune.Tuner.can_restore(ray_experiment_dir, storage_filesystem=filesystem):
        raise ConfigError(f"nothing to resume: no sweep {sweep.name!r} under {tune_dir}")
    if not resume and storage.exists(experiment_dir):
        raise ConfigError(f"sweep {sweep.name!r} already exists under {tune_dir}: pass --resume to continue it, "
                          "or give the sweep a new name")
    # Build the built-in task once here (trials would wait on its lock) and, if no trial changes the
    # reference, its log-probs once for all trials.
    in_trial = _in_trial(sweep, first)
    references = _reference_configs(sweep, base, shared)
    checked = set()
    for cfg in (first, *references):  # each trial's data, read once before MLflow, Ray or Tune is asked for anything
        if (data := repr((cfg.data, cfg.model.tokenizer or cfg.model.name_or_path))) not in checked:
            checked.add(data)
            launch.check_data(cfg)
    mlflow_runs.require_reachable(first, "a sweep records its trials there and its report reads them back; nothing "
                                      "has started")
    if cluster.init_ray(use_gpu=first.scaling.use_gpu):
        _check_fits_locally(first, in_trial)
    for cfg in references:  # every kind of built-in data the grid names, each built once, here
        launch.resolve_builtin(cfg)
    first = launch.resolve_builtin(first)
    source = mlflow_runs.source_tags()
    parent_run_id = mlflow_runs.open_sweep_run(first, sweep.name, tags=source | {
        mlflow_runs.SEARCH_KEYS_TAG: ",".join(sweep.search_keys()), mlflow_runs.METRIC_TAG: sweep.metric,
        mlflow_runs.MODE_TAG: sweep.mode,
        labels.NOTE_TAG: labels.sweep_description(sweep.name, sweep.search_keys(), sweep.metric, sweep.mode)},
        params=sweep.space_params(), sweep_yaml=yaml.safe_dump(sweep.model_dump(mode="json"), sort_keys=False))
    if first.reference == "precompute":
        for cfg in references:
            launch.precompute_reference(launch.resolve_builtin(cfg))

    # A Ray Train trial only drives; its Train workers hold the resources. (Tune refuses {"CPU": 0}.)
    # A restore must be given the same resources, or the restored trials ask for a whole CPU each.
    trainable = tune.with_resources(
        tune.with_parameters(_trial, sweep=sweep, base=base, shared=shared, parent_run_id=parent_run_id,
                             source=source, in_trial=in_trial),
        {"CPU": _trial_cpus(first, in_trial)})
    if resume:
        tuner = tune.Tuner.restore(ray_experiment_dir, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True, storage_filesystem=filesystem)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={key: _domain(domain) for key, domain in sweep.space.items()},
            tune_config=_tune_config(sweep, _max_concurrent(sweep, first, in_trial), in_trial,
                                     _max_reports(sweep, base, first)),
            # In-trial runs have no Ray Train to restart them: Tune does, from the trial's last checkpoint.
            run_config=tune.RunConfig(name=sweep.name, storage_path=tune_path,
                                      storage_filesystem=filesystem, verbose=1,
                                      failure_config=tune.FailureConfig(max_failures=first.scaling.max_failures)
                                      if in_trial else None),
        )
    status = "FAILED"
    # Tune stops gracefully (saving its state) on SIGINT only; `ray job stop` sends SIGTERM.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
    try:
        tuner.fit()
        # Tune swallows Ctrl-C: it saves its state, with the cut trials back to PENDING, and returns.
        saved = tune.ExperimentAnalysis(ray_experiment_dir, storage_filesystem=filesystem).trials
        unfinished = sum(trial.status not in ("TERMINATED", "ERROR") for trial in saved)
        status = "KILLED" if unfinished else "FINISHED"
    finally:
        mlflow_runs.close_unfinished_children(first, parent_run_id,
                                           reason="stopped by the sweep (scheduler or interruption) before finishing")
        mlflow_runs.close_run(first, parent_run_id, status=status)
    report = _report(first, parent_run_id)
    return SweepSummary(sweep=sweep, parent_run_id=parent_run_id, mlflow_uri=first.mlflow_uri,
                        experiment=first.tracking.experiment, best_trial=report.best_trial_id if report else None,
                        best_value=report.best_value if report else None, report=report, n_trials=len(saved),
                        unfinished=unfinished)


def _report(cfg: RunConfig, parent_run_id: str) -> SweepReport | None:
    """The sweep's report, or None (said) when MLflow is down by the end: the trials' outcome stands,
    and `mdpo-ray report` writes it from MLflow later."""
    try:
        return write_sweep_report(cfg, parent_run_id)
    except Exception as error:
        if not sinks.is_outage(error):
            raise
        sinks.warn(f"the sweep's report was not written: MLflow at {cfg.mlflow_uri} is unreachable ({error}); when "
                   "it is back, `mdpo-ray report <this sweep file>` writes it")
        return None


def write_sweep_report(cfg: RunConfig, parent_run_id: str) -> SweepReport:
    """write_report into output_dir/report. For object storage it is written in a temp dir and uploaded,
    and its paths then name the uploaded objects (`report.out_dir` is a URI string)."""
    location = storage.join(cfg.output_dir, "report")
    with storage.local_dir(location) as out_dir:
        report = write_report(cfg.mlflow_uri, parent_run_id, out_dir)
    if not storage.is_remote(location):
        return report
    def uploaded(path: Path) -> str:
        return storage.join(location, path.name)

    return dataclasses.replace(report, out_dir=location, csv_path=uploaded(report.csv_path),
                               markdown_path=uploaded(report.markdown_path), html_path=uploaded(report.html_path),
                               table_path=uploaded(report.table_path), plots=[uploaded(p) for p in report.plots])


def describe(summary: SweepSummary, cfg_ui: str) -> str:
    report = summary.report
    best = (f"{summary.best_trial} ({summary.sweep.metric} = {summary.best_value:.4g}; run {report.best_run_id})"
            if summary.best_trial else "none (no FINISHED trial reported the metric)")
    interrupted = (f"  INTERRUPTED: {summary.unfinished} trial(s) unfinished; continue with: "
                   f"mdpo-ray sweep <this file> --resume\n" if summary.unfinished else "")
    written = (f"{report.markdown_path} (+ trials.html, trials.csv, "
               f"{len(report.plots)} plots)" if report else
               "not written (MLflow was unreachable at the end): mdpo-ray report <this file>, once it is back")
    return interrupted + "\n".join([
        f"\nsweep {summary.sweep.name!r}: {summary.n_trials} trials",
        f"  best trial:  {best if report else 'unknown until the report is written'}",
        f"  report:      {written}",
        f"  MLflow:      experiment {summary.experiment!r} in {sinks.shown_uri(summary.mlflow_uri)} (parent run {summary.parent_run_id})",
        f"  MLflow UI:   {cfg_ui}",
    ])

