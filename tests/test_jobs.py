"""System tier, jobs: a real local head with the dashboard and job server; `ray job submit` of
`mdpo-ray train`, `ray job stop` mid-run, and the same command re-submitted resumes to the end; a
relative output_dir, which would be written into Ray's copy of the working dir, is refused first."""

import json
import os
import shutil
import socket
import subprocess
import time

import pytest
from mlflow.tracking import MlflowClient

from mdpo_ray.config import load_config

pytestmark = pytest.mark.slow

ADDRESS = "http://127.0.0.1:8275"  # not the default ports: never touch a Ray the user runs


@pytest.fixture
def head(own_ray, monkeypatch):
    """A head of its own: its temp dir (no other test's ray.init() finds it), stopped by its processes alone."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # token auth is on by default in Ray 2.60 (STACK_NOTES)
    env = own_ray.env | {"RAY_AUTH_MODE": "disabled"}
    # The job agent's HTTP port on a free one too: at its default (52365) it lost to another Ray instance's
    # agent when a second test process ran one, and no job could be submitted ("No available agent").
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        agent_port = probe.getsockname()[1]
    subprocess.run(["ray", "start", "--head", "--port=6390", "--num-cpus=2", "--include-dashboard=true",
                    "--dashboard-host=127.0.0.1", "--dashboard-port=8275", f"--dashboard-agent-listen-port={agent_port}",
                    "--disable-usage-stats"], env=env,
                   check=True, capture_output=True, timeout=120)
    try:
        _wait_for_job_agent()
        yield env
    finally:
        own_ray.stop()


def _wait_for_job_agent(timeout_s: float = 120) -> None:
    """`ray start` returns before the head's job agent has registered; a submission then fails with "No available
    agent to submit job, please try again later" (seen on a loaded machine). A trivial job, until one is taken."""
    from ray.job_submission import JobSubmissionClient

    deadline = time.time() + timeout_s
    while True:
        try:
            JobSubmissionClient(ADDRESS).submit_job(entrypoint="true")
            return
        except Exception as error:  # the dashboard not up yet, or no agent yet (a RuntimeError, or a connection error)
            if time.time() > deadline:
                raise AssertionError(f"the head's job server took no job in {timeout_s:.0f} s: {error}") from error
            time.sleep(1)


def _job(env, verb, *args, timeout=300):
    # --address before the verb's own arguments: after a submit's `--` it would go to the entrypoint
    return subprocess.run(["ray", "job", verb, "--address", ADDRESS, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def _status(env, job_id):
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient(ADDRESS).get_job_status(job_id).value)


def test_job_submit_stop_and_resubmit_resumes(head, tiny_run_overrides, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    # One worker: the job's path (submit, stop, resubmit, resume) is the same; 2-worker runs are test_ray_run's.
    overrides = [*tiny_run_overrides, "optim.max_steps=80", "checkpoint.every_steps=10", "tracking.log_every_steps=10",
                 "name=job-run", "scaling.num_workers=1"]
    cfg = load_config(None, overrides)
    (work / "run.yaml").write_text(json.dumps(cfg.model_dump(mode="json")))  # JSON is YAML
    job_id = f"mdpo-test-{os.getpid()}"
    command = ["--working-dir", str(work), "--", "mdpo-ray", "train", "run.yaml"]

    lost = _job(head, "submit", "--submission-id", f"{job_id}-relative", *command, "--set", "output_dir=runs",
                timeout=180)
    assert lost.returncode == 1, lost.stdout[-3000:]  # the job FAILED (exit 2), before Ray Train started
    assert "would be inside Ray's copy of this job's working directory (runtime_resources/...)" in lost.stdout
    assert "--set output_dir=/mnt/shared/mdpo_runs" in lost.stdout and "MLflow run" not in lost.stdout

    submitted = _job(head, "submit", "--no-wait", "--submission-id", job_id, *command)
    assert submitted.returncode == 0, submitted.stderr
    # The first checkpoint leaves 70 steps to stop in: at 60 steps (checkpoint 20, 40 left) a CI machine finished first.
    first_checkpoint = cfg.run_dir / "checkpoint_000010"
    deadline = time.time() + 180
    while not first_checkpoint.exists() and time.time() < deadline:
        time.sleep(0.5)
    assert first_checkpoint.exists(), _job(head, "logs", job_id).stdout[-3000:]
    assert _job(head, "stop", job_id).returncode == 0
    deadline = time.time() + 60
    while _status(head, job_id) not in ("STOPPED", "FAILED", "SUCCEEDED") and time.time() < deadline:
        time.sleep(1)
    assert _status(head, job_id) == "STOPPED"

    client = MlflowClient(tracking_uri=cfg.mlflow_uri)
    run = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
                             "tags.`mdpo.run_name` = 'job-run'")[0]
    assert run.info.status == "FAILED"  # closed by the driver's SIGTERM handler, not left RUNNING
    stopped_at = max(m.step for m in client.get_metric_history(run.info.run_id, "loss"))
    assert stopped_at < 80

    again = _job(head, "submit", "--submission-id", f"{job_id}-again", *command, timeout=400)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-2000:]
    assert "resumed from" in again.stdout
    final = client.get_run(run.info.run_id)
    assert final.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert set(steps) == {0, *range(10, 81, 10)} and steps[-1] == 80
    assert len(client.search_runs([final.info.experiment_id], "tags.`mdpo.run_name` = 'job-run'")) == 1
    shutil.rmtree(work, ignore_errors=True)
