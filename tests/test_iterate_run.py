"""System tier: two iterate rounds through Ray sampling actors, Ray Train and MLflow, stopped after round 0
and rerun: round 0 is skipped (its pairs are not resampled), round 1 trains from round 0's export."""

import os
import textwrap

import pytest
from mlflow.tracking import MlflowClient

from mdpo_ray.config import load_config
from mdpo_ray.iterate import store
from mdpo_ray.tracking.mlflow_runs import ITERATE_ROUND_TAG, ROLE_TAG
from mdpo_ray.training.metrics import GLOSSARY

pytestmark = pytest.mark.slow


@pytest.fixture
def coin_verifier(tmp_path, monkeypatch):
    """A verifier that splits a random tiny model's samples about evenly (the built-in check would call them all
    wrong): a completion is correct when the CRC of its text is even."""
    (tmp_path / "coin_check.py").write_text(textwrap.dedent("""
        import zlib

        def even(prompt, completion, row):
            return zlib.crc32(completion.encode()) % 2 == 0
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "coin_check:even"


def test_two_rounds_sample_with_actors_track_in_mlflow_and_resume_at_the_round(tiny_run_overrides, coin_verifier):
    from mdpo_ray import cluster, launch

    def cfg(rounds):
        return load_config(None, [*tiny_run_overrides, f"iterate.rounds={rounds}", f"iterate.verifier={coin_verifier}",
                                  "iterate.prompts_per_round=8", "iterate.samples_per_prompt=4",
                                  "optim.max_steps=2", "eval.max_generation_problems=4"])

    try:
        first = launch.train(cfg(1))  # stopped after round 0, as a kill between the rounds would leave it
        round_0 = store.round_location(first.config.run_location, 0)
        saved = {name: _mtime(round_0, name) for name in (store.PAIRS_FILE, store.PAIRING_FILE, store.DONE_FILE)}
        second = launch.train(cfg(2))
    finally:
        cluster.stop_ray()

    assert {name: _mtime(round_0, name) for name in saved} == saved  # round 0 neither resampled nor retrained
    round_1 = store.load_done(store.round_location(second.config.run_location, 1))
    assert round_1["start_model"] == store.load_done(round_0)["export"] == str(first.export_dir)
    assert str(second.export_dir) == round_1["export"] and round_1["metrics"]["step"] == 2
    pairing = store.load_pairing(store.round_location(second.config.run_location, 1))
    assert 0 < len(pairing.pairs) <= 8 and pairing.samples == 32

    client = MlflowClient(second.config.mlflow_uri)
    experiment = client.get_experiment_by_name(second.config.tracking.experiment).experiment_id
    parents = client.search_runs([experiment], f"tags.`{ROLE_TAG}` = 'iterate'")
    assert [p.info.run_id for p in parents] == [first.mlflow_run_id] == [second.mlflow_run_id]  # reopened
    assert parents[0].info.status == "FINISHED"
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{second.mlflow_run_id}'")
    assert sorted(c.data.tags[ITERATE_ROUND_TAG] for c in children) == ["0", "1"]
    assert all(c.info.status == "FINISHED" and "loss" in c.data.metrics for c in children)
    history = client.get_metric_history(second.mlflow_run_id, "iterate/pairs")
    assert sorted((m.step, m.value) for m in history)[1] == (1, len(pairing.pairs))
    round_metrics = {m.name for m in GLOSSARY if m.kind == "round"}  # what docs/metrics.md lists, both ways
    assert set(parents[0].data.metrics) == round_metrics | {"eval/answer_accuracy"}
    for name in round_metrics:
        assert sorted(m.step for m in client.get_metric_history(second.mlflow_run_id, name)) == [0, 1], name
    # The parent's held-out accuracy at the steps trained so far: round 0's start, then each round's end.
    accuracy = {m.step: m.value for m in client.get_metric_history(second.mlflow_run_id, "eval/answer_accuracy")}
    assert sorted(accuracy) == [0, 2, 4] and accuracy[4] == round_1["metrics"]["eval/answer_accuracy"]


def _mtime(location: str, name: str) -> int:
    return os.stat(os.path.join(location, name)).st_mtime_ns
