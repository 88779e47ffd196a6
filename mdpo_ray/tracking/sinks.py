"""Where a worker's metrics go: rank 0 appends them to the driver's MLflow run, every other rank drops
them (a null sink instead of `if rank == 0` checks; nanochat `DummyWandb`).

Tracking never stops training: an outage is buffered and retried, and what never reached MLflow is
written to a JSONL file beside the run.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
from collections import deque
from itertools import islice
from pathlib import Path
from typing import Protocol

from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mdpo_ray import storage
from mdpo_ray.config import RunConfig

# MLflow's REST client retries a failed call 7 times, backing off 2 * 2^n s (up to 120 s), with a 120 s
# timeout per attempt: one call to a down server would block training for 4+ minutes. Give up within
# ~3 s (connection refused) or ~35 s (no answer); MlflowSink buffers and retries on its own schedule.
# Read per request, so setting them before the first call suffices; a user's own setting wins.
for _name, _value in {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                      "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}.items():
    os.environ.setdefault(_name, _value)

UNLOGGED_FILE = "unlogged_metrics.jsonl"
REDACTED = "***REDACTED***"
_USER_INFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]*@")


class MetricSink(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def tag(self, key: str, value: str) -> None: ...

    def log_model(self, export_dir: Path) -> None: ...


class NullSink:
    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def tag(self, key: str, value: str) -> None:
        pass

    def log_model(self, export_dir: Path) -> None:
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

    def __init__(self, tracking_uri: str, run_id: str, *, unlogged_path: Path | str | None = None,
                 max_buffered: int = 100_000, retry_every_s: float = 30.0, system_metrics: bool = False) -> None:
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.uri, self.run_id, self.unlogged_path = tracking_uri, run_id, unlogged_path
        self.retry_every_s = retry_every_s
        self._buffer: deque[Metric | RunTag] = deque(maxlen=max_buffered)
        self._rejected: list[Metric | RunTag] = []  # refused by MLflow (a 4xx): retrying would not help
        self._dropped = 0  # while MLflow is down, points pushed out of the full buffer
        self._outage: str | None = None  # the error, while MLflow is unreachable
        self._wait, self._next_try = retry_every_s, 0.0
        self._monitor = _system_metrics_monitor(tracking_uri, run_id) if system_metrics else None

    def log(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self._push([Metric(key, float(value), now, step) for key, value in metrics.items()])

    def tag(self, key: str, value: str) -> None:
        self._push([RunTag(key, str(value))])

    def log_model(self, export_dir: Path) -> None:
        """The export as the run's `model` artifact, an MLflow transformers model (`tracking.log_model`).
        A failure is said and does not fail the run: the export itself is already written."""
        from mdpo_ray.tracking.logged_model import save_mlflow_model

        try:
            with tempfile.TemporaryDirectory() as tmp:
                save_mlflow_model(Path(export_dir), Path(tmp) / "model")
                self.client.log_artifacts(self.run_id, str(Path(tmp) / "model"), "model")
        except Exception as error:  # noqa: BLE001  (the export is written; MLflow's copy is extra)
            warn(f"tracking.log_model: logging the export as an MLflow model failed ({type(error).__name__}: {error}); "
                 f"the export itself is unaffected")
            return
        print(f"logged the export as an MLflow model: runs:/{self.run_id}/model", flush=True)

    def close(self) -> None:
        """A last flush; then say what could not be logged and write it to `unlogged_path`."""
        if self._monitor is not None:
            self._monitor.finish()  # its last samples, logged by MLflow's own logger
            self._monitor = None
        self._flush(force=True)
        unlogged = [*self._buffer, *self._rejected]
        if unlogged or self._dropped:
            head = f"MLflow at {self.uri} was unreachable at the end" if self._outage else "MLflow refused some points"
            dropped = f" (and {self._dropped} older ones were dropped from the full buffer)" if self._dropped else ""
            warn(f"{head}: {len(unlogged)} metric points could not be logged to run {self.run_id}{dropped}; this did "
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
                    warn(f"MLflow refused {len(chunk)} metric points ({error}); they will go to {UNLOGGED_FILE}")
                self._rejected += chunk
            for _ in chunk:
                self._buffer.popleft()
            sent += len(chunk)
        if self._outage is not None:
            dropped = f" ({self._dropped} older ones were dropped from the full buffer)" if self._dropped else ""
            warn(f"MLflow reachable again: flushed {sent} buffered metric points{dropped}")
            self._outage, self._wait, self._dropped = None, self.retry_every_s, 0

    def _went_down(self, error: Exception) -> None:
        if self._outage is None:
            warn(f"MLflow at {self.uri} unreachable ({error}); buffering metrics and retrying; training continues")
        else:
            self._wait = min(2 * self._wait, 300.0)
        self._outage, self._next_try = str(error), time.monotonic() + self._wait

    def _write(self, unlogged: list[Metric | RunTag]) -> str:
        if self.unlogged_path is None:
            return "they are lost (no file was given to keep them)"
        rows = [{"run_id": self.run_id, "key": m.key, "value": m.value} |
                ({"timestamp": m.timestamp, "step": m.step} if isinstance(m, Metric) else {"tag": True})
                for m in unlogged]
        try:  # append: a resumed run keeps an earlier attempt's points (output_dir may be object storage)
            storage.append_text(self.unlogged_path, "".join(json.dumps(row) + "\n" for row in rows))
        except OSError as error:
            return f"they are lost: writing {self.unlogged_path} failed ({error})"
        return f"they are in {self.unlogged_path} (JSON lines: run_id, key, value, timestamp, step)"


def _system_metrics_monitor(tracking_uri: str, run_id: str):
    """MLflow's own system metrics (mlflow.system_metrics), attached to the run by id from this process:
    a thread sampling every 10 s (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL), logged as system/* at steps
    that go on across a resume, stopping by itself once the run is no longer RUNNING. None (said) if it
    cannot start: training never waits on it."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor  # needs psutil

        monitor = SystemMetricsMonitor(run_id, tracking_uri=tracking_uri, resume_logging=True)
        monitor.start()
        return monitor
    except Exception as error:  # noqa: BLE001  (nothing from tracking may stop training)
        warn(f"system metrics are off for run {run_id} ({error}); set tracking.system_metrics=false to silence this")
        return None


def shown_uri(text: str) -> str:
    """A URI, or any text holding some, fit to print or log: `https://user:token@host` loses its user info."""
    return _USER_INFO.sub(rf"\1{REDACTED}@", text)


def warn(message: str) -> None:
    """To stderr (a worker's lands in Ray's logs), with user info taken out of every URI in it: MLflow's
    errors repeat the request URL, credentials included."""
    print(f"mdpo-ray: {shown_uri(message)}", file=sys.stderr, flush=True)


def is_outage(error: Exception) -> bool:
    """Unreachable, timed out, or a 5xx/429 answer: worth retrying. A 4xx is a refusal that won't heal."""
    if isinstance(error, MlflowException):
        return error.get_http_status_code() >= 500 or error.get_http_status_code() == 429
    return isinstance(error, OSError)  # requests' errors included


def sink_for(cfg: RunConfig, run_id: str | None, *, rank0: bool) -> MlflowSink | NullSink:
    """The metric sink a worker logs to: rank 0's MlflowSink for the run; a NullSink on other ranks,
    and when MLflow was unreachable as the run opened (run_id None)."""
    if not rank0 or run_id is None:
        return NullSink()
    return MlflowSink(cfg.mlflow_uri, run_id, unlogged_path=storage.join(cfg.run_location, UNLOGGED_FILE),
                      system_metrics=cfg.tracking.system_metrics)
