"""MLflow on the driver: it owns a run's lifecycle; the workers only append metrics (mdpo_ray.tracking.sinks).

The driver opens (or, for a re-run with the same run name, reopens) the MLflow run before any worker
starts and closes it as FINISHED or FAILED whatever happens to the workers, so a run is never left
RUNNING. Params and the config.yaml artifact are logged with credentials redacted. A server down at
the start disables tracking for the run; the run trains either way.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from mdpo_ray.config import ConfigError, RunConfig, flatten
from mdpo_ray.tracking import labels
from mdpo_ray.tracking.sinks import REDACTED, is_outage, shown_uri, warn

# Tag names: written here and by the sweep driver, read by the report.
RUN_NAME_TAG = "mdpo.run_name"
SWEEP_TAG = "mdpo.sweep"
ROLE_TAG = "mdpo.role"  # "sweep" on a sweep's parent run, "iterate" on an iterate run's
ITERATE_ROUND_TAG = "mdpo.iterate_round"  # on an iterate run's round (a child run): its index, from 0
SEARCH_KEYS_TAG = "mdpo.search_keys"  # comma-separated dotted keys
METRIC_TAG = "mdpo.metric"
MODE_TAG = "mdpo.mode"
TRIAL_TAG = "mdpo.trial_id"
STOP_REASON_TAG = "mdpo.stop_reason"
BEST_TRIAL_TAG = "mdpo.best_trial"  # on a sweep's parent run: the best trial's run id
EXPORT_PATH_TAG, EXPORT_URI_TAG = "mdpo.export_path", "mdpo.export_uri"  # the final export, on rank 0's node
# Where the latest (re)start of the worker group ran: "<Ray node id>:<ranks>;..." (set again on each restart)
WORKER_NODES_TAG = "mdpo.worker_nodes"
OVERRIDE_PREFIX = "override."  # one tag per searched key on each trial run
# The experiment's kind, as the UI's ExperimentKind enum writes it (mlflow/server/js;
# "custom_model_development" is shown as "Machine learning"): a UI that opens an experiment by its kind
# shows runs, metric charts and params, not the GenAI pages (traces, evaluations). MLflow 3.17's UI
# follows its own GenAI / Model training switch instead (top left; GenAI in a new browser, then
# remembered), so the printed hint asks the user to pick Model training once.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
MODEL_TRAINING_SWITCH = "and pick 'Model training' in the switch at the top left (once)"
# A key ending like a credential (hf_token, api_key, db_password) is never logged; max_new_tokens is.
SECRET_KEY = re.compile(r"(token|secret|password|passwd|api_?key|access_?key|secret_?key|private_?key|credentials?)$",
                        re.IGNORECASE)
_BATCH = 100  # MLflow's log_batch limit on params per call (1000 on metrics)


def redacted_params(flat: dict[str, str]) -> dict[str, str]:
    """Dotted params whose last segment looks like a credential, with the value replaced by REDACTED;
    user info in URIs removed."""
    return {key: REDACTED if _is_secret(key) else shown_uri(value)
            for key, value in flat.items()}


def _is_secret(dotted_key: str) -> bool:
    return bool(SECRET_KEY.search(dotted_key.rsplit(".", 1)[-1]))


def redacted_argv(argv: list[str]) -> list[str]:
    """A command line fit to log: `--set model.hf_token=...` loses its value, URIs their user info."""
    out = []
    for arg in argv:
        key, sep, _ = arg.partition("=")
        out.append(f"{key}={REDACTED}" if sep and _is_secret(key) else shown_uri(arg))
    return out


def source_tags() -> dict[str, str]:
    """mlflow.source.* of this process's command (and its working directory's git commit, if any)."""
    return labels.source_tags(redacted_argv(sys.argv))


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
        if EXPERIMENT_KIND_TAG not in experiment.tags:  # a kind the user chose is theirs to keep
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return experiment.experiment_id
    # A local sqlite store keeps artifacts beside its file, absolute, whatever the process cwd; a
    # tracking server decides for itself.
    uri = cfg.mlflow_uri
    location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri() \
        if uri.startswith("sqlite:///") else None
    return client.create_experiment(cfg.tracking.experiment, artifact_location=location,
                                    tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})


def open_run(cfg: RunConfig, tags: dict[str, str] | None = None) -> tuple[str | None, bool]:
    """(run_id, resumed): the existing run with this run name, reopened, or a new one.

    The run's description (`mlflow.note.content`) and source tags are set on it either way, and so are
    `tags` (e.g. a sweep's `mlflow.parentRunId`, trial id, run name and source), which win. With MLflow
    unreachable: a warning and (None, False), and the run trains without tracking.
    """
    client, run_id, logged = _client(cfg), None, None
    tags = {labels.NOTE_TAG: labels.run_description(cfg)} | source_tags() | (tags or {})
    try:
        run_id, logged = _find_or_create_run(client, _experiment_id(client, cfg), cfg.name, {RUN_NAME_TAG: cfg.name})
        _log_run_config(client, run_id, cfg, tags, logged or {})
    except Exception as error:
        if not is_outage(error):
            raise _refused(cfg, error) from error
        consequence = (f"the params and config of run {run_id} were not logged; its metrics will be buffered"
                       if run_id else "tracking disabled for this run: nothing will be logged to MLflow")
        warn(f"MLflow at {cfg.mlflow_uri} unreachable ({error}); {consequence}; training continues")
    return run_id, logged is not None


def require_reachable(cfg: RunConfig, why: str) -> None:
    """A ConfigError unless MLflow answers, for what cannot go on without it (a sweep, a report); a
    single run trains without it instead. Read-only: it creates nothing."""
    try:
        _client(cfg).get_experiment_by_name(cfg.tracking.experiment)
    except Exception as error:
        if not is_outage(error):
            raise _refused(cfg, error) from error
        raise ConfigError(f"MLflow at {shown_uri(cfg.mlflow_uri)} is unreachable ({shown_uri(str(error))}): {why}; "
                          "start the server, or point tracking.mlflow_uri at one (--set tracking.mlflow_uri=...)"
                          ) from error


def _refused(cfg: RunConfig, error: Exception) -> ConfigError:
    """A 4xx: a wrong URI, a server that is not MLflow, or missing credentials; retrying will not help."""
    return ConfigError(f"MLflow at {shown_uri(cfg.mlflow_uri)} refused the request ({shown_uri(str(error))}): check "
                       "tracking.mlflow_uri, and the credentials if the server needs them (MLFLOW_TRACKING_USERNAME/"
                       "MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN)")


def _find_or_create_run(client: MlflowClient, experiment_id: str, run_name: str,
                        identity: dict[str, str]) -> tuple[str, dict[str, str] | None]:
    """(run_id, params already logged): the newest run carrying the `identity` tags, reopened, or a new
    one (params None)."""
    query = " and ".join(f"tags.`{key}` = '{value}'" for key, value in identity.items())
    found = client.search_runs([experiment_id], filter_string=query, order_by=["attributes.start_time DESC"],
                               max_results=1)
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        if STOP_REASON_TAG in found[0].data.tags:  # why the last attempt stopped; this one says so if it stops too
            client.delete_tag(found[0].info.run_id, STOP_REASON_TAG)
        return found[0].info.run_id, found[0].data.params
    return client.create_run(experiment_id, run_name=run_name, tags=identity).info.run_id, None


def _log_run_config(client: MlflowClient, run_id: str, cfg: RunConfig, tags: dict[str, str],
                    logged: dict[str, str]) -> None:
    client.log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()])
    _log_params(client, run_id, redacted_params(flatten(cfg)), logged)
    client.log_text(run_id, yaml.safe_dump(redacted_tree(cfg.model_dump(mode="json")), sort_keys=False), "config.yaml")


def _log_params(client: MlflowClient, run_id: str, params: dict[str, str], logged: dict[str, str]) -> None:
    """MLflow params are immutable: a re-run logs keys it lacks and records what changed in a tag."""
    fresh = [Param(k, v[:6000]) for k, v in params.items() if k not in logged]
    for start in range(0, len(fresh), _BATCH):
        client.log_batch(run_id, params=fresh[start : start + _BATCH])
    changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v[:6000])
    if changed:
        client.set_tag(run_id, "mdpo.changed_on_resume", ",".join(changed)[:5000])


def log_metrics(cfg: RunConfig, run_id: str | None, metrics: dict[str, float], *, step: int) -> None:
    """Metrics the driver logs itself (an iterate run's per-round figures); with MLflow down, a warning."""
    if run_id is None or not metrics:
        return
    now = int(time.time() * 1000)
    try:
        _client(cfg).log_batch(run_id, metrics=[Metric(key, float(value), now, step) for key, value in metrics.items()])
    except Exception as error:
        if not is_outage(error):
            raise
        warn(f"MLflow at {cfg.mlflow_uri} unreachable ({error}); metrics of step {step} not logged to run {run_id}")


def close_run(cfg: RunConfig, run_id: str | None, *, succeeded: bool = False, status: str | None = None) -> None:
    """FINISHED or FAILED (or an explicit status such as KILLED); if MLflow is down by now, a warning:
    the training's outcome stands either way."""
    if run_id is None:
        return
    status = status or ("FINISHED" if succeeded else "FAILED")
    try:
        _client(cfg).set_terminated(run_id, status=status)
    except Exception as error:  # noqa: BLE001  (raising here would hide the run's own outcome)
        warn(f"could not mark MLflow run {run_id} {status} at {cfg.mlflow_uri} ({error}); it may show RUNNING "
             f"there; the run itself ended {status}")


def open_sweep_run(cfg: RunConfig, sweep_name: str, *, tags: dict[str, str], params: dict[str, str],
                   sweep_yaml: str) -> str:
    """The sweep's parent run (reopened on --resume); trials attach to it with mlflow.parentRunId.
    `params`: the search space, which the runs table shows beside the trials' params."""
    client = _client(cfg)
    run_id, logged = _find_or_create_run(client, _experiment_id(client, cfg), sweep_name,
                                         {SWEEP_TAG: sweep_name, ROLE_TAG: "sweep"})
    client.log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()])
    _log_params(client, run_id, {key: shown_uri(value) for key, value in params.items()}, logged or {})
    client.log_text(run_id, sweep_yaml, "sweep.yaml")
    return run_id


