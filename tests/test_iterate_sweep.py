"""System tier: the iterate experiment (sweeps/iterative.yaml) scaled down — the tiny task, iterative MinorDPO and
plain SFT, one seed, 2 rounds of 2 steps — through Tune, the rounds (Ray sampling actors, one Ray Train run each),
MLflow and the results page's iterate section. It checks the pipeline's outputs, not the science."""

import csv
import os
import textwrap
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from mdpo_ray import cli
from mdpo_ray.sweep_config import load_sweep, trial_config
from mdpo_ray.tracking.mlflow_runs import ITERATE_ROUND_TAG, ROLE_TAG

pytestmark = pytest.mark.slow

EXPERIMENT = Path(__file__).parent.parent / "sweeps" / "iterative.yaml"
ROUNDS, STEPS = 2, 2


@pytest.fixture
def coin_verifier(tmp_path, monkeypatch):
    """A verifier that splits a random tiny model's samples about evenly (the built-in check would call them all
    wrong): a completion is correct when the CRC of its text is even. On PYTHONPATH too: the trials import it in
    Ray's worker processes, which inherit the environment of the Ray instance this test starts."""
    (tmp_path / "coin_check.py").write_text(textwrap.dedent("""
        import zlib

        def even(prompt, completion, row):
            return zlib.crc32(completion.encode()) % 2 == 0
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    return "coin_check:even"


def _scaled_down(tmp_path: Path) -> Path:
    """The checked-in experiment with iterative MinorDPO and plain SFT only, one seed; SFT's steps = all rounds'."""
    sweep = yaml.safe_load(EXPERIMENT.read_text())
    variants, seeds = sweep["space"]["run"]["grid"], sweep["space"]["seed"]["grid"]
    assert len(seeds) >= 3 and sweep["run"]["iterate"]["rounds"] >= 3
    assert {(v["loss"]["name"], v["loss"].get("nll_weight", 0), v.get("iterate", {}).get("rounds")) for v in variants} \
        == {("minor_dpo", 0, None), ("dpo", 0, None), ("minor_dpo", 1, None), ("dpo", 1, None), ("sft", 0, None),
            ("sft", 0, 0)}
    sft = next(v for v in variants if v.get("iterate", {}).get("rounds") == 0)
    assert sft["optim"]["max_steps"] == sweep["run"]["iterate"]["rounds"] * sweep["run"]["optim"]["max_steps"]
    sft["optim"]["max_steps"] = ROUNDS * STEPS
    sweep["space"]["run"]["grid"] = [{"loss": {"name": "minor_dpo"}}, sft]
    sweep["space"]["seed"]["grid"] = seeds[:1]
    sweep["base"] = str(EXPERIMENT.parent / sweep["base"])
    path = tmp_path / "iterative_small.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def test_scaled_down_iterate_experiment_end_to_end(tiny_run_overrides, coin_verifier, tmp_path):
    import ray

    from mdpo_ray import sweep as sweeps

    path = _scaled_down(tmp_path)
    overrides = [*tiny_run_overrides, f"iterate.rounds={ROUNDS}", f"iterate.verifier={coin_verifier}",
                 "iterate.prompts_per_round=8", f"optim.max_steps={STEPS}", f"eval.every_steps={STEPS}",
                 f"checkpoint.every_steps={STEPS}", "eval.max_generation_problems=4",
                 "scaling.num_workers=1"]  # 2 workers' sampling and rounds: test_iterate_run
    sweep, base = load_sweep(path, overrides)
    try:
        summary = sweeps.run_sweep(sweep, base)
    finally:
        ray.shutdown()
    assert summary.n_trials == 2 and summary.unfinished == 0 and summary.best_trial is not None

    cfg = trial_config(base, sweeps.shared_run_keys(sweep, base) | {"name": "x"})
    client = MlflowClient(tracking_uri=cfg.mlflow_uri)
    experiment = client.get_experiment_by_name("iterative").experiment_id
    trials = {run.info.run_name: run for run in
              client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{summary.parent_run_id}'")}
    assert set(trials) == {f"minor_dpo seed=0 rounds={ROUNDS}", f"sft rounds=0 max_steps={ROUNDS * STEPS} seed=0"}
    iterate, sft = trials[f"minor_dpo seed=0 rounds={ROUNDS}"], trials[f"sft rounds=0 max_steps={ROUNDS * STEPS} seed=0"]
    assert iterate.data.tags[ROLE_TAG] == "iterate" and ROLE_TAG not in sft.data.tags
    assert {run.info.status for run in trials.values()} == {"FINISHED"}
    rounds = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{iterate.info.run_id}'")
    assert sorted(r.data.tags[ITERATE_ROUND_TAG] for r in rounds) == ["0", "1"]
    assert {r.info.status for r in rounds} == {"FINISHED"} and all("loss" in r.data.metrics for r in rounds)
    # Both trials' held-out accuracy at the start and after each round's steps: what ranks and plots them.
    for run in trials.values():
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "eval/answer_accuracy"))
        assert steps == [0, STEPS, 2 * STEPS], run.info.run_name
    assert [m.step for m in client.get_metric_history(iterate.info.run_id, "iterate/pairs")] == [0, 1]

    out = tmp_path / "docs" / "results.md"
    out.parent.mkdir()
    out.write_text("# The lr page\n")
    argv = ["report", str(path), "--results", str(out), *[a for o in overrides for a in ("--set", o)]]
    assert cli.main(argv) == 0
    page = out.read_text()
    assert page.startswith("# The lr page\n")
    for needle in ("## Iterative on-policy training", "1. **Iterative MinorDPO beats plain SFT**",
                   "2. **Iterative MinorDPO beats RFT**", "**iterative MinorDPO vs RFT: not tested**",
                   "3. **MinorDPO vs DPO under iteration**", f"| iterative MinorDPO | {ROUNDS * STEPS} |",
                   f"| SFT | {ROUNDS * STEPS} |", "after round 2", "results/iterative/accuracy_vs_round.png",
                   summary.parent_run_id, "mdpo-ray report"):
        assert needle in page, needle
    assert any(f"**iterative MinorDPO {v} SFT**" in page or "**iterative MinorDPO vs SFT: not shown**" in page
               for v in ("beats", "is beaten by"))
    rows = list(csv.DictReader((out.parent / "results" / "iterative" / "trials.csv").open()))
    assert sorted((r["recipe"], r["round"]) for r in rows) == [(name, str(k)) for name in ("SFT", "iterative MinorDPO")
                                                               for k in range(ROUNDS + 1)]
    assert all(0 <= float(r["acc_points"]) <= 100 for r in rows)
    assert (out.parent / "results" / "iterative" / "accuracy_vs_round.png").read_bytes()[:4] == b"\x89PNG"
