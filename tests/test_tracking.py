"""What the driver writes to MLflow for the UI: against one real sqlite store per module (creating one
costs seconds: MLflow migrates its schema); no Ray, no training."""

import pytest
from mlflow.tracking import MlflowClient

from mdpo_ray import tracking
from mdpo_ray.config import load_config


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("store")


def _cfg(store, *overrides):
    return load_config(None, [f"output_dir={store}", *overrides])


def test_a_new_experiment_opens_as_model_development(store):
    cfg = _cfg(store, "tracking.experiment=new", "name=kind")
    run_id, _ = tracking.open_run(cfg)
    client = MlflowClient(cfg.mlflow_uri)
    experiment = client.get_experiment(client.get_run(run_id).info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_an_existing_experiment_is_tagged_unless_it_has_a_kind_of_its_own(store):
    client = MlflowClient(_cfg(store).mlflow_uri)
    untagged = client.create_experiment("untagged")
    chosen = client.create_experiment("genai", tags={"mlflow.experimentKind": "genai_development"})
    for experiment in ("untagged", "genai"):
        tracking.open_run(_cfg(store, f"tracking.experiment={experiment}", "name=kind"))
    assert client.get_experiment(untagged).tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_experiment(chosen).tags["mlflow.experimentKind"] == "genai_development"
