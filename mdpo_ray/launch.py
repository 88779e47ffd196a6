"""The Ray Train boundary for one run: resolve the built-in task, open MLflow, fit a TorchTrainer.

The driver owns everything that must survive a worker failure: the resolved config, the MLflow run
(closed FINISHED or FAILED here, never left RUNNING) and the checkpoint storage Ray resumes from.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.train
import ray.train.torch
from ray.train.torch import TorchTrainer

from mdpo_ray import sinks, tracking
from mdpo_ray.config import BUILTIN, ConfigError, RunConfig, validate_config

# Every ray.train.report waits on the controller's health-check poll (2 s by default): at 0.1 s a
# 20-report run no longer spends most of its time blocked in report (measured, see STACK_NOTES).
RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
           # Train V2 routes print() through a logger and also tees it when stdout is wrapped: each
           # line twice. Plain prints reach the driver once through Ray's log forwarding.
           "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
           # Per-file progress bars from every worker drown the step lines; the step lines say it all.
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}

# A local instance runs on the cores that train: each of Ray's ~10 processes wakes every few ms, and a
# 2-thread CPU step stalls whenever either thread is preempted (benchmarks/vs_trl.py; README,
# Performance). Joining a cluster changes none of Ray's settings.
LOCAL_RAY_ENV = {
    # Ray starts workers at niceness 15 so a busy node cannot starve its own raylet/GCS; then every
    # wake-up of those (niceness 0) preempts the training threads at once. Locally the control plane
    # is nearly idle and still gets its share at equal niceness.
    "RAY_worker_niceness": "0",
    # Polls the GCS for node drains every 5 s in an actor process of its own; nothing drains a local machine.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


def _cluster_only_callbacks() -> tuple[type, ...]:
    try:
        from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    except ImportError:  # moved in another Ray version: its defaults stay
        return ()
    return DatasetsCallback, PlacementGroupCleanerCallback


def _started_here() -> bool:
    """Whether ray.init in this process started the instance (a head node that ends with this process),
    rather than joining one: RAY_ADDRESS unset is not enough, since ray.init also joins a cluster that
    `ray start` left on this machine."""
    try:
        from ray._private import worker  # internal: where ray.init keeps the node it started or joined
    except ImportError:
        return False
    node = getattr(worker, "_global_node", None)
    return node is not None and node.is_head()


class _LocalTrainer(TorchTrainer):
    """A TorchTrainer for an instance this process started: without two helper actors that one machine
    does not need. Each is a process whose main thread wakes every 10 ms (Ray's signal check, ~0.007
    cores apiece), taken from the training threads of a CPU run. The placement-group cleaner frees a
    run's resources when its controller dies on a cluster that outlives it; a local instance ends with
    this process. The dataset manager serves Ray Datasets, and mdpo-ray passes none."""

    def _create_default_callbacks(self):
        drop = _cluster_only_callbacks() if not getattr(self, "datasets", None) else ()
        return [c for c in super()._create_default_callbacks() if not isinstance(c, drop)]


def _trainer(*args, **kwargs) -> TorchTrainer:
    return (_LocalTrainer if _started_here() else TorchTrainer)(*args, **kwargs)


@dataclass(frozen=True)
class RunSummary:
    config: RunConfig
    mlflow_run_id: str | None  # None: MLflow was unreachable when the run started
    metrics: dict[str, float]
    checkpoint: str | None
    export_dir: Path


def resolve_builtin(cfg: RunConfig) -> RunConfig:
    """Swap builtin:arith for the generated files and the cached SFT model (built on first use)."""
    if cfg.data.train != BUILTIN:
        return cfg
    from mdpo_ray.builtin import prepare_builtin  # imports the task only when it is used

    assets = prepare_builtin(cfg.builtin)
    raw = cfg.model_dump(mode="json")
    raw["data"] |= {"train": str(assets.train_path), "eval": str(assets.eval_path),
                    "generation_eval": str(assets.generation_eval_path)}
    if cfg.model.name_or_path == BUILTIN:
        raw["model"] |= {"name_or_path": str(assets.model_dir)}
    return validate_config(raw, source="builtin task")


def worker_entry(payload: dict) -> None:
    """Runs on every Ray Train worker."""
    from mdpo_ray.train_loop import Worker, train

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
    from mdpo_ray.train_loop import Worker, precompute_reference

    cfg = RunConfig.model_validate(payload["config"])
    _quiet_report_log()
    precompute_reference(cfg, Worker(gpu=_gpu(cfg)))


def _gpu(cfg: RunConfig) -> int:
    """The GPU Ray assigned this worker, as a CUDA index in the worker's view. Ray Train has made it the
    current device; the local rank matches it only while Ray orders a node's workers by GPU id."""
    return ray.train.torch.get_device().index if cfg.scaling.use_gpu else 0


def precompute_reference(cfg: RunConfig) -> None:
    """Fill the reference log-prob cache with the run's own workers and sharding, then return."""
    _trainer(precompute_entry, train_loop_config={"config": cfg.model_dump(mode="json")},
             scaling_config=_scaling(cfg),
             run_config=ray.train.RunConfig(name=f"{cfg.name}-reference", storage_path=cfg.output_dir)).fit()


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


def _will_start_instance() -> bool:
    """Whether ray.init() will start an instance rather than join one. It joins RAY_ADDRESS (set inside
    `ray job submit`) and also, without it, the cluster that `ray start` left on this machine: on the
    head node of cluster.yaml (`ray attach`), that is an autoscaling cluster."""
    try:  # the lookup ray.init(address=None) makes: RAY_ADDRESS, else /tmp/ray/ray_current_cluster
        from ray._private.services import get_ray_address_from_environment
    except ImportError:  # moved in another Ray version
        return "RAY_ADDRESS" not in os.environ
    return get_ray_address_from_environment(None, None) is None