def close_unfinished_children(cfg: RunConfig, parent_run_id: str, *, reason: str) -> None:
    """Trials that Tune ended (ASHA, an interrupted driver) never reached their own close: do it here.
    With MLflow down by now, a warning: the sweep's outcome stands either way."""
    client = _client(cfg)
    try:
        children = client.search_runs([_experiment_id(client, cfg)],
                                      f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.status = 'RUNNING'")
        for child in children:
            client.set_tag(child.info.run_id, STOP_REASON_TAG, reason)
            client.set_terminated(child.info.run_id, status="KILLED")
    except Exception as error:  # noqa: BLE001  (raising here, in the sweep's finally, would hide its outcome)
        warn(f"could not close the sweep's unfinished trial runs at {cfg.mlflow_uri} ({error}); they may "
             "show RUNNING there")


def ui_command(cfg: RunConfig) -> str:
    if cfg.mlflow_uri.startswith("sqlite:///"):  # a local store: the UI has to be started
        return (f"mlflow ui --backend-store-uri {cfg.mlflow_uri} --port 5000  # then http://127.0.0.1:5000, "
                f"{MODEL_TRAINING_SWITCH}")
    return f"open {shown_uri(cfg.mlflow_uri)} (experiment {cfg.tracking.experiment!r}) {MODEL_TRAINING_SWITCH}"
