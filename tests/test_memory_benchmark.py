"""benchmarks/memory.py still runs against the loop it measures: it patches train_loop's step hooks
(lr_at at each step's start, _window_metrics after the last) to track step 2 with MemTracker, so a
change of the loop could break it with nothing else failing."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_memory_benchmark_measures_a_tiny_run_within_15_percent_of_its_plan(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory.py"), "--configs", "tiny64",
                           "--no-examples", "--workdir", str(tmp_path)], capture_output=True, text=True,
                          timeout=300, check=False, env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    row = re.search(r"^tiny64 .*", proc.stdout, re.MULTILINE)
    assert row and "skipped" not in row.group(0), proc.stdout[-3000:]
    planned, measured, ratio = (float(x) for x in row.group(0).split()[7:10])
    assert planned > 0 and measured > 0 and abs(ratio - 1) <= 0.15, row.group(0)
