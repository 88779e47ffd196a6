"""MLflow: the driver owns a run's lifecycle, rank 0 writes its metrics, every other rank a null sink.

The driver opens (or, for a re-run with the same run name, reopens) the MLflow run before any worker
starts and closes it as FINISHED or FAILED whatever happens to the workers, so a run is never left
RUNNING. Workers only append metrics to a run id they are handed. (nanochat `DummyWandb`.)
Tracking never stops training: a server down at the start disables tracking for the run, an outage
during it is buffered and retried, and what never reached MLflow is written to a JSONL file.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections import deque
from itertools import islice
from pathlib import Path
from typing import Protocol

import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mdpo_ray.config import RunConfig, flatten

# MLflow's REST client retries a failed call 7 times, backing off 2 * 2^n s (up to 120 s), with a 120 s
# timeout per attempt: one call to a down server would block training for 4+ minutes. Give up within
# ~3 s (connection refused) or ~35 s (no answer); MlflowSink buffers and retries on its own schedule.
# Read per request, so setting them before the first call suffices; a user's own setting wins.
for _name, _value in {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                      "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}.items():
    os.environ.setdefault(_name, _value)

# Tag names: written here and by the sweep driver, read by the report.
RUN_NAME_TAG = "mdpo.run_name"
SWEEP_TAG = "mdpo.sweep"
ROLE_TAG = "mdpo.role"  # "sweep" on a sweep's parent run
SEARCH_KEYS_TAG = "mdpo.search_keys"  # comma-separated dotted keys
METRIC_TAG = "mdpo.metric"
MODE_TAG = "mdpo.mode"
TRIAL_TAG = "mdpo.trial_id"
STOP_REASON_TAG = "mdpo.stop_reason"
OVERRIDE_PREFIX = "override."  # one tag per searched key on each trial run
UNLOGGED_FILE = "unlogged_metrics.jsonl"
REDACTED = "***REDACTED***"
# A key ending like a credential (hf_token, api_key, db_password) is never logged; max_new_tokens is.
SECRET_KEY = re.compile(r"(token|secret|password|passwd|api_?key|access_?key|secret_?key|private_?key|credentials?)$",
                        re.IGNORECASE)
_BATCH = 100  # MLflow's log_batch limit on params per call (1000 on metrics)


class MetricSink(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def tag(self, key: str, value: str) -> None: ...


class NullSink:
    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def tag(self, key: str, value: str) -> None:
        pass

    def close(self) -> None:
        pass


class MlflowSink:
    """Rank 0's metrics and tags, kept through MLflow outages.

    A call that fails because MLflow is down keeps its points (step and timestamp as logged) in a
    bounded buffer, the oldest dropped and counted beyond `max_buffered`. Later calls send them oldest
    first, trying at most every `retry_every_s` (doubled while the outage lasts, up to 5 min) so a down
    server does not cost a timeout every step. Resending a batch whose answer was lost is harmless:
    MLflow skips a metric identical in key, value, timestamp and step. `close()` writes whatever never
    reached MLflow to `unlogged_path` as JSON lines.
    """

    def __init__(self, tracking_uri: str, run_id: str, *, unlogged_path: Path | None = None,
                 max_buffered: int = 100_000, retry_every_s: float = 30.0) -> None:
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.uri, self.run_id, self.unlogged_path = tracking_uri, run_id, unlogged_path
        self.retry_every_s = retry_every_s
        self._buffer: deque[Metric | RunTag] = deque(maxlen=max_buffered)
        self._rejected: list[Metric | RunTag] = []  # refused by MLflow (a 4xx): retrying would not help
        self._dropped = 0  # while MLflow is down, points pushed out of the full buffer
        self._outage: str | None = None  # the error, while MLflow is unreachable
        self._wait, self._next_try = retry_every_s, 0.0

    def log(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self._push([Metric(key, float(value), now, step) for key, value in metrics.items()])

    def tag(self, key: str, value: str) -> None:
        self._push([RunTag(key, str(value))])

    def close(self) -> None:
        """A last flush; then say what could not be logged and write it to `unlogged_path`."""
        self._flush(force=True)
        unlogged = [*self._buffer, *self._rejected]
        if unlogged or self._dropped:
            head = f"MLflow at {self.uri} was unreachable at the end" if self._outage else "MLflow refused some points"
            dropped = f" (and {self._dropped} older ones were dropped from the full buffer)" if self._dropped else ""
            _warn(f"{head}: {len(unlogged)} metric points could not be logged to run {self.run_id}{dropped}; this did "
                  f"not affect training: checkpoints and export are unaffected; {self._write(unlogged)}")
        self._buffer.clear()
        self._rejected.clear()

    def _push(self, items: list[Metric | RunTag]) -> None:
        self._dropped += max(0, len(self._buffer) + len(items) - self._buffer.maxlen)
        self._buffer.extend(items)
        self._flush()

    def _flush(self, *, force: bool = False) -> None:
        if self._outage is not None and not force and time.monotonic() < self._next_try:
            return
        sent = 0
        while self._buffer:
            chunk = list(islice(self._buffer, 1000))  # log_batch takes at most 1000 metrics
            try:
                self.client.log_batch(self.run_id, metrics=[m for m in chunk if isinstance(m, Metric)],
                                      tags=[t for t in chunk if isinstance(t, RunTag)])
            except Exception as error:  # noqa: BLE001  (nothing from tracking may stop training)
                if is_outage(error):
                    return self._went_down(error)
                if not self._rejected:
                    _warn(f"MLflow refused {len(chunk)} metric points ({error}); they will go to {UNLOGGED_FILE}")
                self._rejected += chunk
            for _ in chunk:
                self._buffer.popleft()
            sent += len(chunk)
        if self._outage is not None:
            dropped = f" ({self._dropped} older ones were dropped from the full buffer)" if self._dropped else ""
            _warn(f"MLflow reachable again: flushed {sent} buffered metric points{dropped}")
            self._outage, self._wait, self._dropped = None, self.retry_every_s, 0

    def _went_down(self, error: Exception) -> None:
        if self._outage is None:
            _warn(f"MLflow at {self.uri} unreachable ({error}); buffering metrics and retrying; training continues")
        else:
            self._wait = min(2 * self._wait, 300.0)
        self._outage, self._next_try = str(error), time.monotonic() + self._wait

    def _write(self, unlogged: list[Metric | RunTag]) -> str:
        if self.unlogged_path is None:
            return "they are lost (no file was given to keep them)"
        rows = [{"run_id": self.run_id, "key": m.key, "value": m.value} |
                ({"timestamp": m.timestamp, "step": m.step} if isinstance(m, Metric) else {"tag": True})
                for m in unlogged]
        try:
            self.unlogged_path.parent.mkdir(parents=True, exist_ok=True)
            with self.unlogged_path.open("a") as f:  # append: a resumed run keeps an earlier attempt's points
                f.writelines(json.dumps(row) + "\n" for row in rows)
        except OSError as error:
            return f"they are lost: writing {self.unlogged_path} failed ({error})"
        return f"they are in {self.unlogged_path} (JSON lines: run_id, key, value, timestamp, step)"


def _warn(message: str) -> None:
    print(f"mdpo-ray: {message}", file=sys.stderr, flush=True)


def is_outage(error: Exception) -> bool:
    """Unreachable, timed out, or a 5xx/429 answer: worth retrying. A 4xx is a refusal that won't heal."""
    if isinstance(error, MlflowException):
        return error.get_http_status_code() >= 500 or error.get_http_status_code() == 429
    return isinstance(error, OSError)  # requests' errors included


