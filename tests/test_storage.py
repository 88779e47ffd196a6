"""Where a run's files go: object storage (output_dir: s3://bucket/prefix, against an S3 server on 127.0.0.1),
URIs the run cannot write to refused before Ray starts, and a local output_dir the nodes do not share
refused before training.

The S3 server is moto's (`pip install 'moto[server]'`, the test extra), a separate process speaking S3's
HTTP API: pyarrow (Ray's checkpoint uploads and mdpo_ray.storage) reaches it through AWS_ENDPOINT_URL,
as it would reach MinIO or AWS itself.
"""

import contextlib
import io
import json
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import s3_keys, s3_server

from mdpo_ray import cli, storage
from mdpo_ray.config import ConfigError, check_storage_outlives_job, load_config

BUCKET = "mdpo-test"


@pytest.fixture(scope="module")
def s3():
    with s3_server(BUCKET) as client:
        yield client


def _keys(client, prefix: str = "") -> list[str]:
    return s3_keys(client, BUCKET, prefix)


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


@pytest.mark.parametrize(("key", "value", "says"), [
    ("model.name_or_path", "s3:/bucket/models/x", "did you mean s3://bucket/models/x?"),
    ("model.reference", "gs://bucket/ref", "cannot read from gs:// storage"),
    ("data.train", "s3//bucket/train.jsonl", "did you mean s3://bucket/train.jsonl?"),
])
def test_a_model_or_data_uri_the_run_cannot_read_is_refused_naming_the_key(key, value, says):
    with pytest.raises(ConfigError, match=rf"{key}: .*{says}.*s3://bucket/key"):
        load_config(None, [f"{key}={value}"])
    assert load_config(None, ["model.name_or_path=s3://bucket/models/x/"]).model.name_or_path == "s3://bucket/models/x"


def test_an_unwritable_bucket_is_said_before_ray_starts(s3):
    missing = load_config(None, ["output_dir=s3://no-such-bucket/runs", "tracking.mlflow_uri=http://127.0.0.1:9"])
    with pytest.raises(ConfigError, match=r"output_dir \(s3://no-such-bucket/runs\) cannot be written to: .*"
                                          r"NO_SUCH_BUCKET.*AWS_ENDPOINT_URL"):
        check_storage_outlives_job(missing)
    check_storage_outlives_job(load_config(None, [f"output_dir=s3://{BUCKET}/probe",
                                                  "tracking.mlflow_uri=http://127.0.0.1:9"]))
    assert _keys(s3, "probe") == []  # the probe cleans up after itself


# --- the files a run writes, on object storage ---------------------------------------------------------

@contextlib.contextmanager
def _slow_store(endpoint: str, delay_s: float, when: bytes):
    """A TCP relay to `endpoint` that holds back each request containing `when` for `delay_s`: a store busy
    enough that its answer starts late."""
    host, port = endpoint.rsplit("/", 1)[-1].split(":")
    listener = socket.create_server(("127.0.0.1", 0))

    def pipe(source, sink, slow):
        try:
            while data := source.recv(65536):
                if slow and when in data:
                    time.sleep(delay_s)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            sink.close()

    def serve():
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection((host, int(port)))
            threading.Thread(target=pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=pipe, args=(upstream, client, False), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


def test_a_store_slow_to_answer_is_waited_for_by_the_run_and_by_ray(s3, monkeypatch):
    """The AWS SDK's default cuts a request whose answer has not started within 3 s; Tune's last listing of a
    sweep on a loaded S3-compatible store failed so. Ray is given the run's own filesystem (the one every
    mdpo_ray.storage call uses), with longer timeouts."""
    import pyarrow.fs

    storage.write_bytes(f"s3://{BUCKET}/slow/a.bin", b"a")
    with _slow_store(os.environ["AWS_ENDPOINT_URL"], delay_s=4.5, when=b"list-type=2") as url:
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        path, fs = storage.for_ray(f"s3://{BUCKET}/slow")
        assert path == f"{BUCKET}/slow" and isinstance(fs, pyarrow.fs.S3FileSystem)
        assert [info.base_name for info in fs.get_file_info(pyarrow.fs.FileSelector(path))] == ["a.bin"]
    assert storage.for_ray("runs/x") == ("runs/x", None)


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


def test_a_model_and_data_on_object_storage_load_from_one_copy_per_node(s3, tiny_task, tmp_path, monkeypatch):
    """model.name_or_path and data.train may be s3:// URIs: what transformers and datasets read is a copy on the
    node, fetched once (the config and tokenizer without the weights), fetched again when the objects change."""
    from mdpo_ray.config import DataConfig, ModelConfig
    from mdpo_ray.data.check import check_pairs
    from mdpo_ray.data.rows import DataError, read_rows
    from mdpo_ray.training import model as model_lib

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "node"))  # this "node's" temp dir
    storage.upload_dir(tiny_task["model"], f"s3://{BUCKET}/models/tiny")
    storage.write_bytes(f"s3://{BUCKET}/data/train.jsonl", tiny_task["train"].read_bytes())
    remote = ModelConfig(name_or_path=f"s3://{BUCKET}/models/tiny")

    model = model_lib.load_causal_lm(remote, trainable=False)
    local = model_lib.load_causal_lm(ModelConfig(name_or_path=str(tiny_task["model"])), trainable=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), local.state_dict().values(), strict=True))
    assert model_lib.load_tokenizer(remote).encode("12+3=") == model_lib.load_tokenizer(
        ModelConfig(name_or_path=str(tiny_task["model"]))).encode("12+3=")
    full, light = storage.staged(remote.name_or_path), storage.staged(remote.name_or_path, weights=False)
    assert (Path(full) / "model.safetensors").exists() and not (Path(light) / "model.safetensors").exists()
    before = (Path(full) / ".complete").stat().st_mtime_ns
    assert storage.staged(remote.name_or_path) == full and (Path(full) / ".complete").stat().st_mtime_ns == before

    assert len(read_rows(f"s3://{BUCKET}/data/train.jsonl", "train")) == 48
    line, = check_pairs(DataConfig(train=f"s3://{BUCKET}/data/train.jsonl", eval=None), workers_here=False,
                        tokenizer=lambda: model_lib.load_tokenizer(remote))
    assert line.startswith(f"data.train: s3://{BUCKET}/data/train.jsonl: 48 rows")
    storage.write_bytes(f"s3://{BUCKET}/data/train.jsonl", b'{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n')
    assert len(read_rows(f"s3://{BUCKET}/data/train.jsonl", "train")) == 1  # written again: fetched again
    with pytest.raises(DataError, match=f"data file not found: s3://{BUCKET}/data/nope.jsonl"):
        read_rows(f"s3://{BUCKET}/data/nope.jsonl", "train")
    storage.write_bytes(f"s3://{BUCKET}/data/bad.jsonl", b'{"prompt": "1+1=",\n')
    with pytest.raises(DataError, match=f"could not read s3://{BUCKET}/data/bad.jsonl"):
        read_rows(f"s3://{BUCKET}/data/bad.jsonl", "train")


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


