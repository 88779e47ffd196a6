"""The Ray Train boundary for one run: resolve the built-in task, open MLflow, fit a TorchTrainer.

The driver owns everything that must survive a worker failure: the resolved config, the MLflow run
(closed FINISHED or FAILED here, never left RUNNING) and the checkpoint storage Ray resumes from.
"""

from __future__ import annotations

import logging
import signal
import threading
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.train
import ray.train.torch

from mdpo_ray import cluster, storage
from mdpo_ray.config import BUILTIN, ConfigError, RunConfig, validate_config
from mdpo_ray.tracking import mlflow_runs, sinks
from mdpo_ray.training import lora


@dataclass(frozen=True)
class RunSummary:
    config: RunConfig
    mlflow_run_id: str | None  # None: MLflow was unreachable when the run started
    metrics: dict[str, float]
    checkpoint: str | None  # a path, or a URI for object storage
    export_dir: Path | str  # a str URI for object storage


def resolve_builtin(cfg: RunConfig) -> RunConfig:
    """Swap builtin:arith for the generated files and the cached SFT model (built on first use).

    Then check what only the model's architecture tells (LoRA target names): a bad name fails here, in the
    driver, not on every worker."""
    if cfg.data.train != BUILTIN:
        lora.check_config(cfg.model)
        return cfg
    from mdpo_ray.task.builtin import prepare_builtin  # imports the task only when it is used

    assets = prepare_builtin(cfg.builtin)
    raw = cfg.model_dump(mode="json")
    raw["data"] |= {"train": str(assets.train_path), "eval": str(assets.eval_path),
                    "generation_eval": str(assets.generation_eval_path)}
    if cfg.model.name_or_path == BUILTIN:
        raw["model"] |= {"name_or_path": str(assets.model_dir)}
    resolved = validate_config(raw, source="builtin task")
    lora.check_config(resolved.model)
    return resolved


def worker_entry(payload: dict) -> None:
    """Runs on every Ray Train worker."""
    from mdpo_ray.training.train_loop import Worker, train

    cfg = RunConfig.model_validate(payload["config"])
    _quiet_report_log()
    context = ray.train.get_context()
    run_id = payload["mlflow_run_id"]  # None: MLflow was down when the run started
    sink = sinks.sink_for(cfg, run_id, rank0=context.get_world_rank() == 0)

    def report(metrics: dict[str, float], checkpoint_dir: Path | None, step: int) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint,
                         checkpoint_dir_name=f"checkpoint_{step:06d}" if checkpoint else None)

    checkpoint = ray.train.get_checkpoint()
    try:
        with checkpoint.as_directory() if checkpoint else nullcontext() as restore_dir:
            train(cfg, Worker(gpu=_gpu(cfg), report=report,
                              restore_dir=Path(restore_dir) if restore_dir else None, sink=sink))
    finally:
        sink.close()  # a last flush; what MLflow never got goes to the run dir, even if training failed


def precompute_entry(payload: dict) -> None:
    from mdpo_ray.training.train_loop import Worker, precompute_reference

    cfg = RunConfig.model_validate(payload["config"])
    _quiet_report_log()
    precompute_reference(cfg, Worker(gpu=_gpu(cfg)))


def _gpu(cfg: RunConfig) -> int:
    """The GPU Ray assigned this worker, as a CUDA index in the worker's view. Ray Train has made it the
    current device; the local rank matches it only while Ray orders a node's workers by GPU id."""
    return ray.train.torch.get_device().index if cfg.scaling.use_gpu else 0


def precompute_reference(cfg: RunConfig) -> None:
    """Fill the reference log-prob cache with the run's own workers and sharding, then return."""
    _fit(cluster.trainer(precompute_entry, train_loop_config={"config": cfg.model_dump(mode="json")},
                         scaling_config=_scaling(cfg),
                         run_config=ray.train.RunConfig(name=f"{cfg.name}-reference", storage_path=cfg.output_dir,
                                                        callbacks=[_StopOnConfigError()])))


def _scaling(cfg: RunConfig) -> ray.train.ScalingConfig:
    scaling = cfg.scaling
    resources = {"CPU": scaling.cpus_per_worker} | ({"GPU": scaling.gpus_per_worker} if scaling.use_gpu else {})
    return ray.train.ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                   resources_per_worker=resources)


def _quiet_report_log() -> None:
    """Ray Train V2 logs every report's full metric dict at INFO; our own step line says it once, briefly."""
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # internal module moved: keep Ray's default logging
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def train(cfg: RunConfig, *, tags: dict[str, str] | None = None, callbacks: list | None = None) -> RunSummary:
    """One run. A sweep trial passes its MLflow tags and Tune's report callback."""
    cfg = resolve_builtin(cfg)
    run_id = _open_run(cfg, tags)
    # SIGTERM (ray job stop, a scheduler's kill) must still close the MLflow run; so must a Ray that
    # cannot be reached.
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt) if in_main else None
    succeeded = False
    try:
        cluster.init_ray(use_gpu=cfg.scaling.use_gpu)
        trainer = cluster.trainer(
            worker_entry,
            train_loop_config={"config": cfg.model_dump(mode="json"), "mlflow_run_id": run_id},
            scaling_config=_scaling(cfg),
            run_config=ray.train.RunConfig(
                name=cfg.name,
                storage_path=cfg.output_dir,
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
                failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
                callbacks=[*(callbacks or []), _StopOnConfigError()],
            ),
        )
        result = _fit(trainer)
        succeeded = True
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
        mlflow_runs.close_run(cfg, run_id, succeeded=succeeded)
    export = storage.join(cfg.run_location, "export")
    return RunSummary(config=cfg, mlflow_run_id=run_id, metrics=dict(result.metrics or {}),
                      checkpoint=storage.display(result.checkpoint.path, cfg.output_dir) if result.checkpoint else None,
                      export_dir=export if storage.is_remote(export) else Path(export))


