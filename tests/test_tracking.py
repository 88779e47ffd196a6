"""What the driver writes to MLflow for the UI: against one real sqlite store per module (creating one
costs seconds: MLflow migrates its schema); no Ray, no training."""

import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mdpo_ray.config import load_config
from mdpo_ray.tracking import labels, mlflow_runs, sinks


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("store")


def _cfg(store, *overrides):
    return load_config(None, [f"output_dir={store}", *overrides])


def test_a_new_experiment_opens_as_model_development(store):
    cfg = _cfg(store, "tracking.experiment=new", "name=kind")
    run_id, _ = mlflow_runs.open_run(cfg)
    client = MlflowClient(cfg.mlflow_uri)
    experiment = client.get_experiment(client.get_run(run_id).info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_an_existing_experiment_is_tagged_unless_it_has_a_kind_of_its_own(store):
    client = MlflowClient(_cfg(store).mlflow_uri)
    untagged = client.create_experiment("untagged")
    chosen = client.create_experiment("genai", tags={"mlflow.experimentKind": "genai_development"})
    for experiment in ("untagged", "genai"):
        mlflow_runs.open_run(_cfg(store, f"tracking.experiment={experiment}", "name=kind"))
    assert client.get_experiment(untagged).tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_experiment(chosen).tags["mlflow.experimentKind"] == "genai_development"


def test_a_run_says_what_it_is_where_it_came_from_and_its_commit(store, monkeypatch):
    monkeypatch.setattr("sys.argv", ["/venv/bin/mdpo-ray", "train", "--set", "model.hf_token=hf_secret",
                                     "--set", "tracking.mlflow_uri=https://alice:pw@mlflow.example"])
    cfg = _cfg(store, "tracking.experiment=labels", "name=labelled", "loss.beta=0.3")
    tags = MlflowClient(cfg.mlflow_uri).get_run(mlflow_runs.open_run(cfg)[0]).data.tags
    assert tags["mlflow.note.content"] == (
        "minor_dpo β=0.3 τ=0 w=1 · lr 0.0001 (constant, warm-up 10) · model builtin:arith · data builtin:arith "
        "(near_miss rejected) · 100 steps × 16 pairs · 2 CPU workers · seed 0")
    assert tags["mlflow.source.name"] == ("mdpo-ray train --set model.hf_token=***REDACTED*** --set "
                                          "tracking.mlflow_uri=https://***REDACTED***@mlflow.example")
    assert tags["mlflow.source.git.commit"] == labels.git_commit(Path.cwd()) or "mlflow.source.git.commit" not in tags
    assert tags["mlflow.source.type"] == "JOB"  # the UI cuts a LOCAL source at its last '/' (a file's name)


def test_the_git_commit_is_the_checkouts_head_and_absent_outside_one(tmp_path):
    assert labels.git_commit(tmp_path) is None
    assert "mlflow.source.git.commit" not in labels.source_tags(["mdpo-ray"], tmp_path)
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert labels.git_commit(tmp_path) == head
    tags = labels.source_tags(["/x/mdpo_ray/__main__.py", "sweep", "s.yaml"], tmp_path)
    assert tags["mlflow.source.git.commit"] == head and tags["mlflow.source.name"] == "mdpo-ray sweep s.yaml"


def test_a_trial_is_named_by_its_overrides_within_mlflows_limit():
    name = labels.trial_run_name("minor_dpo", {"loss.beta": 0.1, "loss.reject_threshold": -1.0, "optim.lr": 3e-5})
    assert name == "minor_dpo b=0.1 tau=-1 lr=3e-5"
    assert labels.trial_run_name("minor_dpo", {"loss.name": "sft", "seed": 2}) == "sft seed=2"
    assert labels.trial_run_name("sft", {"seed": 2}, rounds=3) == "sft seed=2 rounds=3"  # RFT, not plain SFT
    assert labels.trial_run_name("sft", {"iterate.rounds": 0, "seed": 2}, rounds=0) == "sft rounds=0 seed=2"
    assert len(labels.trial_run_name("dpo", {f"k.x{i}": "v" * 20 for i in range(20)})) == 250


def test_a_trial_name_given_as_a_tag_renames_the_run(store):
    cfg = _cfg(store, "tracking.experiment=labels", "name=sweep-t_00001")
    client = MlflowClient(cfg.mlflow_uri)
    run_id, _ = mlflow_runs.open_run(cfg, {"mlflow.runName": "minor_dpo b=0.1 tau=-1"})
    assert client.get_run(run_id).info.run_name == "minor_dpo b=0.1 tau=-1"
    assert mlflow_runs.open_run(cfg, {"mlflow.runName": "minor_dpo b=0.1 tau=-1"})[0] == run_id  # found by mdpo.run_name


def test_a_reopened_run_drops_the_stop_reason_of_its_last_attempt(store):
    """A sweep interrupted mid-trial tags the trial stopped; resumed, it may finish: no stale reason then."""
    cfg = _cfg(store, "tracking.experiment=stops", "name=interrupted")
    client = MlflowClient(cfg.mlflow_uri)
    run_id, _ = mlflow_runs.open_run(cfg)
    client.set_tag(run_id, mlflow_runs.STOP_REASON_TAG, "stopped by the sweep")
    mlflow_runs.close_run(cfg, run_id, status="KILLED")
    assert mlflow_runs.open_run(cfg) == (run_id, True)
    assert mlflow_runs.STOP_REASON_TAG not in client.get_run(run_id).data.tags


def test_system_metrics_attach_to_the_run_from_the_workers_sink_and_stop_with_it(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    cfg = _cfg(store, "tracking.experiment=system", "name=monitored")
    run_id, _ = mlflow_runs.open_run(cfg)
    sink = sinks.sink_for(cfg, run_id, rank0=True)  # as rank 0 of a Ray Train worker group makes it
    time.sleep(0.5)
    sink.close()
    metrics = MlflowClient(cfg.mlflow_uri).get_run(run_id).data.metrics
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(metrics)
    off = sinks.sink_for(load_config(None, [f"output_dir={store}", "tracking.system_metrics=false"]), run_id,
                         rank0=True)
    assert off._monitor is None


@pytest.mark.slow  # MLflow's transformers flavor: seconds to import and save
def test_log_model_puts_the_export_in_the_run_as_a_registrable_transformers_model(store, tiny_task, capsys):
    import mlflow
    import mlflow.transformers

    cfg = _cfg(store, "tracking.experiment=models", "name=logged", "tracking.log_model=true")
    run_id, _ = mlflow_runs.open_run(cfg)
    sink = sinks.sink_for(cfg, run_id, rank0=True)
    sink.log_model(tiny_task["model"])
    sink.log_model(store / "no-such-export")  # a failure is said, and the run goes on
    sink.close()
    out = capsys.readouterr()
    assert f"runs:/{run_id}/model" in out.out
    assert "tracking.log_model: logging the export as an MLflow model failed" in out.err
    mlflow.set_tracking_uri(cfg.mlflow_uri)
    pipeline = mlflow.transformers.load_model(f"runs:/{run_id}/model")
    assert pipeline.task == "text-generation" and isinstance(pipeline("Q: 1+2= A:", max_new_tokens=2), list)
    version = mlflow.register_model(f"runs:/{run_id}/model", "mdpo-tiny")
    assert int(version.version) == 1 and version.run_id == run_id


def test_log_model_needs_a_whole_model_export():
    with pytest.raises(Exception, match="export.lora=adapter exports only the LoRA adapters"):
        load_config(None, ["tracking.log_model=true", "model.lora.r=8", "export.lora=adapter"])