def shown_uri(uri: str) -> str:
    """A URI fit to print or log: `https://user:token@host` loses its user info."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@", rf"\1{REDACTED}@", uri)


def redacted_params(flat: dict[str, str]) -> dict[str, str]:
    """Dotted params whose last segment looks like a credential, with the value replaced by REDACTED;
    user info in URIs removed."""
    return {key: REDACTED if SECRET_KEY.search(key.rsplit(".", 1)[-1]) else shown_uri(value)
            for key, value in flat.items()}


def redacted_tree(node):
    """The same for a nested config dict (the config.yaml artifact), at any depth."""
    if isinstance(node, dict):
        return {key: REDACTED if SECRET_KEY.search(str(key)) and not isinstance(value, dict) else redacted_tree(value)
                for key, value in node.items()}
    if isinstance(node, list):
        return [redacted_tree(item) for item in node]
    return shown_uri(node) if isinstance(node, str) else node


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


def sink_for(cfg: RunConfig, run_id: str | None, *, rank0: bool) -> MlflowSink | NullSink:
    """The metric sink a worker logs to: rank 0's MlflowSink for the run; a NullSink on other ranks,
    and when MLflow was unreachable as the run opened (run_id None)."""
    if not rank0 or run_id is None:
        return NullSink()
    return MlflowSink(cfg.mlflow_uri, run_id, unlogged_path=cfg.run_dir / UNLOGGED_FILE)


def open_run(cfg: RunConfig, tags: dict[str, str] | None = None) -> tuple[str | None, bool]:
    """(run_id, resumed): the existing run with this run name, reopened, or a new one.

    `tags` (e.g. a sweep's `mlflow.parentRunId` and trial id) are set on the run either way. With
    MLflow unreachable: a warning and (None, False), and the run trains without tracking.
    """
    client, run_id, logged = _client(cfg), None, None
    try:
        run_id, logged = _find_or_create_run(client, _experiment_id(client, cfg), cfg.name, {RUN_NAME_TAG: cfg.name})
        _log_run_config(client, run_id, cfg, tags or {}, logged or {})
    except Exception as error:
        if not is_outage(error):
            raise
        consequence = (f"the params and config of run {run_id} were not logged; its metrics will be buffered"
                       if run_id else "tracking disabled for this run: nothing will be logged to MLflow")
        _warn(f"MLflow at {shown_uri(cfg.mlflow_uri)} unreachable ({error}); {consequence}; training continues")
    return run_id, logged is not None


def _find_or_create_run(client: MlflowClient, experiment_id: str, run_name: str,
                        identity: dict[str, str]) -> tuple[str, dict[str, str] | None]:
    """(run_id, params already logged): the newest run carrying the `identity` tags, reopened, or a new
    one (params None)."""
    query = " and ".join(f"tags.`{key}` = '{value}'" for key, value in identity.items())
    found = client.search_runs([experiment_id], filter_string=query, order_by=["attributes.start_time DESC"],
                               max_results=1)
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id, found[0].data.params
    return client.create_run(experiment_id, run_name=run_name, tags=identity).info.run_id, None


def _log_run_config(client: MlflowClient, run_id: str, cfg: RunConfig, tags: dict[str, str],
                    logged: dict[str, str]) -> None:
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    params = redacted_params(flatten(cfg))
    # MLflow params are immutable: a re-run logs keys it lacks and records what changed in a tag.
    fresh = [Param(k, v[:6000]) for k, v in params.items() if k not in logged]
    for start in range(0, len(fresh), _BATCH):
        client.log_batch(run_id, params=fresh[start : start + _BATCH])
    changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v[:6000])
    if changed:
        client.set_tag(run_id, "mdpo.changed_on_resume", ",".join(changed)[:5000])
    client.log_text(run_id, yaml.safe_dump(redacted_tree(cfg.model_dump(mode="json")), sort_keys=False), "config.yaml")


def close_run(cfg: RunConfig, run_id: str | None, *, succeeded: bool = False, status: str | None = None) -> None:
    """FINISHED or FAILED (or an explicit status such as KILLED); if MLflow is down by now, a warning:
    the training's outcome stands either way."""
    if run_id is None:
        return
    status = status or ("FINISHED" if succeeded else "FAILED")
    try:
        _client(cfg).set_terminated(run_id, status=status)
    except Exception as error:  # noqa: BLE001  (raising here would hide the run's own outcome)
        _warn(f"could not mark MLflow run {run_id} {status} at {shown_uri(cfg.mlflow_uri)} ({error}); it may show RUNNING "
              f"there; the run itself ended {status}")


def open_sweep_run(cfg: RunConfig, sweep_name: str, *, tags: dict[str, str], sweep_yaml: str) -> str:
    """The sweep's parent run (reopened on --resume); trials attach to it with mlflow.parentRunId."""
    client = _client(cfg)
    run_id, _ = _find_or_create_run(client, _experiment_id(client, cfg), sweep_name,
                                    {SWEEP_TAG: sweep_name, ROLE_TAG: "sweep"})
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
        client.set_tag(child.info.run_id, STOP_REASON_TAG, reason)
        client.set_terminated(child.info.run_id, status="KILLED")


def ui_command(cfg: RunConfig) -> str:
    if cfg.mlflow_uri.startswith("sqlite:///"):  # a local store: the UI has to be started
        return f"mlflow ui --backend-store-uri {cfg.mlflow_uri} --port 5000  # then http://127.0.0.1:5000"
    return f"open {shown_uri(cfg.mlflow_uri)} (experiment {cfg.tracking.experiment!r})"
