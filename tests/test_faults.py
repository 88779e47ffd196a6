"""System tier, faults: a Train worker killed mid-run on a simulated 2-node cluster; the run restarts
from its latest checkpoint and ends where an uninterrupted run ends."""

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM

from mdpo_ray.config import load_config
from mdpo_ray.training.train_loop import Worker, train

pytestmark = pytest.mark.slow


def _train_workers() -> list[int]:
    """PIDs of Ray Train worker processes (Ray sets their title to ray::RayTrainWorker...)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
        if "RayTrainWorker" in cmdline:
            found.append(int(entry.name))
    return found


def _kill_a_worker_after(checkpoint, killed: list, deadline_s=120):
    deadline = time.time() + deadline_s
    while time.time() < deadline and not killed:
        if checkpoint.exists():
            workers = _train_workers()
            if workers:
                os.kill(workers[-1], signal.SIGKILL)  # a lost node or an OOM kill: no chance to clean up
                killed.append(workers[-1])
                return
        time.sleep(0.05)


def test_a_killed_worker_restarts_from_the_checkpoint_and_ends_like_an_uninterrupted_run(tiny_run_overrides, monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    from mdpo_ray import launch
    from mdpo_ray.cluster import RAY_ENV

    for key, value in RAY_ENV.items():
        monkeypatch.setenv(key, value)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    cluster.add_node(num_cpus=1)
    cluster.add_node(num_cpus=1)  # two "nodes", one Train worker each
    ray.init(address=cluster.address)
    overrides = [*tiny_run_overrides, "optim.max_steps=40", "checkpoint.every_steps=10", "tracking.log_every_steps=2",
                 "optim.lr=1e-3", "scaling.num_workers=2", "scaling.max_failures=2", "name=faulty"]
    cfg = load_config(None, overrides)
    killed: list[int] = []
    watcher = threading.Thread(target=_kill_a_worker_after,
                               args=(cfg.run_dir / "checkpoint_000010", killed), daemon=True)
    watcher.start()
    try:
        summary = launch.train(cfg)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert killed, "the test never killed a worker"

    client = MlflowClient(tracking_uri=cfg.mlflow_uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id], "tags.`mdpo.run_name` = 'faulty'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the same MLflow run went on
    steps = [m.step for m in client.get_metric_history(summary.mlflow_run_id, "loss")]
    assert set(steps) == {0, *range(2, 41, 2)}, steps  # no gaps; steps after the checkpoint may repeat
    assert steps[-1] == 40

    # The restarted run ends where an uninterrupted one does (same seed, data order restored).
    straight = load_config(None, [*overrides[:-1], "name=straight", "scaling.num_workers=1"])
    train(straight, Worker())
    faulted_model = AutoModelForCausalLM.from_pretrained(summary.export_dir).state_dict()
    straight_model = AutoModelForCausalLM.from_pretrained(straight.run_dir / "export").state_dict()
    for key, value in straight_model.items():
        torch.testing.assert_close(faulted_model[key], value, rtol=1e-4, atol=1e-5)
