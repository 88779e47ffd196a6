"""System tier: the evidence experiment (sweeps/lr_robustness.yaml) scaled down — a tiny built-in task,
one seed, two learning rates, three loss variants, on-policy rejected answers, 3 steps — through Tune, Ray Train,
MLflow, the sweep report and the results page. It checks the pipeline's outputs, not the science.

It also stands as the sweep smoke test: a grid of trials into one MLflow parent, one shared reference
table per distinct reference, computed before the trials and reused by each."""

import csv
import re
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from mdpo_ray import cli
from mdpo_ray.sweep_config import load_sweep, trial_config

pytestmark = pytest.mark.slow

EXPERIMENT = Path(__file__).parent.parent / "sweeps" / "lr_robustness.yaml"
TINY_BUILTIN = dict(n_layers=1, hidden_size=32, n_heads=2, intermediate_size=64, n_sft_problems=200,
                    n_pref_pairs=40, n_eval_pairs=12, n_eval_problems=16, sft_max_steps=10,
                    sft_eval_every_steps=10, sft_target_accuracy=0.0)


def _scaled_down(tmp_path: Path) -> Path:
    """The checked-in experiment with a smaller space: every value kept comes from the file itself."""
    sweep = yaml.safe_load(EXPERIMENT.read_text())
    space = sweep["space"]
    lrs, variants, kinds, seeds = (space["optim.lr"]["grid"], space["loss"]["grid"],
                                   space["builtin.rejected_kind"]["grid"], space["seed"]["grid"])
    assert len(lrs) >= 4 and len(seeds) >= 3 and {"near_miss", "wrong_final", "on_policy"} <= set(kinds)
    assert {v["name"] for v in variants} == {"minor_dpo", "dpo", "dpop", "sft"}
    space["optim.lr"]["grid"] = [lrs[0], lrs[-1]]
    space["loss"]["grid"] = [v for v in variants if v.get("beta", 0.1) == 0.1 and v["name"] != "dpop"]
    space["builtin.rejected_kind"]["grid"] = ["on_policy"]  # the kind sampled once and shared; a grid of kinds is a grid
    space["seed"]["grid"] = seeds[:1]
    sweep["base"] = str(EXPERIMENT.parent / sweep["base"])
    path = tmp_path / "lr_robustness_small.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def test_scaled_down_evidence_experiment_end_to_end(tmp_path, capfd):
    import ray

    from mdpo_ray import sweep as sweeps

    path = _scaled_down(tmp_path)
    overrides = [f"output_dir={tmp_path / 'runs'}", f"builtin.cache_dir={tmp_path / 'cache'}", "optim.max_steps=3",
                 "optim.batch_size=4", "optim.warmup_steps=1", "tracking.log_every_steps=3",
                 "checkpoint.every_steps=3", "eval.batch_size=8"] + [f"builtin.{k}={v}" for k, v in TINY_BUILTIN.items()]
    sweep, base = load_sweep(path, overrides)
    try:
        summary = sweeps.run_sweep(sweep, base)
    finally:
        ray.shutdown()
    cfg = trial_config(base, sweeps.shared_run_keys(sweep, base) | {"name": "x"})
    client = MlflowClient(tracking_uri=cfg.mlflow_uri)
    experiment = client.get_experiment_by_name("lr-robustness")  # one experiment, named after the sweep
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{summary.parent_run_id}'")
    assert len(children) == 6 and {c.info.status for c in children} == {"FINISHED"}
    # Section variants arrive as ordinary dotted overrides; sft names no beta and gets none.
    variants = {(c.data.tags["override.loss.name"], c.data.tags.get("override.loss.beta")) for c in children}
    assert variants == {("minor_dpo", "0.1"), ("dpo", "0.1"), ("sft", None)}
    for child in children:
        assert child.data.params["loss.name"] == child.data.tags["override.loss.name"]
        assert child.data.params["builtin.rejected_kind"] == child.data.tags["override.builtin.rejected_kind"]
        assert child.data.params["scaling.num_workers"] == "1"
        for key in ("loss", "logps/chosen", "logps/rejected", "eval/answer_accuracy", "eval/delta_chosen/mean"):
            assert key in child.data.metrics
    # One reference table pair (train, held-out), computed before the trials, reused by all.
    log = capfd.readouterr()
    text = log.out + log.err
    assert text.count("on-policy rejected answers sampled") == 1
    computed = sorted(int(n) for n in re.findall(r"reference log-probs for (\d+) pairs computed", text))
    assert len(computed) == 2 and computed[0] == 12 and computed[1] <= 40, computed  # held-out; train (usable pairs)
    assert {c.data.tags["mdpo.reference_cache"] for c in children} == {"reused,reused"}
    assert summary.report.markdown_path.is_file() and summary.report.plots

    out = tmp_path / "docs" / "results.md"
    argv = ["report", str(path), "--results", str(out), *[a for o in overrides for a in ("--set", o)]]
    assert cli.main(argv) == 0
    page = out.read_text()
    for needle in ("## What the runs say about the paper's claims", "### rejected answers: on_policy",
                   "| minor_dpo β=0.1 |", "| dpo β=0.1 |", "| sft |",
                   "lr 1e-05", "lr 0.0003", "Δw, chosen log-prob drift", "## Limits of this test",
                   "mdpo-ray report", summary.parent_run_id):
        assert needle in page, needle
    rows = list(csv.DictReader((out.parent / "results" / "trials.csv").open()))
    assert len(rows) == 6 and {r["status"] for r in rows} == {"FINISHED"}
    assert all(0 <= float(r["acc_points"]) <= 100 for r in rows)
    for name in ("accuracy_vs_lr.png", "logps_at_highest_lr.png"):
        assert (out.parent / "results" / name).read_bytes()[:4] == b"\x89PNG"
        assert f"results/{name}" in page
