"""How long `mdpo-ray train` takes on a fresh machine, and where the time goes.

Runs `mdpo-ray train` (the built-in default, plus any overrides given) in a new working directory with
a new HOME, so the built-in task's cache (`~/.cache/mdpo-ray`) and the MLflow store start empty and the
one-time SFT warm-up is part of the run, and with a Ray temp dir of its own (a local instance, never one
already running here). It timestamps the command's output, and prints the wall time of each phase, the
CPU seconds of every process of the run (Ray's included: each process carries a marker in its
environment and is sampled every 0.5 s) and the load average before and after: on a machine shared with
other jobs the wall times stretch, the CPU seconds much less.

    python benchmarks/first_run.py                    # the first run: SFT warm-up included (~3-4 min)
    python benchmarks/first_run.py --home DIR         # a run with DIR as HOME: its cache, if built, is reused
    python benchmarks/first_run.py --set optim.max_steps=20   # overrides, as for mdpo-ray train
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

# The first output line of each phase, in order; a phase lasts until the next one's line.
PHASES = [
    ("start-up: imports, config, memory plan", None),
    ("built-in task: generate, SFT warm-up, save", re.compile(r"builtin task: (building|reusing)")),
    ("MLflow: create the store, open the run", re.compile(r"builtin task: built in|builtin task: reusing")),
    ("Ray: start a local instance", re.compile(r"^MLflow run ")),
    ("Ray Train: controller, 2 workers", re.compile(r"Started a local Ray instance")),
    ("workers: data, models, eval before training", re.compile(r"Started training worker group")),
    ("training steps and evals", re.compile(r"before training: ")),
    ("export, summary, Ray shut down", re.compile(r"exported the policy to ")),
]
MARK = "MDPO_FIRST_RUN_BENCHMARK"


def cpu_seconds(mark: str, stop: threading.Event, totals: dict[int, float]) -> None:
    """Sample the CPU time of every process whose environment carries `mark` until `stop` is set."""
    while not stop.is_set():
        for process in psutil.process_iter(["pid"]):
            try:
                if process.environ().get(MARK) == mark:
                    times = process.cpu_times()
                    totals[process.pid] = times.user + times.system
            except (psutil.Error, OSError):
                continue
        stop.wait(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", help="HOME for the run (default: a new empty directory)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="mdpo-ray train --set KEY=VALUE")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="mdpo-first-run-"))
    home = Path(args.home) if args.home else root / "home"
    (root / "work").mkdir()
    (root / "ray").mkdir()
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"HOME": str(home), "RAY_TMPDIR": str(root / "ray"), "PYTHONUNBUFFERED": "1", MARK: str(root)}
    command = [sys.executable, "-m", "mdpo_ray", "train", *(f"--set={o}" for o in args.overrides)]
    print(f"{' '.join(command[2:])} in {root / 'work'}, HOME={home}; load average before: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)

    totals: dict[int, float] = {}
    stop = threading.Event()
    sampler = threading.Thread(target=cpu_seconds, args=(str(root), stop, totals), daemon=True)
    sampler.start()
    started = time.perf_counter()
    marks = [0.0]  # when each phase began
    log = (root / "out.log").open("w")
    with subprocess.Popen(command, cwd=root / "work", env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace") as run:
        for line in run.stdout:
            now = time.perf_counter() - started
            log.write(f"{now:8.2f} {line}")
            while len(marks) < len(PHASES) and PHASES[len(marks)][1].search(line):  # a reused task: two at once
                marks.append(now)
    wall = time.perf_counter() - started
    stop.set()
    sampler.join()
    log.close()

    print(f"exit code {run.returncode}; output with timestamps: {root / 'out.log'}")
    ends = [*marks[1:], wall]
    for (name, _), begin, end in zip(PHASES, marks, ends):
        print(f"  {end - begin:7.1f} s  {name}")
    if len(marks) < len(PHASES):
        print(f"  (the output never showed the start of: {PHASES[len(marks)][0]})")
    print(f"  {wall:7.1f} s  in all (wall); {sum(totals.values()):.0f} CPU seconds over {len(totals)} processes; "
          f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return run.returncode


if __name__ == "__main__":
    raise SystemExit(main())
