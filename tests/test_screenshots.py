"""Proof in a real browser: docs/screenshots.py makes a few-step default run and the smoke sweep, serves
them with `mlflow ui` and opens them in headless Chromium; the run's charts and the sweep's trials must
be drawn on the pages (the DOM, not just a PNG)."""

import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_the_mlflow_ui_draws_the_runs_charts_and_the_sweeps_trials(tiny_run_overrides, tmp_path):
    if CHROMIUM is None:
        pytest.skip("no Chromium on PATH: apt-get install -y chromium (.ci/run does)")
    if importlib.util.find_spec("playwright") is None:
        pytest.skip("playwright is not installed: pip install -e '.[test]' (or '.[docs]')")
    # The store is where the commands run (mdpo_runs/, as for a user); one worker keeps the sweep's
    # trials in their Tune processes, the quickest path through a 4-trial sweep.
    # Trials keep a resident reference: the shared table's precompute, a Ray Train run of its own before
    # the trials, draws nothing in the UI and is test_evidence's and test_multinode's to check.
    overrides = [o for o in tiny_run_overrides if not o.startswith("output_dir=")] + ["scaling.num_workers=1",
                                                                                     "reference=resident"]
    workdir, out = tmp_path / "work", tmp_path / "img"
    workdir.mkdir()
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(ROOT / "docs" / "screenshots.py"), "--workdir", str(workdir),
                           "--out", str(out), "--chromium", CHROMIUM, *[a for o in overrides for a in ("--set", o)]],
                          capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    phases = [line.strip() for line in done.stdout.splitlines() if line.startswith(("mdpo-ray ", "  done in"))]
    print(f"docs/screenshots.py: {time.monotonic() - started:.0f} s ({'; '.join(phases)})")  # -s shows where it went
    shown = json.loads((out / "shots.json").read_text())
    assert set(shown) == {"run_overview.png", "run_charts.png", "run_rewards.png", "run_system_metrics.png",
                          "sweep_runs.png", "sweep_charts.png", "sweep_parent.png", "sweep_compare.png", "sweep_report.png"}
    assert all((out / name).stat().st_size == page["bytes"] > 5000 for name, page in shown.items())

    # The rewards section drew a rewards/margins chart: a plot with the run's rewards/margins legend.
    rewards = shown["run_rewards.png"]["charts"]
    assert any("margins" in lines and "minor-dpo-arith (rewards/margins)" in lines for lines in rewards), rewards
    # The charts a run opens on are the Δw drifts (docs/mlflow.md says so: sections in name order).
    first = shown["run_charts.png"]["charts"]
    assert first and all(any(line.startswith("minor-dpo-arith (delta_chosen/") for line in lines) for lines in first)
    overview = shown["run_overview.png"]["text"]
    assert "minor_dpo β=0.1 τ=0 w=1 · lr 0.01" in overview  # the run's description
    assert "mdpo-ray train --set model.name_or_path=" in overview  # its command, whole
    # The sweep's trials, named by their overrides, unfolded under the parent; their curves compared.
    names = [f"minor_dpo b={b} tau={t}" for b in ("0.1", "0.3") for t in ("0", "-2")]
    assert all(name in shown["sweep_runs.png"]["text"] for name in names), shown["sweep_runs.png"]["text"][:2000]
    legends = {line for lines in shown["sweep_charts.png"]["charts"] for line in lines}
    assert all(any(line.startswith(f"{name} (") for line in legends) for name in names), legends
