"""Sweep files: search space -> trial configs without Ray; every bad key or value fails at load time."""

import pytest

from mdpo_ray.config import ConfigError
from mdpo_ray.sweep_config import load_sweep, trial_config


def _write(tmp_path, text, name="sweep.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


BASE = "loss:\n  name: minor_dpo\noptim:\n  max_steps: 7\n"


def test_base_file_run_section_and_space_map_to_trial_configs(tmp_path):
    _write(tmp_path, BASE, "base.yaml")
    path = _write(tmp_path, """
name: s1
base: base.yaml
run:
  optim: {lr: 3.0e-5}
space:
  loss.beta: {grid: [0.1, 0.3]}
  loss.reject_threshold: {choice: [0.0, -1.0]}
  optim.warmup_steps: {grid: [0, 5]}
""")
    sweep, base = load_sweep(path, ["optim.batch_size=8"])
    assert list(sweep.space) == ["loss.beta", "loss.reject_threshold", "optim.warmup_steps"]
    cfg = trial_config(base, {"loss.beta": 0.3, "loss.reject_threshold": -1.0, "optim.warmup_steps": 5})
    assert (cfg.loss.beta, cfg.loss.reject_threshold, cfg.optim.warmup_steps) == (0.3, -1.0, 5)
    assert (cfg.optim.max_steps, cfg.optim.lr, cfg.optim.batch_size) == (7, 3e-5, 8)  # base, run, --set
    assert base["optim"]["max_steps"] == 7  # trial overrides never leak into the shared base
    assert sweep.space_params() == {  # the parent run's params
        "space.loss.beta": "{grid: [0.1, 0.3]}", "space.loss.reject_threshold": "{choice: [0.0, -1.0]}",
        "space.optim.warmup_steps": "{grid: [0, 5]}", "metric": "eval/answer_accuracy", "mode": "max",
        "num_samples": "1", "search": "none", "scheduler": "none"}


GOOD_SPACE = "space:\n  loss.beta: {grid: [0.1]}\n"


@pytest.mark.parametrize(
    ("body", "needle"),
    [  # search keys and the values they can take
        ("space:\n  loss.betta: {grid: [0.1]}", "loss.betta: unknown key"),
        ("space:\n  loss.reject_threshold: {grid: [0.0, 0.5]}", "space.loss.reject_threshold = 0.5"),
        ("space:\n  optim.lr: {loguniform: [0.0, 1.0e-3]}", "loguniform needs low > 0"),
        ("space:\n  optim.lr: {uniform: [1.0, 0.1]}", "low < high"),
        ("space:\n  loss.beta: {grid: [0.1], choice: [0.2]}", "exactly one of"),
        ("space:\n  loss.name: {choice: [minor_dpo, kto]}", "space.loss.name = 'kto'"),
        # sweep-level mistakes
        (GOOD_SPACE + "metric: eval/acc", "'eval/acc' is not a metric a run reports; use one of loss, rewards/chosen"),
        (GOOD_SPACE + "metric: data/train_kept", ("'data/train_kept' is a run tag (one count per run), not a metric a "
                                                 "trial reports; use one of loss, ")),
        (GOOD_SPACE + "scheduler: {asha: {grace_period: 1}}", "ASHA compares trials at every report"),
        (GOOD_SPACE + "search: {algorithm: optuna}", "cannot use grid domains"),
        (GOOD_SPACE + "num_sample: 2", "num_sample: unknown key"),
    ],
)
def test_bad_sweeps_fail_at_load_time_with_the_key_and_the_fix(tmp_path, body, needle):
    path = _write(tmp_path, f"name: bad\n{body}\n")
    with pytest.raises(ConfigError) as info:
        load_sweep(path)
    assert needle in str(info.value)


@pytest.mark.parametrize("metric", ["eval/delta_chosen/p90", "eval/answer_accuracy", "stability/nonfinite_steps"])
def test_the_metric_may_be_any_metric_a_run_logs(tmp_path, metric):
    """What the `metric` description and its error message promise: training, step and eval/ names alike."""
    sweep, _ = load_sweep(_write(tmp_path, f"name: ok\n{GOOD_SPACE}metric: {metric}\n"))
    assert sweep.metric == metric


def test_missing_base_file_is_named(tmp_path):
    path = _write(tmp_path, "name: s\nbase: nowhere.yaml\nspace:\n  loss.beta: {grid: [0.1]}\n")
    with pytest.raises(ConfigError, match="base run config not found"):
        load_sweep(path)


def test_bad_sweep_exits_2_before_ray(tmp_path):
    import subprocess
    import sys

    path = _write(tmp_path, "name: bad\nspace:\n  loss.betta: {grid: [0.1]}\n")
    probe = (f"import sys; from mdpo_ray.cli import main; rc = main(['sweep', {str(path)!r}]); "
             "print('ray imported' if 'ray' in sys.modules else 'ray not imported'); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2 and "loss.betta: unknown key" in proc.stderr
    assert proc.stdout.strip() == "ray not imported"


def test_search_algorithm_and_scheduler_become_tune_objects(tmp_path):
    """Builds (does not run) the Tune config: Optuna over choice/loguniform, ASHA on a training metric."""
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from mdpo_ray.sweep import _domain
    from mdpo_ray.sweep_trial import _max_reports, _tune_config

    path = _write(tmp_path, """
name: tuned
space:
  loss.name: {choice: [minor_dpo, dpo]}
  optim.lr: {loguniform: [1.0e-6, 1.0e-4]}
  optim.max_steps: {choice: [150, 400]}
num_samples: 6
metric: rewards/margins
search: {algorithm: optuna, seed: 3}
scheduler: {asha: {grace_period: 2}}
""")
    sweep, base = load_sweep(path)
    # ASHA stops a trial at max_t reports (Ray's default 100): it must cover the longest trial's reports
    assert _max_reports(sweep, base, trial_config(base, {"name": "probe"})) == 400
    tune_config = _tune_config(sweep, max_concurrent=2, in_trial=False, max_reports=400)
    assert tune_config.scheduler._max_t == 400
    assert isinstance(tune_config.search_alg, OptunaSearch) and isinstance(tune_config.scheduler, ASHAScheduler)
    assert (tune_config.metric, tune_config.mode, tune_config.num_samples) == ("rewards/margins", "max", 6)
    lr = _domain(sweep.space["optim.lr"])
    assert all(1e-6 <= lr.sample() <= 1e-4 for _ in range(20))


def test_section_variants_set_keys_together_and_keep_the_rest(tmp_path):
    _write(tmp_path, BASE + "  lr: 3.0e-5\n", "base.yaml")
    path = _write(tmp_path, """
name: variants
base: base.yaml
space:
  loss: {grid: [{name: dpo, beta: 0.3}, {name: sft}]}
  optim.lr: {grid: [1.0e-5, 1.0e-4]}
""")
    sweep, base = load_sweep(path)
    assert sweep.search_keys() == ["loss.name", "loss.beta", "optim.lr"]
    dpo = trial_config(base, {"loss": {"name": "dpo", "beta": 0.3}, "optim.lr": 1e-4})
    assert (dpo.loss.name, dpo.loss.beta, dpo.optim.lr, dpo.optim.max_steps) == ("dpo", 0.3, 1e-4, 7)
    sft = trial_config(base, {"loss": {"name": "sft"}})
    assert (sft.loss.name, sft.loss.beta) == ("sft", 0.1)  # the base's other loss keys stay


def test_run_variants_span_sections_and_iterate_trials_go_through_ray_train(tmp_path):
    """space.run lists variants of the whole run config (loss + iterate + optim at once); an iterate variant sends
    every trial through Ray Train, and ASHA's max_t covers every round's reports."""
    from mdpo_ray.sweep_trial import _in_trial, _max_reports

    path = _write(tmp_path, """
name: recipes
run:
  iterate: {rounds: 3}
  scaling: {num_workers: 1}
space:
  run:
    grid:
      - {loss: {name: minor_dpo, nll_weight: 1.0}}
      - {loss.name: sft, iterate: {rounds: 0}, optim: {max_steps: 21}}
  seed: {grid: [0, 1]}
""")
    sweep, base = load_sweep(path)
    assert sweep.search_keys() == ["loss.name", "loss.nll_weight", "iterate.rounds", "optim.max_steps", "seed"]
    rpo, sft = (trial_config(base, {"run": v}) for v in sweep.space["run"].grid)
    assert (rpo.loss.name, rpo.loss.nll_weight, rpo.iterate.rounds, rpo.optim.max_steps) == ("minor_dpo", 1.0, 3, 100)
    assert (sft.loss.name, sft.loss.nll_weight, sft.iterate.rounds, sft.optim.max_steps) == ("sft", 0.0, 0, 21)
    assert not _in_trial(sweep, sft)  # a one-worker CPU run, but its sweep has iterate trials
    assert _max_reports(sweep, base, sft) == 300


@pytest.mark.parametrize("space, needle", [
    ("run: {grid: [{loss: {name: sft}}, {iterate: {roundz: 2}}]}", r"iterate\.roundz: unknown key"),
    ("run: {grid: [{loss: {name: sft}}, 3]}", "variants of the whole run config"),
    ("run: {uniform: [0, 1]}", "variants of the whole run config"),
])
def test_bad_run_variants_fail_at_load_time(tmp_path, space, needle):
    path = _write(tmp_path, f"name: bad-run-variant\nspace:\n  {space}\n")
    with pytest.raises(ConfigError, match=needle):
        load_sweep(path)


def test_a_bad_variant_fails_at_load_time_naming_the_key(tmp_path):
    path = _write(tmp_path, """
name: bad-variant
space:
  loss: {grid: [{name: dpo, beta: 0.3}, {name: sft, betta: 0.1}]}
""")
    with pytest.raises(ConfigError, match=r"loss\.betta: unknown key"):
        load_sweep(path)


def test_the_evidence_experiment_loads_and_spans_what_it_claims():
    from pathlib import Path

    sweep, base = load_sweep(Path(__file__).parent.parent / "sweeps" / "lr_robustness.yaml")
    grid = {key: domain.grid for key, domain in sweep.space.items()}
    lrs = grid["optim.lr"]
    assert len(lrs) >= 4 and max(lrs) / min(lrs) > 29.9 and len(grid["seed"]) >= 3
    assert set(grid["builtin.rejected_kind"]) == {"near_miss", "wrong_final", "on_policy"}
    assert {(v["name"], v.get("beta")) for v in grid["loss"]} == {
        (name, beta) for name in ("minor_dpo", "dpo", "dpop") for beta in (0.1, 0.3)} | {("sft", None)}
    cfg = trial_config(base, {key: values[0] for key, values in grid.items()})
    assert cfg.scaling.num_workers == 1 and cfg.reference == "precompute"


def test_a_sweep_over_the_lora_rank_shares_one_reference(tmp_path):
    """model.lora.* are search keys like any other; the reference (the base model) is the same for every
    rank, so its log-probs are computed once for the sweep."""
    from mdpo_ray.sweep import _reference_configs, shared_run_keys

    path = _write(tmp_path, "name: ranks\nspace:\n  model.lora.r: {grid: [0, 8]}\n  model.lora.alpha: {choice: [8.0, 16.0]}\n")
    sweep, base = load_sweep(path)
    cfg = trial_config(base, {"model.lora.r": 8, "model.lora.alpha": 16.0})
    assert (cfg.model.lora.r, cfg.model.lora.alpha) == (8, 16.0)
    assert len(_reference_configs(sweep, base, shared_run_keys(sweep, base))) == 1


def test_the_evidence_experiment_computes_one_reference_per_rejected_kind():
    """Each kind of rejected answer is its own data, so its own reference table (test_evidence runs one kind)."""
    from pathlib import Path

    from mdpo_ray.sweep import _reference_configs, shared_run_keys

    sweep, base = load_sweep(Path(__file__).parent.parent / "sweeps" / "lr_robustness.yaml")
    references = _reference_configs(sweep, base, shared_run_keys(sweep, base))
    assert sorted(cfg.builtin.rejected_kind for cfg in references) == ["near_miss", "on_policy", "wrong_final"]


def test_the_iterate_experiment_loads_and_spans_what_it_claims():
    """sweeps/iterative.yaml: issue 25's five recipes from one start, the same steps each, 3 rounds x 3 seeds."""
    from pathlib import Path

    from mdpo_ray.reports.iterative import RFT, SFT, recipe

    sweep, base = load_sweep(Path(__file__).parent.parent / "sweeps" / "iterative.yaml")
    assert len(sweep.space["seed"].grid) == 3
    configs = [trial_config(base, {"run": variant}) for variant in sweep.space["run"].grid]
    recipes = {recipe(c.loss.name, c.loss.nll_weight, c.iterate.rounds): c for c in configs}
    assert set(recipes) == {"iterative MinorDPO", "iterative DPO", "iterative MinorDPO + NLL 1",
                            "iterative DPO + NLL 1", RFT, SFT}
    assert {c.iterate.rounds for name, c in recipes.items() if name != SFT} == {3}
    assert {max(1, c.iterate.rounds) * c.optim.max_steps for c in configs} == {75}  # the same steps for all
    assert recipes[SFT].eval_every_steps == recipes[RFT].optim.max_steps  # SFT evaluated where the rounds end
    assert {(c.optim.lr, c.loss.beta, c.model.name_or_path, c.scaling.num_workers) for c in configs} == {
        (3e-5, 0.1, "builtin:arith", 1)}


def test_a_trial_returns_only_once_tune_took_the_train_runs_last_report(monkeypatch):
    """A Train report still queued for Tune when the trial function returns hangs the trial for good (Ray 2.60's
    function trainable): the function waits until the callback's queue and the session's result queue have both
    stayed empty a moment, gives up at its timeout, and does not wait without them."""
    import inspect
    from types import SimpleNamespace

    from ray.train._internal import session as ray_session
    from ray.tune.integration.ray_train import TuneReportCallback

    from mdpo_ray import sweep_trial

    looks = []
    queue = SimpleNamespace(empty=lambda: looks.append("queue") or len(looks) > 3)  # Tune takes it on the 4th look
    results = SimpleNamespace(empty=lambda: looks.append("results") is None)
    monkeypatch.setattr(ray_session, "get_session", lambda: SimpleNamespace(result_queue=results))
    monkeypatch.setattr(sweep_trial.time, "sleep", lambda s: None)
    sweep_trial._wait_until_tune_took_every_report(SimpleNamespace(_training_actor_item_queue=queue))
    assert looks == ["queue"] * 4 + ["results", "queue", "results"]  # empty, then still empty after settling
    sweep_trial._wait_until_tune_took_every_report(SimpleNamespace())  # a Ray without that queue: nothing to wait for
    stuck = SimpleNamespace(empty=lambda: False)
    clock = iter(range(0, 1000, 10))
    monkeypatch.setattr(sweep_trial.time, "monotonic", lambda: next(clock))
    sweep_trial._wait_until_tune_took_every_report(SimpleNamespace(_training_actor_item_queue=stuck), timeout_s=50)
    assert next(clock) <= 80  # gave up at its timeout rather than hang the trial itself
    # The attributes are Ray's: still there?
    assert "self._training_actor_item_queue = " in inspect.getsource(TuneReportCallback.__init__)
    assert "self.result_queue = queue.Queue(1)" in inspect.getsource(ray_session._TrainSession)
