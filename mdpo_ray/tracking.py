"""MLflow: the driver owns a run's lifecycle, rank 0 writes its metrics, every other rank a null sink.

The driver opens (or, for a re-run with the same run name, reopens) the MLflow run before any worker
starts and closes it as FINISHED or FAILED whatever happens to the workers, so a run is never left
RUNNING. Workers only append metrics to a run id they are handed. (nanochat `DummyWandb`.)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from mdpo_ray.config import RunConfig, flatten, to_yaml

RUN_NAME_TAG = "mdpo.run_name"
_BATCH = 100  # MLflow's log_batch limit on params per call


class MetricSink(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def tag(self, key: str, value: str) -> None: ...


class NullSink:
    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def tag(self, key: str, value: str) -> None:
        pass


class MlflowSink:
    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.run_id = run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(key, value, now, step) for key, value in metrics.items()]
        for start in range(0, len(batch), 1000):  # log_batch takes at most 1000 metrics
            self.client.log_batch(self.run_id, metrics=batch[start : start + 1000])

    def tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)


def _client(cfg: RunConfig) -> MlflowClient:
    return MlflowClient(tracking_uri=cfg.mlflow_uri)


def _experiment_id(client: MlflowClient, cfg: RunConfig) -> str:
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is not None:
        return experiment.experiment_id
    # A local sqlite store keeps artifacts beside its file, absolute, whatever the process cwd; a
    # tracking server decides for itself.
    uri = cfg.mlflow_uri
    location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri() \
        if uri.startswith("sqlite:///") else None
    return client.create_experiment(cfg.tracking.experiment, artifact_location=location)


def open_run(cfg: RunConfig, tags: dict[str, str] | None = None) -> tuple[str, bool]:
    """(run_id, resumed): the existing run with this run name, reopened, or a new one.

    `tags` (e.g. a sweep's `mlflow.parentRunId` and trial id) are set on the run either way.
    """
    client = _client(cfg)
    experiment_id = _experiment_id(client, cfg)
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{RUN_NAME_TAG}` = '{cfg.name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        logged = found[0].data.params
    else:
        run_id = client.create_run(experiment_id, run_name=cfg.name, tags={RUN_NAME_TAG: cfg.name}).info.run_id
        logged = {}
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, value)
    params = flatten(cfg)
    # MLflow params are immutable: a re-run logs keys it lacks and records what changed in a tag.
    fresh = [Param(k, v[:6000]) for k, v in params.items() if k not in logged]
    for start in range(0, len(fresh), _BATCH):
        client.log_batch(run_id, params=fresh[start : start + _BATCH])
    changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v[:6000])
    if changed:
        client.set_tag(run_id, "mdpo.changed_on_resume", ",".join(changed)[:5000])
    client.log_text(run_id, to_yaml(cfg), "config.yaml")
    return run_id, bool(found)


def close_run(cfg: RunConfig, run_id: str, *, succeeded: bool) -> None:
    _client(cfg).set_terminated(run_id, status="FINISHED" if succeeded else "FAILED")


def open_sweep_run(cfg: RunConfig, sweep_name: str, *, tags: dict[str, str], sweep_yaml: str) -> str:
    """The sweep's parent run (reopened on --resume); trials attach to it with mlflow.parentRunId."""
    client = _client(cfg)
    experiment_id = _experiment_id(client, cfg)
    found = client.search_runs([experiment_id], f"tags.`mdpo.sweep` = '{sweep_name}' and tags.`mdpo.role` = 'sweep'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        run_id = client.create_run(experiment_id, run_name=sweep_name,
                                   tags={"mdpo.sweep": sweep_name, "mdpo.role": "sweep"}).info.run_id
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    client.log_text(run_id, sweep_yaml, "sweep.yaml")
    return run_id


def close_unfinished_children(cfg: RunConfig, parent_run_id: str, *, reason: str) -> None:
    """Trials that Tune ended (ASHA, an interrupted driver) never reached their own close: do it here."""
    client = _client(cfg)
    children = client.search_runs([_experiment_id(client, cfg)],
                                  f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.status = 'RUNNING'")
    for child in children:
        client.set_tag(child.info.run_id, "mdpo.stop_reason", reason)
        client.set_terminated(child.info.run_id, status="KILLED")


def ui_command(cfg: RunConfig) -> str:
    if cfg.tracking.mlflow_uri:
        return f"open {cfg.tracking.mlflow_uri} (experiment {cfg.tracking.experiment!r})"
    return f"mlflow ui --backend-store-uri {cfg.mlflow_uri} --port 5000  # then http://127.0.0.1:5000"
