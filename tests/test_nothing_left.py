"""System tier: `mdpo-ray train` on a local Ray instance leaves no process of it behind, whether the run
finishes, fails or is interrupted with Ctrl-C; and a DataError that only the Train workers can find (here:
every prompt longer than data.max_length, which only tokenizing tells) reaches the user first, exit 2, and
its MLflow run is closed FAILED.
(The sweep's case is in tests/test_sweep.py.)"""

import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from mdpo_ray.config import load_config

pytestmark = pytest.mark.slow


def _train(overrides: list[str], own_ray, log_path, **popen):
    command = [sys.executable, "-m", "mdpo_ray", "train", *[a for o in overrides for a in ("--set", o)]]
    with open(log_path, "w") as log:  # a file, not a pipe: an unread pipe would block the driver
        return subprocess.Popen(command, stdout=log, stderr=popen.pop("stderr", subprocess.STDOUT), env=own_ray.env,
                                **popen)


def _watch(driver, own_ray, timeout: float, until=None) -> set[str]:
    """Ray's process titles seen while the driver runs (the mark finds them: the check after is not empty
    by construction); returns when the driver exits or `until(titles)` holds."""
    seen, deadline = set(), time.time() + timeout
    while driver.poll() is None and time.time() < deadline:
        seen |= {os.path.basename(line.split(" ")[1]) for line in own_ray.processes()}
        if until is not None and until(seen):
            break
        time.sleep(0.5)
    return seen


def _assert_nothing_left(own_ray, grace_s: float = 10.0):
    """Nothing of the instance is alive a little after the driver exited (a process already on its way out
    may take a moment; the TrainController left behind after a sweep stayed for good)."""
    deadline = time.time() + grace_s
    while own_ray.processes() and time.time() < deadline:
        time.sleep(0.5)
    assert own_ray.processes() == [], "processes of the run's Ray instance outlived it"


def test_a_finished_and_a_failed_run_leave_no_ray_process_behind(tiny_run_overrides, tiny_task, own_ray, tmp_path):
    # One Train worker each: what is left behind is the instance's processes, whatever the number of workers.
    finished = _train([*tiny_run_overrides, "name=finished", "scaling.num_workers=1"], own_ray,
                      tmp_path / "finished.log")
    seen = _watch(finished, own_ray, timeout=400)
    assert finished.wait(timeout=60) == 0, (tmp_path / "finished.log").read_text()[-3000:]
    # titles are sampled every 0.5 s: a Train worker is seen in some state, not always inside run_train_fn
    assert {"raylet", "gcs_server"} <= seen and any(t.startswith("ray::RayTrainWorker") for t in seen), seen
    _assert_nothing_left(own_ray)

    # The driver's check passes (every row is a good pair); only the workers' tokenizing finds every prompt
    # too long for max_length=4.
    with open(tmp_path / "failed.err", "w") as err:
        failed = _train([*tiny_run_overrides, "name=failed", "data.max_length=4", "scaling.num_workers=1"], own_ray,
                        tmp_path / "failed.log", stderr=err)
        _watch(failed, own_ray, timeout=400)
        code = failed.wait(timeout=60)
    err = (tmp_path / "failed.err").read_text()
    assert code == 2, err[-3000:]
    message, pointer = err.rstrip("\n").split("\n")[-2:]  # the driver's last word, after all of Ray's output
    assert message.startswith(f"mdpo-ray: {tiny_task['train']}: none of its 48 rows is a usable preference pair; "
                              "most common problem: prompt of >= max_length=4 tokens (raise data.max_length)"), err[-3000:]
    assert pointer.startswith("(a Train worker found this: Ray's log of it is above and in "), pointer
    assert "mdpo_ray/cli.py" not in err  # no traceback of the driver's own
    _assert_nothing_left(own_ray)
    cfg = load_config(None, [*tiny_run_overrides, "name=failed"])
    client = MlflowClient(tracking_uri=cfg.mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
                                "tags.`mdpo.run_name` = 'failed'")
    assert run.info.status == "FAILED"  # closed as such, not left RUNNING


def test_an_interrupted_run_leaves_no_ray_process_behind(tiny_run_overrides, own_ray, tmp_path):
    driver = _train([*tiny_run_overrides, "name=interrupted", "optim.max_steps=2000", "checkpoint.every_steps=1000"],
                    own_ray, tmp_path / "interrupted.log", start_new_session=True)  # a terminal's job: its own group
    try:
        seen = _watch(driver, own_ray, timeout=400, until=lambda titles: any(t.startswith("ray::RayTrainWorker") for t in titles))
        assert driver.poll() is None, (tmp_path / "interrupted.log").read_text()[-3000:]
        time.sleep(5)  # inside the run: its workers setting up or training
        os.killpg(driver.pid, signal.SIGINT)  # Ctrl-C
        code = driver.wait(timeout=120)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert "raylet" in seen and any(t.startswith("ray::RayTrainWorker") for t in seen), seen
    assert code != 0, (tmp_path / "interrupted.log").read_text()[-3000:]  # cut short, not finished
    _assert_nothing_left(own_ray)
