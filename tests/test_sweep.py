"""System tier: a sweep of 2-worker Ray Train trials whose driver is interrupted, then resumed.
(The grid-into-MLflow-and-report smoke test is tests/test_evidence.py.)"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mdpo_ray.sweep_config import load_sweep, trial_config

pytestmark = pytest.mark.slow

SWEEP = """
name: {name}
run:
  reference: precompute
  scaling: {{cpus_per_worker: 0.45}}
space:
  loss.beta: {{grid: [0.1, 0.5]}}
  loss.reject_threshold: {{grid: [0.0, -1.0]}}
metric: eval/rewards/accuracies
mode: max
"""


def _children(cfg, parent_id):
    client = MlflowClient(tracking_uri=cfg.mlflow_uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    return client, client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")


def test_interrupted_sweep_resumes_keeping_finished_trials(tiny_run_overrides, tmp_path):
    path = tmp_path / "resumable.yaml"
    path.write_text(SWEEP.format(name="resumable").replace("cpus_per_worker: 0.45", "cpus_per_worker: 0.9")
                    .replace("grid: [0.0, -1.0]", "grid: [0.0]")  # 2 trials, one at a time
                    .replace("reference: precompute", "reference: resident"))  # test_evidence covers sharing
    sets = [arg for item in [*tiny_run_overrides, "optim.max_steps=30", "checkpoint.every_steps=5"]
            for arg in ("--set", item)]
    command = [sys.executable, "-m", "mdpo_ray", "sweep", str(path), *sets]
    sweep, base = load_sweep(path, [*tiny_run_overrides, "optim.max_steps=30", "checkpoint.every_steps=5"])
    from mdpo_ray.sweep import shared_run_keys

    cfg = trial_config(base, shared_run_keys(sweep, base) | {"name": "x"})
    log = (tmp_path / "driver.log").open("w")  # a file, not a pipe: an unread pipe would block the driver
    driver = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        finished = _wait_for_finished_child(cfg, timeout=240)
        second = _wait_for(lambda: list(Path(cfg.output_dir).glob("resumable-*_00001/checkpoint_*")), timeout=120)
        os.killpg(driver.pid, signal.SIGINT)  # Ctrl-C / ray job stop: the driver goes down mid-trial
        assert driver.wait(timeout=120) == 130, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    finished_history = _loss_steps(cfg, finished)

    with (tmp_path / "resumed.log").open("w") as resumed_log:
        resumed = subprocess.run([*command, "--resume"], stdout=resumed_log, stderr=subprocess.STDOUT, timeout=400)
    assert resumed.returncode == 0, (tmp_path / "resumed.log").read_text()[-4000:]
    client, children = _children(cfg, _parent_id(cfg, "resumable"))
    assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}  # no duplicate runs
    assert _loss_steps(cfg, finished) == finished_history  # the finished trial was not run again
    assert f"resumed from {second[0].parent}" in (tmp_path / "resumed.log").read_text()  # the cut one went on
    for child in children:  # every trial reached the end; an interrupted one rewound only to its checkpoint
        steps = _loss_steps(cfg, child.info.run_id)
        assert steps[-1] == 30 and set(steps) == set(range(1, 31)), steps


def _parent_id(cfg, name):
    from mdpo_ray.report import find_sweep_parent

    return find_sweep_parent(cfg.mlflow_uri, cfg.tracking.experiment, name)


def _wait_for(probe, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError("timed out")


def _wait_for_finished_child(cfg, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            _, children = _children(cfg, _parent_id(cfg, "resumable"))
        except Exception:  # store or parent not there yet
            children = []
        done = [c.info.run_id for c in children if c.info.status == "FINISHED"]
        if done:
            return done[0]
        time.sleep(2)
    raise AssertionError("no trial finished in time")


def _loss_steps(cfg, run_id):
    client = MlflowClient(tracking_uri=cfg.mlflow_uri)
    return [m.step for m in client.get_metric_history(run_id, "loss")]