class _StopOnConfigError(ray.train.UserCallback):
    """A worker's ConfigError (output_dir not shared by the nodes) fails again on every attempt: end the run
    at once rather than restart the workers scaling.max_failures times (for good at -1). Raised here, on
    Ray Train's controller, it is a controller error, which Ray does not retry."""

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        for error in worker_exceptions.values():
            if isinstance(error, ConfigError):
                raise error


def _fit(trainer) -> ray.train.Result:
    """trainer.fit(), with a ConfigError a worker raised taken out of Ray Train's error (the workers', or the
    controller's when _StopOnConfigError raised it there): the CLI says it and exits 2, as for any config error."""
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as error:
        causes = [*getattr(error, "worker_failures", {}).values(), getattr(error, "controller_failure", None)]
        config_error = next((cause for cause in causes if isinstance(cause, ConfigError)), None)
        if config_error is None:
            raise
        raise config_error from error


def runs_in_trial(cfg: RunConfig) -> bool:
    """A one-worker CPU sweep trial trains inside its Tune trial process. For one CPU worker a
    TorchTrainer adds nothing but two more process start-ups (its controller and worker, each
    importing torch; ~8 s of a ~25 s trial on 2 cores), which dominate a sweep of small trials.
    Multi-worker and GPU trials always go through Ray Train."""
    return cfg.scaling.num_workers == 1 and not cfg.scaling.use_gpu


def train_in_process(cfg: RunConfig, *, tags: dict[str, str], report, restore_dir: Path | None) -> None:
    """One single-worker run in this process (a Tune trial's): the same loop, MLflow run handling and
    checkpoints as `train`, with `report(metrics, checkpoint_dir, step)` in place of ray.train.report."""
    from mdpo_ray.training.train_loop import Worker
    from mdpo_ray.training.train_loop import train as train_loop

    cfg = resolve_builtin(cfg)
    run_id = _open_run(cfg, tags)
    sink = sinks.sink_for(cfg, run_id, rank0=True)
    succeeded = False
    try:
        train_loop(cfg, Worker(report=report, restore_dir=restore_dir, sink=sink))
        succeeded = True
    finally:
        sink.close()
        mlflow_runs.close_run(cfg, run_id, succeeded=succeeded)


def _open_run(cfg: RunConfig, tags: dict[str, str] | None) -> str | None:
    """Open (or reopen) the run's MLflow run and say which; None when MLflow is unreachable (said too)."""
    run_id, resumed = mlflow_runs.open_run(cfg, tags)
    if run_id is not None:
        print(f"MLflow run {run_id} ({'resumed' if resumed else 'new'}) in {sinks.shown_uri(cfg.mlflow_uri)}")
    return run_id


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def describe(summary: RunSummary) -> str:
    """What a user needs after a run: before/after figures and where everything is."""
    m, cfg = summary.metrics, summary.config
    rows = [("answer accuracy (greedy)", "answer_accuracy"), ("reward accuracy", "rewards/accuracies"),
            ("Δw  chosen log-prob drift", "delta_chosen/mean"), ("Δl  rejected log-prob drift", "delta_rejected/mean")]
    lines = [f"\nrun {cfg.name!r}: {cfg.loss.name}, beta={cfg.loss.beta}, {int(m.get('step', 0))} steps",
             f"  {'held-out':30s} {'before':>10s} {'after':>10s}"]
    for label, key in rows:
        if f"eval/{key}" in m:
            lines.append(f"  {label:30s} {m.get('eval_start/' + key, float('nan')):10.4f} {m['eval/' + key]:10.4f}")
    run = f"run {summary.mlflow_run_id}" if summary.mlflow_run_id else "unreachable: this run was not tracked"
    adapter = cfg.model.lora.r and cfg.export.lora == "adapter"
    load = f"PeftModel.from_pretrained over {cfg.model.name_or_path}" if adapter else "AutoModelForCausalLM.from_pretrained"
    load = f"download it, then {load}" if storage.is_remote(str(summary.export_dir)) else load
    lines += [f"  MLflow store:   {sinks.shown_uri(cfg.mlflow_uri)} ({run})",
              f"  MLflow UI:      {mlflow_runs.ui_command(cfg)}",
              f"  checkpoints:    {summary.checkpoint or cfg.run_location}",
              f"  exported model: {summary.export_dir}  ({load})"]
    return "\n".join(lines)
