"""Where a run's files go: object storage (output_dir: s3://bucket/prefix, against an S3 server on 127.0.0.1),
URIs the run cannot write to refused before Ray starts, and a local output_dir the nodes do not share
refused before training.

The S3 server is moto's (`pip install 'moto[server]'`, the test extra), a separate process speaking S3's
HTTP API: pyarrow (Ray's checkpoint uploads and mdpo_ray.storage) reaches it through AWS_ENDPOINT_URL,
as it would reach MinIO or AWS itself.
"""

import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import torch

from mdpo_ray import cli, storage
from mdpo_ray.config import ConfigError, check_storage_outlives_job, load_config

BUCKET = "mdpo-test"


@pytest.fixture(scope="module")
def s3():
    """An S3 server on 127.0.0.1 with one bucket; the AWS settings point this process (and a Ray instance
    it starts, whose workers inherit them) at it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, server.stderr.read().decode()[-2000:]
            time.sleep(0.2)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        yield client
    server.terminate()
    server.wait(timeout=30)


def _keys(client, prefix: str = "") -> list[str]:
    """The objects under `prefix`, less the empty `dir/` markers pyarrow writes to make directories."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []) if not obj["Key"].endswith("/"))


def _colon_dirs(*roots: Path) -> list[Path]:
    """Anything local named like a mangled URI (s3:, gs:): what the run must never write."""
    return [p for root in roots for p in root.rglob("*") if ":" in p.name]


# --- refused before Ray starts ------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "says"), [
    ("gs://bucket/runs", "cannot write to gs://"),
    ("foo://bucket/runs", "cannot write to foo://"),
    ("file:///tmp/runs", "here: /tmp/runs"),
    ("s3:/bucket/runs", "did you mean s3://bucket/runs?"),
    ("s3//bucket/runs", "did you mean s3://bucket/runs?"),
    ("s3:bucket", "did you mean s3://bucket?"),
    ("s3://", "not an S3 location"),
    ("s3:///runs", "not an S3 location"),
    ("s3://Bucket/runs", "not an S3 location"),
    ("s3://bucket//runs", "not an S3 location"),
])
def test_an_output_dir_the_run_cannot_write_to_exits_2_naming_it(value, says, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = cli.main(["train", "--set", f"output_dir={value}", "--set", "tracking.mlflow_uri=http://127.0.0.1:9"])
    err = capsys.readouterr().err
    assert code == 2
    assert "output_dir:" in err and says in err and "s3://bucket/prefix" in err
    assert not list(tmp_path.iterdir())  # no folder named s3: (or anything else)


def test_object_storage_needs_an_mlflow_uri_of_its_own():
    with pytest.raises(ConfigError, match=r"output_dir is object storage .* set tracking.mlflow_uri"):
        load_config(None, ["output_dir=s3://bucket/runs"])
    cfg = load_config(None, ["output_dir=s3://bucket/runs/", "tracking.mlflow_uri=http://mlflow.internal:5000"])
    assert cfg.output_dir == "s3://bucket/runs" and cfg.run_location == f"s3://bucket/runs/{cfg.name}"
    with pytest.raises(ValueError, match="use run_location"):
        cfg.run_dir  # noqa: B018  (no code may take a URI for a local path)


def test_an_unwritable_bucket_is_said_before_ray_starts(s3):
    missing = load_config(None, ["output_dir=s3://no-such-bucket/runs", "tracking.mlflow_uri=http://127.0.0.1:9"])
    with pytest.raises(ConfigError, match=r"output_dir \(s3://no-such-bucket/runs\) cannot be written to: .*"
                                          r"NO_SUCH_BUCKET.*AWS_ENDPOINT_URL"):
        check_storage_outlives_job(missing)
    check_storage_outlives_job(load_config(None, [f"output_dir=s3://{BUCKET}/probe",
                                                  "tracking.mlflow_uri=http://127.0.0.1:9"]))
    assert _keys(s3, "probe") == []  # the probe cleans up after itself


# --- the files a run writes, on object storage ---------------------------------------------------------

def test_files_round_trip_through_the_object_store(s3, tmp_path):
    base = f"s3://{BUCKET}/files"
    storage.write_bytes(storage.join(base, "a", "one.bin"), b"one")
    assert storage.read_bytes(f"{base}/a/one.bin") == b"one" and storage.is_file(f"{base}/a/one.bin")
    assert storage.exists(f"{base}/a") and not storage.is_file(f"{base}/a") and not storage.exists(f"{base}/b")
    storage.append_text(f"{base}/log.jsonl", "1\n")
    storage.append_text(f"{base}/log.jsonl", "2\n")
    assert storage.read_bytes(f"{base}/log.jsonl") == b"1\n2\n"
    with storage.local_dir(f"{base}/export") as out:
        (out / "sub").mkdir()
        (out / "sub" / "w.txt").write_text("w")
        (out / "config.json").write_text("{}")
    assert _keys(s3, "files/export") == ["files/export/config.json", "files/export/sub/w.txt"]
    storage.download_dir(f"{base}/export", tmp_path / "back")
    assert (tmp_path / "back" / "sub" / "w.txt").read_text() == "w"
    assert storage.display("mdpo-test/runs/x/checkpoint_000002", base) == "s3://mdpo-test/runs/x/checkpoint_000002"
    assert not _colon_dirs(tmp_path, Path.cwd())


def test_reference_cache_on_object_storage_is_computed_once_then_reused(s3):
    """Sweep trials share one table through output_dir/reference_logps: the first computes it, the rest read it."""
    from mdpo_ray.training import distributed
    from mdpo_ray.training.reference import load_or_compute

    distributed.ensure_process_group()
    cache = f"s3://{BUCKET}/sweep/reference_logps/key.pt"
    calls = []
    table, reused = load_or_compute(cache, lambda: calls.append(1) or torch.arange(6.0).reshape(3, 2))
    again, reused_again = load_or_compute(cache, lambda: calls.append(1) or torch.zeros(3, 2))
    assert (reused, reused_again, len(calls)) == (False, True, 1)
    assert torch.equal(again, table) and torch.equal(torch.load(io.BytesIO(storage.read_bytes(cache))), table)


def test_metrics_mlflow_never_got_are_kept_beside_a_run_on_object_storage(s3):
    from mlflow.entities import Metric

    from mdpo_ray.tracking.sinks import MlflowSink

    location = f"s3://{BUCKET}/unlogged/run/unlogged_metrics.jsonl"
    for step in (1, 2):  # a run and its resumed attempt
        sink = MlflowSink("http://127.0.0.1:9", "run-id", unlogged_path=location)
        assert "they are in" in sink._write([Metric("loss", 0.5, 0, step)])
    rows = [json.loads(line) for line in storage.read_bytes(location).decode().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]


def test_a_sweep_on_object_storage_keeps_its_trials_and_report_there():
    from mdpo_ray import sweep as sweeps
    from mdpo_ray.sweep_config import SweepConfig

    sweep = SweepConfig.model_validate({"name": "grid", "space": {"loss.beta": {"grid": [0.1, 0.2]}}})
    base = {"output_dir": "s3://bucket/runs", "tracking": {"mlflow_uri": "http://mlflow.internal:5000"}}
    assert sweeps.shared_run_keys(sweep, base)["output_dir"] == "s3://bucket/runs/grid"
