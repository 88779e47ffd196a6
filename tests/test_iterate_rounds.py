"""Iterate rounds without Ray: each round's single-run config (its pairs, start policy, reference, folder and
MLflow store) and the reference model a run loads."""

import pytest

from mdpo_ray.config import load_config
from mdpo_ray.iterate import store
from mdpo_ray.training.reference import reference_config


@pytest.fixture
def iterate_cfg(tmp_path):
    return lambda *extra: load_config(None, [f"output_dir={tmp_path}", "model.name_or_path=/models/sft",
                                              "data.train=/data/train.jsonl", "iterate.rounds=3", *extra])


def test_a_round_trains_its_saved_pairs_from_its_start_policy_under_its_folder(iterate_cfg):
    from mdpo_ray.launch_rounds import round_config

    cfg = iterate_cfg()
    first, second = round_config(cfg, 0, "/models/sft"), round_config(cfg, 1, "/runs/r0/export")
    location = store.round_location(cfg.run_location, 1)
    assert second.run_location == f"{location}/{cfg.name}-round-1"
    assert second.data.train == f"{location}/{store.PAIRS_FILE}"
    assert first.model.name_or_path == "/models/sft" and second.model.name_or_path == "/runs/r0/export"
    assert first.mlflow_uri == second.mlflow_uri == cfg.mlflow_uri  # one store, not one per round folder
    assert first.iterate.rounds == second.iterate.rounds == 0  # a round is a single run
    assert (second.loss, second.optim, second.seed) == (cfg.loss, cfg.optim, cfg.seed)


@pytest.mark.parametrize(("reference", "round_1_reference"), [("previous", "/runs/r0/export"),
                                                                ("initial", "/models/sft")])
def test_the_round_reference_is_its_start_policy_or_the_initial_model(iterate_cfg, reference, round_1_reference):
    from mdpo_ray.launch_rounds import round_config

    cfg = iterate_cfg(f"iterate.reference={reference}")
    assert reference_config(round_config(cfg, 0, "/models/sft")).name_or_path == "/models/sft"
    assert reference_config(round_config(cfg, 1, "/runs/r0/export")).name_or_path == round_1_reference


def test_a_configured_reference_is_loaded_instead_of_the_policy(tmp_path):
    cfg = load_config(None, ["model.name_or_path=/models/policy", "model.reference=/models/ref"])
    loaded = reference_config(cfg)
    assert loaded.name_or_path == "/models/ref" and loaded.reference is None
    assert loaded.tokenizer == cfg.model.tokenizer and reference_config(load_config()).name_or_path == "builtin:arith"


def test_a_finished_round_is_recorded_last_and_read_back(tmp_path):
    location = store.round_location(str(tmp_path), 0)
    assert store.load_done(location) is None
    store.save_done(location, {"export": "/x/export", "metrics": {"eval/answer_accuracy": 0.5}})
    assert store.load_done(location) == {"export": "/x/export", "metrics": {"eval/answer_accuracy": 0.5}}
