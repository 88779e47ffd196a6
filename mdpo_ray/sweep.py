"""The Ray Tune boundary: a thin driver that runs one `launch.train` per trial.

Each trial is a Tune function trainable that fits its own TorchTrainer (the Ray V2 Tune-launches-Train
pattern) and forwards rank-0 reports to Tune. Trial names derive from Tune trial ids, never from
timestamps, so `--resume` finds each trial's checkpoints and MLflow child run again.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import signal
import threading
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import yaml
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from mdpo_ray import cluster, launch, storage
from mdpo_ray.config import ConfigError, RunConfig
from mdpo_ray.reports.report import SweepReport, write_report
from mdpo_ray.sweep_config import SweepConfig, flat_overrides, trial_config
from mdpo_ray.tracking import labels, mlflow_runs, sinks

# Without a scheduler or searcher Tune needs no metric in every report (eval metrics come only with
# the last one); with ASHA, sweep_config insists on a metric that every report carries.
os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")

TRIAL_DRIVER_CPU = 0.01

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


def _trial(config: dict[str, Any], *, sweep: SweepConfig, base: dict[str, Any], shared: dict[str, Any],
           parent_run_id: str, source: dict[str, str], in_trial: bool) -> None:
    trial_id = tune.get_context().get_trial_id()
    overrides = flat_overrides({key: config[key] for key in sweep.space})
    cfg = trial_config(base, overrides | shared | {"name": f"{sweep.name}-{trial_id}"},
                       source=f"sweep {sweep.name} trial {trial_id}")
    # The sweep driver's command and commit: this process is a Ray worker's.
    tags = source | {"mlflow.parentRunId": parent_run_id, mlflow_runs.SWEEP_TAG: sweep.name, mlflow_runs.TRIAL_TAG: trial_id,
                     labels.RUN_NAME_TAG: labels.trial_run_name(cfg.loss.name, overrides, rounds=cfg.iterate.rounds)}
    tags |= {f"{mlflow_runs.OVERRIDE_PREFIX}{key}": str(value) for key, value in overrides.items()}
    if not in_trial:
        launch.train(cfg, tags=tags, callbacks=[TuneReportCallback()])
        return
    checkpoint = tune.get_checkpoint()  # set when Tune restarts or resumes this trial
    with checkpoint.as_directory() if checkpoint else nullcontext() as restore_dir:
        launch.train_in_process(cfg, tags=tags, report=_tune_report, restore_dir=Path(restore_dir) if restore_dir else None)


def _tune_report(metrics: dict[str, float], checkpoint_dir: Path | None, step: int) -> None:
    tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)


def _in_trial(sweep: SweepConfig, cfg: RunConfig) -> bool:
    """Every trial must agree: with scaling or iterate.rounds swept, all go through Ray Train (an iterate trial
    runs its rounds there: mdpo_ray.launch_rounds)."""
    return launch.runs_in_trial(cfg) and not any(k.startswith("scaling.") or k == "iterate.rounds"
                                                 for k in sweep.search_keys())


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


def _trial_cpus(cfg: RunConfig, in_trial: bool) -> float:
    """CPUs a trial's own process asks Tune for: all of the run's when it trains in it, else a token."""
    return cfg.scaling.cpus_per_worker if in_trial else TRIAL_DRIVER_CPU


def _max_concurrent(sweep: SweepConfig, cfg: RunConfig, in_trial: bool) -> int:
    if sweep.max_concurrent_trials:
        return sweep.max_concurrent_trials
    scaling = cfg.scaling
    if in_trial:
        per_trial, kind = scaling.cpus_per_worker, "CPU"
    else:
        kind, per_worker = ("GPU", scaling.gpus_per_worker) if scaling.use_gpu else ("CPU", scaling.cpus_per_worker)
        per_trial = scaling.num_workers * per_worker + (TRIAL_DRIVER_CPU if kind == "CPU" else 0.0)
    return max(1, int(ray.cluster_resources().get(kind, 0.0) // per_trial + 1e-9))


def _check_fits_locally(cfg: RunConfig, in_trial: bool) -> None:
    """On a local instance a trial that cannot fit would wait forever (Ray Train times out after 60 s)."""
    scaling = cfg.scaling
    need = scaling.cpus_per_worker if in_trial else scaling.num_workers * scaling.cpus_per_worker + TRIAL_DRIVER_CPU
    have = ray.cluster_resources().get("CPU", 0.0)
    if need > have:
        raise ConfigError(
            f"one trial needs {need:g} CPUs (scaling.num_workers={scaling.num_workers} x scaling.cpus_per_worker="
            f"{scaling.cpus_per_worker:g}{'' if in_trial else f', plus {TRIAL_DRIVER_CPU} for the trial driver'}) "
            f"but this machine has "
            f"{have:g}: lower scaling.cpus_per_worker (e.g. --set scaling.cpus_per_worker="
            f"{max(0.05, round((have - TRIAL_DRIVER_CPU) / scaling.num_workers - 0.05, 2)):g})")


def _max_reports(sweep: SweepConfig, base: dict[str, Any], first: RunConfig) -> int:
    """At least the most reports a trial can make: one per optimizer step, of each iterate round (Tune counts an
    iterate trial's reports over all its rounds). ASHA stops any trial that reaches its max_t (Ray's default is
    100), so it must be at least this: the most steps any value sets times the most rounds any value sets."""
    probes = [first, *(trial_config(base, {key: value}) for key, domain in sweep.space.items()
                       for value in domain.probe_values())]
    return max(cfg.optim.max_steps for cfg in probes) * max(max(1, cfg.iterate.rounds) for cfg in probes)


def _tune_config(sweep: SweepConfig, max_concurrent: int, in_trial: bool, max_reports: int) -> tune.TuneConfig:
    search_alg = scheduler = None
    if sweep.search is not None:
        from ray.tune.search.optuna import OptunaSearch  # checked importable in sweep_config

        search_alg = OptunaSearch(seed=sweep.search.seed)
    if sweep.scheduler is not None:
        asha = sweep.scheduler.asha
        scheduler = tune.schedulers.ASHAScheduler(time_attr="training_iteration", grace_period=asha.grace_period,
                                                  reduction_factor=asha.reduction_factor, max_t=max_reports)
    needs_metric = search_alg is not None or scheduler is not None
    return tune.TuneConfig(metric=sweep.metric if needs_metric else None, mode=sweep.mode if needs_metric else None,
                           num_samples=sweep.num_samples, search_alg=search_alg, scheduler=scheduler,
                           max_concurrent_trials=max_concurrent,
                           # In-trial runs: the next trial reuses a finished trial's process and its
                           # imports (torch, transformers, MLflow: ~5 s of CPU a trial on 2 cores).
                           reuse_actors=in_trial)


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