def _host_port(address: str | None) -> tuple[str, int] | None:
    host, _, port = (address or "").rpartition(":")
    return (host.strip("[]"), int(port)) if host and port.isdigit() else None  # [::1]:6379 too


def _stale_start_address() -> str | None:
    """The GCS address `ray start` recorded in /tmp/ray/ray_current_cluster, when nothing answers there.

    A `ray start` that was killed, or a node that crashed, leaves the file behind without `ray stop`;
    ray.init() then retries that address for good, printing GCS timeouts. RAY_ADDRESS is the user's
    own choice and is not second-guessed."""
    if os.environ.get("RAY_ADDRESS"):
        return None
    try:
        from ray._private.services import find_bootstrap_address
    except ImportError:  # moved in another Ray version: Ray's own behaviour
        return None
    address = find_bootstrap_address(None)
    if (host_port := _host_port(address)) is None:
        return None
    try:
        socket.create_connection(host_port, timeout=5).close()
        return None
    except OSError:
        return address


def _is_this_machine(address: str) -> bool:
    host = _host_port(address)[0]
    try:  # only an address of one of this machine's interfaces can be bound
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.bind((host, 0))
        return True
    except OSError:
        return False


def init_ray() -> bool:
    """Joins the cluster inside `ray job submit` or on a node of one; otherwise starts a local instance.
    True when it started one (its resources are all there will be)."""
    for key, value in RAY_ENV.items():  # also where Ray is up already (a Tune trial starting a trainer)
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return False
    address = None
    if stale := _stale_start_address():
        fix = "run `ray stop` (it removes the file), or set RAY_ADDRESS to the cluster to join"
        if not _is_this_machine(stale):
            raise ConfigError(f"no Ray cluster answers at {stale}, the address `ray start` left in "
                              f"/tmp/ray/ray_current_cluster: start that cluster's head, or {fix}")
        # This machine's own head is gone: there is nothing to join, so do what a clean machine does.
        print(f"mdpo-ray: nothing answers at {stale}, the address a `ray start` that is gone left in "
              "/tmp/ray/ray_current_cluster; starting a local Ray instance (`ray stop` removes the file)", flush=True)
        address = "local"
    local = address == "local" or _will_start_instance()
    # The dashboard stays (0.03 of 2 cores at rest): it is Ray's State API and its UI, and on a cluster
    # Train's placement-group cleaner warns every second without it.
    ray.init(address=address, runtime_env={"env_vars": RAY_ENV | (LOCAL_RAY_ENV if local else {})},
             log_to_driver=True)
    return local


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
        init_ray()
        trainer = _trainer(
            worker_entry,
            train_loop_config={"config": cfg.model_dump(mode="json"), "mlflow_run_id": run_id},
            scaling_config=_scaling(cfg),
            run_config=ray.train.RunConfig(
                name=cfg.name,
                storage_path=cfg.output_dir,
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
                failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
                callbacks=callbacks,
            ),
        )
        result = trainer.fit()
        succeeded = True
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
        tracking.close_run(cfg, run_id, succeeded=succeeded)
    return RunSummary(config=cfg, mlflow_run_id=run_id, metrics=dict(result.metrics or {}),
                      checkpoint=result.checkpoint.path if result.checkpoint else None,
                      export_dir=cfg.run_dir / "export")


def runs_in_trial(cfg: RunConfig) -> bool:
    """A one-worker CPU sweep trial trains inside its Tune trial process. For one CPU worker a
    TorchTrainer adds nothing but two more process start-ups (its controller and worker, each
    importing torch; ~8 s of a ~25 s trial on 2 cores), which dominate a sweep of small trials.
    Multi-worker and GPU trials always go through Ray Train."""
    return cfg.scaling.num_workers == 1 and not cfg.scaling.use_gpu


def train_in_process(cfg: RunConfig, *, tags: dict[str, str], report, restore_dir: Path | None) -> None:
    """One single-worker run in this process (a Tune trial's): the same loop, MLflow run handling and
    checkpoints as `train`, with `report(metrics, checkpoint_dir, step)` in place of ray.train.report."""
    from mdpo_ray.train_loop import Worker
    from mdpo_ray.train_loop import train as train_loop

    cfg = resolve_builtin(cfg)
    run_id = _open_run(cfg, tags)
    sink = sinks.sink_for(cfg, run_id, rank0=True)
    succeeded = False
    try:
        train_loop(cfg, Worker(report=report, restore_dir=restore_dir, sink=sink))
        succeeded = True
    finally:
        sink.close()
        tracking.close_run(cfg, run_id, succeeded=succeeded)


def _open_run(cfg: RunConfig, tags: dict[str, str] | None) -> str | None:
    """Open (or reopen) the run's MLflow run and say which; None when MLflow is unreachable (said too)."""
    run_id, resumed = tracking.open_run(cfg, tags)
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
    lines += [f"  MLflow store:   {sinks.shown_uri(cfg.mlflow_uri)} ({run})",
              f"  MLflow UI:      {tracking.ui_command(cfg)}",
              f"  checkpoints:    {summary.checkpoint or cfg.run_dir}",
              f"  exported model: {summary.export_dir}  (AutoModelForCausalLM.from_pretrained)"]
    return "\n".join(lines)
