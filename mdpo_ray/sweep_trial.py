"""One sweep trial: the Tune function trainable, and the resources, concurrency and Tune config it runs under.

Each trial is a Tune function trainable that fits its own TorchTrainer (the Ray V2 Tune-launches-Train
pattern) and forwards rank-0 reports to Tune. Trial names derive from Tune trial ids, never from
timestamps, so `--resume` finds each trial's checkpoints and MLflow child run again. The trainable,
`_trial`, is a top-level function of this module: Ray workers import it by its module path.
"""

from __future__ import annotations

import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from mdpo_ray import launch
from mdpo_ray.config import ConfigError, RunConfig
from mdpo_ray.sweep_config import SweepConfig, flat_overrides, trial_config
from mdpo_ray.tracking import labels, mlflow_runs

# Without a scheduler or searcher Tune needs no metric in every report (eval metrics come only with
# the last one); with ASHA, sweep_config insists on a metric that every report carries.
os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")

TRIAL_DRIVER_CPU = 0.01


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
        forward = TuneReportCallback()
        launch.train(cfg, tags=tags, callbacks=[forward])
        _wait_until_tune_took_every_report(forward)
        return
    checkpoint = tune.get_checkpoint()  # set when Tune restarts or resumes this trial
    with checkpoint.as_directory() if checkpoint else nullcontext() as restore_dir:
        launch.train_in_process(cfg, tags=tags, report=_tune_report, restore_dir=Path(restore_dir) if restore_dir else None)


def _wait_until_tune_took_every_report(forward: TuneReportCallback, timeout_s: float = 120.0,
                                      settle_s: float = 0.5) -> None:
    """Return once the trial's main thread has taken the Train run's last report from the callback's queue and
    handed it to Tune.

    Tune's function trainable (Ray 2.60, train/_internal/session.py get_next) takes a Train run's reports from
    that queue in the trial's main thread. When the trial function returns, Ray's wrapper reports a last
    result (RESULT_DUPLICATE) into the one-slot result queue; a Train report the main thread finds after that
    it blocks on putting behind it, and the trial hangs for good. That happened to an iterate trial whose last
    round's final report was still queued when the function returned, because Tune had not yet asked the
    trainable for its next result. So the function returns only once both queues have stayed empty for
    `settle_s` (the main thread takes a report from one and puts it into the other: the two checks bracket
    that). The queues are private attributes of Ray's: without them there is nothing to wait for."""
    from ray.train._internal.session import get_session

    queue = getattr(forward, "_training_actor_item_queue", None)
    if queue is None:
        return
    results = getattr(get_session(), "result_queue", None)
    drained = lambda: queue.empty() and (results is None or results.empty())
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if drained():
            time.sleep(settle_s)
            if drained():
                return
        else:
            time.sleep(0.05)


def _tune_report(metrics: dict[str, float], checkpoint_dir: Path | None, step: int) -> None:
    tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)


def _in_trial(sweep: SweepConfig, cfg: RunConfig) -> bool:
    """Every trial must agree: with scaling or iterate.rounds swept, all go through Ray Train (an iterate trial
    runs its rounds there: mdpo_ray.launch_rounds)."""
    return launch.runs_in_trial(cfg) and not any(k.startswith("scaling.") or k == "iterate.rounds"
                                                 for k in sweep.search_keys())


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
