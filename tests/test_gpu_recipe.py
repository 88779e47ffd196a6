"""Fast tier: the GPU recipe (benchmarks/gpu.sh) resolves, though no GPU runs here. Its model is the
~0.5B Llama docs/performance.md names, and each of its mdpo-ray runs passes the config schema as it would there."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_recipe_resolves_a_half_billion_model_and_valid_run_configs(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--check-args", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, env=os.environ | {"PYTHON": sys.executable}, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resolved = json.loads(proc.stdout)
    assert resolved["device"] == "cuda" and resolved["json"] == "vs_trl_gpu.json"
    assert 0.4e9 < resolved["parameters"] < 0.6e9
    assert set(ast.literal_eval(resolved["configs"])) >= {"trl", "trl_precompute", "minor_dpo", "minor_dpo_precompute",
                                                          "ray_minor_dpo"}  # --check-args prints str(list)
