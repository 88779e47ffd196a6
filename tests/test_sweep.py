"""System tier: a sweep whose driver is interrupted, then resumed, with 1-worker trials that train inside their
Tune trial process (launch.train_in_process), which Tune itself restores from the trial's last checkpoint; the
driver leaves no process of its local Ray instance behind. (The grid-into-MLflow-and-report smoke test is
tests/test_evidence.py.) A trial of Ray Train workers resumes through launch.train's own resume from its run
dir (tests/test_jobs.py, tests/test_ray_run.py) and spreads over nodes in tests/test_multinode.py: its
variant here cost two minutes of a suite that must stay under fifteen."""

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


def test_interrupted_sweep_resumes_keeping_finished_trials(tiny_run_overrides, tmp_path, own_ray):
    path = tmp_path / "resumable.yaml"
    path.write_text(SWEEP.format(name="resumable").replace("cpus_per_worker: 0.45", "cpus_per_worker: 1.5")  # one at a time
                    .replace("grid: [0.0, -1.0]", "grid: [0.0]")
                    .replace("reference: precompute", "reference: resident"))  # test_evidence covers sharing
    steps = 30  # an in-trial step is quick: enough of them to interrupt one mid-run
    overrides = [*tiny_run_overrides, f"optim.max_steps={steps}", "checkpoint.every_steps=5", "scaling.num_workers=1"]
    command = [sys.executable, "-m", "mdpo_ray", "sweep", str(path), *[a for o in overrides for a in ("--set", o)]]
    sweep, base = load_sweep(path, overrides)
    from mdpo_ray.sweep import shared_run_keys
    from mdpo_ray.sweep_trial import _in_trial

    cfg = trial_config(base, shared_run_keys(sweep, base) | {"name": "x"})
    assert _in_trial(sweep, cfg)
    log = (tmp_path / "driver.log").open("w")  # a file, not a pipe: an unread pipe would block the driver
    driver = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=own_ray.env)
    try:
        finished = _wait_for_finished_child(cfg, timeout=240)
        # The second trial's second checkpoint (in Tune's trial dir):
        # by then the driver has registered the first; a checkpoint the driver has not yet seen is not resumed.
        second = _wait_for(lambda: sorted(Path(cfg.output_dir).parent.glob("**/*_00001*/checkpoint_*"))[1:], timeout=120)
        os.killpg(driver.pid, signal.SIGINT)  # Ctrl-C / ray job stop: the driver goes down mid-trial
        assert driver.wait(timeout=120) == 130, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert own_ray.processes() == []  # nothing of the interrupted sweep's Ray instance is left behind
    finished_history = _loss_steps(cfg, finished)

    with (tmp_path / "resumed.log").open("w") as resumed_log:
        resumed = subprocess.run([*command, "--resume"], stdout=resumed_log, stderr=subprocess.STDOUT, timeout=400,
                                 check=False, env=own_ray.env)
    assert resumed.returncode == 0, (tmp_path / "resumed.log").read_text()[-4000:]
    assert own_ray.processes() == []  # nor of the finished one's
    _, children = _children(cfg, _parent_id(cfg, "resumable"))
    assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}  # no duplicate runs
    assert _loss_steps(cfg, finished) == finished_history  # the finished trial was not run again
    assert f"resumed from {second[0].parent}" in (tmp_path / "resumed.log").read_text()  # the cut one went on
    for child in children:  # every trial reached the end; an interrupted one rewound only to its checkpoint
        logged = _loss_steps(cfg, child.info.run_id)
        assert logged[-1] == steps and set(logged) == set(range(steps + 1)), logged  # 0: the untrained policy
        assert logged.count(1) == 1 and logged.count(0) == 1, logged  # not restarted from scratch: steps before the checkpoint ran once


def _parent_id(cfg, name):
    from mdpo_ray.reports.trials import find_sweep_parent

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
        except Exception:  # noqa: BLE001 - the store or the parent run is not there yet
            children = []
        done = [c.info.run_id for c in children if c.info.status == "FINISHED"]
        if done:
            return done[0]
        time.sleep(2)
    raise AssertionError("no trial finished in time")


def _loss_steps(cfg, run_id):
    client = MlflowClient(tracking_uri=cfg.mlflow_uri)
    return [m.step for m in client.get_metric_history(run_id, "loss")]
