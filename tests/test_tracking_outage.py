"""Tracking never stops training: MLflow down at the start, down for a while, or down for good.

Real processes on 127.0.0.1 only: a port nothing listens on, and a real `mlflow server` that is
stopped and restarted on the same port and store.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager

import pytest
from mlflow.tracking import MlflowClient

from mdpo_ray.config import load_config
from mdpo_ray.tracking import mlflow_runs, sinks
from mdpo_ray.training.train_loop import Worker, train

RUN_ID = "0" * 32  # any id: nothing listens, so nothing checks it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _mlflow_server(port: int, root):
    """`mlflow server` on 127.0.0.1:port with a sqlite store under root; stopped (its whole process group) on exit."""
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--default-artifact-root", str(root / "artifacts"),
         "--workers", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120  # a loaded 2-core machine can take a minute to start it
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                assert server.poll() is None, "mlflow server exited at start"
                assert time.monotonic() < deadline, "mlflow server did not come up in 120 s"
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_dead_server_costs_seconds_warns_once_and_close_writes_every_point(tmp_path, capsys):
    unlogged = tmp_path / "run" / sinks.UNLOGGED_FILE
    sink = sinks.MlflowSink(f"http://127.0.0.1:{_free_port()}", RUN_ID, unlogged_path=unlogged)
    started = time.monotonic()
    for step in range(5):
        sink.log({"loss": 0.5 + step, "lr": 1e-3}, step)
    sink.tag("mdpo.stop_reason", "a test")
    err = capsys.readouterr().err
    assert err.count("unreachable") == 1 and "buffering metrics and retrying; training continues" in err
    assert not unlogged.exists()  # created only when something is left at the end

    sink.close()
    # The installed defaults bound it: one failed attempt on the first log, later logs wait for the
    # retry interval, one last attempt at close. MLflow's own defaults would take minutes here.
    assert time.monotonic() - started < 15
    err = capsys.readouterr().err
    assert "was unreachable at the end: 11 metric points could not be logged" in err
    assert "did not affect training: checkpoints and export are unaffected" in err and str(unlogged) in err
    rows = _rows(unlogged)
    metrics = [(r["key"], r["step"], r["value"]) for r in rows if "step" in r]
    assert sorted(metrics) == sorted((k, s, v) for s in range(5) for k, v in (("loss", 0.5 + s), ("lr", 1e-3)))
    assert {"run_id": RUN_ID, "key": "mdpo.stop_reason", "value": "a test", "tag": True} in rows


def test_a_full_buffer_drops_the_oldest_points_and_says_how_many(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # refused at once: this test is about counting
    unlogged = tmp_path / sinks.UNLOGGED_FILE
    sink = sinks.MlflowSink(f"http://127.0.0.1:{_free_port()}", RUN_ID, unlogged_path=unlogged, max_buffered=3)
    for step in range(5):
        sink.log({"loss": float(step)}, step)
    sink.close()
    assert [r["step"] for r in _rows(unlogged)] == [2, 3, 4]
    assert "2 older ones were dropped" in capsys.readouterr().err


@pytest.mark.slow  # starts an MLflow server twice
def test_an_outage_is_buffered_and_flushed_once_when_the_server_is_back(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a stopped server refuses at once; keep it quick
    port, root = _free_port(), tmp_path / "store"
    root.mkdir()
    with _mlflow_server(port, root) as uri:
        client = MlflowClient(tracking_uri=uri)
        run_id = client.create_run(client.create_experiment("outage")).info.run_id
        sink = sinks.MlflowSink(uri, run_id, unlogged_path=tmp_path / sinks.UNLOGGED_FILE, retry_every_s=0)
        sink.log({"loss": 0.0}, 0)
    assert capsys.readouterr().err == ""

    for step in (1, 2, 3):  # the server is down: each attempt fails and the points wait
        sink.log({"loss": float(step)}, step)
    assert capsys.readouterr().err.count("unreachable") == 1

    with _mlflow_server(port, root):
        sink.log({"loss": 4.0}, 4)
        assert "MLflow reachable again: flushed 4 buffered metric points" in capsys.readouterr().err
        sink.close()
        history = client.get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(s, float(s)) for s in range(5)]  # each step once
    assert not (tmp_path / sinks.UNLOGGED_FILE).exists()


def test_training_completes_and_exports_with_tracking_down(tiny_run_overrides, tmp_path, capsys):
    cfg = load_config(None, [*tiny_run_overrides, "scaling.num_workers=1"])
    sink = sinks.MlflowSink(f"http://127.0.0.1:{_free_port()}", RUN_ID,
                               unlogged_path=cfg.run_dir / sinks.UNLOGGED_FILE)
    train(cfg, Worker(sink=sink))
    sink.close()  # as launch.worker_entry does after train returns or raises
    assert (cfg.run_dir / "export" / "config.json").is_file()
    assert {r["step"] for r in _rows(cfg.run_dir / sinks.UNLOGGED_FILE) if r["key"] == "loss"} == {0, 1, 2, 3, 4}
    assert capsys.readouterr().err.count("unreachable (") == 1


def test_the_driver_runs_without_tracking_when_mlflow_is_down(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cfg = load_config(None, [f"output_dir={tmp_path}", f"tracking.mlflow_uri=http://127.0.0.1:{_free_port()}"])
    assert mlflow_runs.open_run(cfg) == (None, False)
    assert "tracking disabled for this run" in capsys.readouterr().err
    mlflow_runs.close_run(cfg, None, succeeded=True)  # nothing to close
    mlflow_runs.close_run(cfg, RUN_ID, succeeded=True)  # down at the end: a warning, not an error
    assert "could not mark MLflow run" in capsys.readouterr().err


def test_credential_like_keys_are_redacted_in_params_and_config_yaml():
    flat = {"hf_token": "hf_abc", "tracking.api_key": "k", "db.Password": "p", "aws.secret_access_key": "s",
            "loss.beta": "0.1", "eval.max_new_tokens": "8", "model.tokenizer": "/tok"}
    assert mlflow_runs.redacted_params(flat) == flat | {
        "hf_token": sinks.REDACTED, "tracking.api_key": sinks.REDACTED, "db.Password": sinks.REDACTED,
        "aws.secret_access_key": sinks.REDACTED}
    tree = {"loss": {"beta": 0.1}, "hub": {"hf_token": "hf_abc", "creds": {"apiKey": "k"}}, "tokens": [{"token": "t"}]}
    hidden = sinks.REDACTED
    assert mlflow_runs.redacted_tree(tree) == {"loss": {"beta": 0.1}, "tokens": [{"token": hidden}],
                                            "hub": {"hf_token": hidden, "creds": {"apiKey": hidden}}}


def test_user_info_in_tracking_uris_is_never_shown():
    uri = "https://alice:s3cret@mlflow.example.com/api"
    assert sinks.shown_uri(uri) == f"https://{sinks.REDACTED}@mlflow.example.com/api"
    assert sinks.shown_uri("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"
    assert sinks.shown_uri("http://host:5000") == "http://host:5000"
    assert "s3cret" not in str(mlflow_runs.redacted_params({"tracking.mlflow_uri": uri}))
    assert "s3cret" not in str(mlflow_runs.redacted_tree({"tracking": {"mlflow_uri": uri}}))
    cfg = load_config(overrides=[f"tracking.mlflow_uri={uri}"])
    assert "s3cret" not in mlflow_runs.ui_command(cfg)


def test_outage_warnings_never_show_user_info_in_the_uri(tmp_path, capsys, monkeypatch):
    """MLflow's own error text repeats the request URL, credentials included: a worker's warnings
    (kept in Ray's logs) and the driver's must not."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://alice:s3cret@127.0.0.1:{_free_port()}"
    sink = sinks.MlflowSink(uri, RUN_ID, unlogged_path=tmp_path / sinks.UNLOGGED_FILE)
    sink.log({"loss": 1.0}, 1)
    sink.close()
    cfg = load_config(None, [f"output_dir={tmp_path}", f"tracking.mlflow_uri={uri}"])
    assert mlflow_runs.open_run(cfg) == (None, False)
    mlflow_runs.close_run(cfg, RUN_ID, succeeded=True)
    err = capsys.readouterr().err
    assert err.count("unreachable") == 3 and "could not mark MLflow run" in err  # every warning was printed
    assert "s3cret" not in err and f"http://{sinks.REDACTED}@127.0.0.1" in err


def test_a_sweep_or_report_with_mlflow_down_stops_before_ray_with_the_uri_and_the_fix(tmp_path, capsys, monkeypatch):
    """A single run trains without tracking; a sweep cannot (its trials and report live in MLflow): a clear
    error, exit 2, before Ray is asked for anything. No traceback, and no credentials in the message."""
    from mdpo_ray import cli, cluster

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setattr(cluster, "init_ray", lambda **_: pytest.fail("Ray was started"))
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("name: down\nspace:\n  loss.beta: {grid: [0.1, 0.5]}\nmetric: loss\nmode: min\n")
    uri = f"http://alice:s3cret@127.0.0.1:{_free_port()}"
    overrides = ["--set", f"tracking.mlflow_uri={uri}", "--set", f"output_dir={tmp_path / 'out'}"]
    for command in ("sweep", "report"):
        assert cli.main([command, str(sweep), *overrides]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"mdpo-ray: MLflow at http://{sinks.REDACTED}@127.0.0.1") and "is unreachable" in err
        assert "tracking.mlflow_uri" in err and "s3cret" not in err and "Traceback" not in err


@contextmanager
def _refusing_server():
    """An HTTP server that answers 403 to everything: a proxy wanting credentials, say."""
    import http.server
    import threading

    class Refuse(http.server.BaseHTTPRequestHandler):
        def _refuse(self):
            self.send_response(403)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error_code": "PERMISSION_DENIED", "message": "no credentials"}')

        do_GET = do_POST = _refuse

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://alice:s3cret@127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def test_a_server_refusing_the_request_is_a_config_error_naming_the_key(tmp_path):
    from mdpo_ray.config import ConfigError

    with _refusing_server() as uri:
        cfg = load_config(None, [f"output_dir={tmp_path}", f"tracking.mlflow_uri={uri}"])
        for call in (lambda: mlflow_runs.open_run(cfg), lambda: mlflow_runs.require_reachable(cfg, "a test")):
            with pytest.raises(ConfigError, match=r"refused the request \(PERMISSION_DENIED.*check tracking.mlflow_uri") as info:
                call()
            assert "s3cret" not in str(info.value) and sinks.REDACTED in str(info.value)


def test_mlflow_down_at_a_sweeps_end_is_said_and_the_summary_points_to_mdpo_ray_report(tmp_path, capsys,
                                                                                         monkeypatch):
    """The trials are done (Tune's state is saved); closing their MLflow runs and writing the report wait
    for MLflow. Neither may raise from the sweep's end: both warn, and the summary says what to run."""
    from mdpo_ray import sweep as sweeps
    from mdpo_ray.sweep_config import load_sweep

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cfg = load_config(None, [f"output_dir={tmp_path}", f"tracking.mlflow_uri=http://127.0.0.1:{_free_port()}"])
    mlflow_runs.close_unfinished_children(cfg, RUN_ID, reason="a test")
    assert sweeps._report(cfg, RUN_ID) is None
    err = capsys.readouterr().err
    assert "could not close the sweep's unfinished trial runs" in err
    assert "report was not written" in err and "mdpo-ray report <this sweep file>" in err

    path = tmp_path / "sweep.yaml"
    path.write_text("name: late\nspace:\n  loss.beta: {grid: [0.1, 0.5]}\nmetric: loss\nmode: min\n")
    sweep, _ = load_sweep(path)
    summary = sweeps.SweepSummary(sweep=sweep, parent_run_id=RUN_ID, mlflow_uri=cfg.mlflow_uri, experiment="e",
                                  best_trial=None, best_value=None, report=None, n_trials=2, unfinished=0)
    text = sweeps.describe(summary, mlflow_runs.ui_command(cfg))
    assert "'late': 2 trials" in text and "not written (MLflow was unreachable at the end): mdpo-ray report" in text