def test_a_sweep_on_object_storage_keeps_its_trials_and_report_there(s3, tmp_path):
    """Every trial's output_dir (so its run dir and the shared reference_logps/) is under the sweep's prefix,
    and the report is written locally, then uploaded there."""
    from mlflow.tracking import MlflowClient

    from mdpo_ray import sweep as sweeps
    from mdpo_ray.sweep_config import SweepConfig, trial_config

    sweep = SweepConfig.model_validate({"name": "grid", "space": {"loss.beta": {"grid": [0.1, 0.2]}},
                                        "metric": "eval/rewards/accuracies"})
    base = {"output_dir": f"s3://{BUCKET}/runs", "tracking": {"mlflow_uri": f"sqlite:///{tmp_path}/mlflow.db"}}
    shared = sweeps.shared_run_keys(sweep, base)
    assert shared["output_dir"] == f"s3://{BUCKET}/runs/grid"
    cfg = trial_config(base, shared | {"name": "grid-t0"})
    assert cfg.run_location == f"s3://{BUCKET}/runs/grid/grid-t0"

    client = MlflowClient(tracking_uri=cfg.mlflow_uri)
    experiment = client.create_experiment(cfg.tracking.experiment, artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(experiment, tags={"mdpo.sweep": "grid", "mdpo.metric": sweep.metric,
                                                 "mdpo.mode": "max", "mdpo.search_keys": "loss.beta"}).info.run_id
    for trial, (beta, accuracy) in enumerate([(0.1, 0.6), (0.2, 0.8)]):
        run = client.create_run(experiment, tags={"mlflow.parentRunId": parent, "mdpo.sweep": "grid",
                                                  "mdpo.trial_id": f"t{trial}", "override.loss.beta": str(beta)})
        client.log_metric(run.info.run_id, sweep.metric, accuracy, step=10)
        client.set_terminated(run.info.run_id)
    report = sweeps.write_sweep_report(cfg, parent)
    assert report.best_trial_id == "t1" and report.markdown_path == f"s3://{BUCKET}/runs/grid/report/trials.md"
    assert {"runs/grid/report/trials.md", "runs/grid/report/trials.html", "runs/grid/report/trials.csv"} <= set(
        _keys(s3, "runs/grid/report/"))
    assert b"| t1 |" in storage.read_bytes(report.markdown_path)
    assert not _colon_dirs(tmp_path, Path.cwd())


# --- through Ray ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_with_s3(s3):
    """A local Ray instance started after the AWS settings are set, so its workers inherit them (on a
    cluster: the nodes' instance profile, or the job's runtime_env env_vars)."""
    import ray

    from mdpo_ray import cluster

    ray.shutdown()
    cluster.init_ray(use_gpu=False)
    yield s3
    ray.shutdown()


@pytest.mark.slow
def test_a_run_into_object_storage_checkpoints_exports_and_resumes_from_there(ray_with_s3, tiny_run_overrides,
                                                                               tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForCausalLM

    from mdpo_ray import launch

    s3 = ray_with_s3
    monkeypatch.chdir(tmp_path)  # a URI taken for a relative path would land here
    overrides = [*tiny_run_overrides, f"output_dir=s3://{BUCKET}/runs", f"tracking.mlflow_uri=sqlite:///{tmp_path}/mlflow.db",
                 "name=s3-run", "scaling.num_workers=2", "reference=precompute", "optim.max_steps=2",
                 "checkpoint.every_steps=2"]
    cfg = load_config(None, overrides)
    check_storage_outlives_job(cfg)
    first = launch.train(cfg)
    run = f"runs/{cfg.name}"
    assert first.checkpoint == f"s3://{BUCKET}/{run}/checkpoint_000002"
    assert first.export_dir == f"s3://{BUCKET}/{run}/export"
    keys = _keys(s3, "runs/")
    assert {f"{run}/checkpoint_000002/{f}" for f in (".metadata", "__0_0.distcp", "__1_0.distcp",
                                                      "trainer_state.json")} <= set(keys)
    assert {f"{run}/export/{f}" for f in ("config.json", "model.safetensors", "tokenizer.json")} <= set(keys)
    cached = [k for k in keys if k.startswith("runs/reference_logps/")]
    assert len(cached) == 3, keys  # train and eval tables, and the step-0 greedy answers

    # Same name, more steps: Ray finds the checkpoint in the bucket, and the run goes on from step 2.
    longer = launch.train(load_config(None, [*overrides, "optim.max_steps=4"]))
    client = MlflowClient(tracking_uri=cfg.mlflow_uri)
    assert longer.mlflow_run_id == first.mlflow_run_id
    assert [m.step for m in client.get_metric_history(longer.mlflow_run_id, "loss")] == [0, 1, 2, 3, 4]
    tags = client.get_run(longer.mlflow_run_id).data.tags
    assert tags["mdpo.reference_cache"] == "reused,reused" and tags["mdpo.export_uri"] == longer.export_dir
    assert longer.checkpoint == f"s3://{BUCKET}/{run}/checkpoint_000004"
    assert f"{run}/checkpoint_000004/.metadata" in _keys(s3, run)
    assert str(longer.export_dir) in launch.describe(longer)

    storage.download_dir(longer.export_dir, tmp_path / "export")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    assert not _colon_dirs(tmp_path, Path.cwd(), Path(__file__).parents[1] / "mdpo_runs")


@pytest.mark.slow
def test_a_local_output_dir_the_nodes_do_not_share_stops_every_rank_before_training_and_is_not_retried(
        ray_with_s3, tiny_run_overrides, tmp_path):
    """Two Train workers stand for two nodes with their own local disks: the same output_dir path is a
    different directory on each, here root/node<rank>. First both check a directory they do share (it
    passes and leaves nothing behind); then the training loop itself stops on every rank before anything
    is written, Ray does not restart the workers though max_failures allows it, and the driver gets the
    ConfigError that names output_dir and both fixes."""
    import ray.train

    from mdpo_ray import cluster, launch

    (tmp_path / "attempts").mkdir()

    def two_nodes(config):
        from mdpo_ray.training import distributed
        from mdpo_ray.training.train_loop import Worker, train

        root, rank = Path(config["root"]), ray.train.get_context().get_world_rank()
        (root / "attempts" / f"{rank}-{os.getpid()}").touch()
        distributed.check_shared_directory(root / "shared", key="output_dir")
        if rank == 0:  # rank 0 removes its marker; the other rank may look before it has
            assert not list((root / "shared").iterdir())
        train(load_config(None, [*config["overrides"], f"output_dir={root / f'node{rank}'}"]), Worker())

    trainer = cluster.trainer(
        two_nodes, train_loop_config={"root": str(tmp_path), "overrides": [*tiny_run_overrides, "scaling.num_workers=2"]},
        scaling_config=ray.train.ScalingConfig(num_workers=2),
        run_config=ray.train.RunConfig(name="not-shared", storage_path=str(tmp_path / "ray"),
                                       failure_config=ray.train.FailureConfig(max_failures=3),
                                       callbacks=[launch._StopOnConfigError()]))
    with pytest.raises(ConfigError) as refused:
        launch._fit(trainer)
    message = str(refused.value)
    assert type(refused.value).__name__ == "StorageNotSharedError"
    assert "is not shared by the nodes of this run" in message and "rank(s) 1 of 2 cannot see" in message
    assert "shared filesystem path" in message and "s3://bucket/prefix" in message
    assert len(list((tmp_path / "attempts").iterdir())) == 2  # one attempt of two workers: not retried
    assert list((tmp_path / "node0").iterdir()) == []  # rank 0 made the directory; its marker is gone
    assert not (tmp_path / "node1").exists()  # the other node's disk was never written
