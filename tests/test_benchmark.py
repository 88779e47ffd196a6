"""The benchmark (benchmarks/vs_trl.py) still runs against the code it measures: its in-process path
calls the training loop, and its head-on-every-position config reaches into mdpo_ray.training.logps, so a
change there can break it with nothing else failing (as a change of the hook's signature once did).
TRL is only in the `bench` extra, so TRL's configs are not run here."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mdpo_ray import cluster

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--hidden", "32", "--layers", "1", "--heads", "2", "--intermediate", "64", "--vocab", "500", "--pairs", "16",
        "--batch", "4", "--shots", "0", "--window", "1", "--warmup", "1", "--windows", "2", "--matmul-size", "256"]


@pytest.mark.slow
def test_the_benchmark_runs_the_in_process_step_with_the_head_on_every_position_and_checkpointed(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "vs_trl.py"), "--configs", "minor_dpo_full_logits",
                           "minor_dpo_checkpointing",
                           *TINY, "--workdir", str(tmp_path / "work"), "--json", str(out)],
                          capture_output=True, text=True, timeout=300, check=False,
                          env={k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"} | {"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    written = json.loads(out.read_text())
    # Both sides run with the allocator settings mdpo-ray's CPU-only local instance gives its workers.
    assert written["GLIBC_TUNABLES"] == cluster.CPU_ALLOCATOR_ENV["GLIBC_TUNABLES"]
    results = written["results"]  # a config that fails is left out of the table, not fatal
    for name in ("minor_dpo_full_logits", "minor_dpo_checkpointing"):
        assert name in results, (proc.stdout + proc.stderr)[-3000:]
        result = results[name]
        assert len(result["windows"]) == 2 and all(w > 0 for w in result["windows"]), result
