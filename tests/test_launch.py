"""Fast tier: how `launch.init_ray` starts or joins Ray (ray.init is replaced; nothing starts)."""

import types

import pytest

from mdpo_ray import launch


@pytest.fixture
def ray_init_calls(monkeypatch):
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(ray, "get_runtime_context", lambda: types.SimpleNamespace(gcs_address="10.0.0.1:6379"))
    monkeypatch.setattr(launch, "_local_gcs", None)
    for key in (*launch.RAY_ENV, *launch.LOCAL_RAY_ENV, "RAY_ADDRESS"):
        monkeypatch.delenv(key, raising=False)
    return calls


def test_a_local_instance_gets_the_local_settings(ray_init_calls):
    assert launch.init_ray() is True
    (kwargs,) = ray_init_calls
    assert kwargs["runtime_env"]["env_vars"] == launch.RAY_ENV | launch.LOCAL_RAY_ENV


def test_joining_a_cluster_keeps_its_settings(ray_init_calls, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert launch.init_ray() is False
    (kwargs,) = ray_init_calls
    assert kwargs["runtime_env"]["env_vars"] == launch.RAY_ENV


def _default_callbacks(monkeypatch) -> set[str]:
    import ray.train

    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # as after the init_ray above
    trainer = launch._trainer(lambda: None, scaling_config=ray.train.ScalingConfig(num_workers=1))
    return {type(c).__name__ for c in trainer._create_default_callbacks()}


CLUSTER_ONLY = {"PlacementGroupCleanerCallback", "DatasetsCallback"}


def test_a_local_instance_trains_without_the_cluster_only_actors(ray_init_calls, monkeypatch):
    launch.init_ray()
    callbacks = _default_callbacks(monkeypatch)
    assert "BackendSetupCallback" in callbacks  # the rest of Train's defaults are kept
    assert not callbacks & CLUSTER_ONLY


def test_a_joined_cluster_keeps_all_of_trains_actors(ray_init_calls, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    launch.init_ray()
    assert _default_callbacks(monkeypatch) >= CLUSTER_ONLY | {"BackendSetupCallback"}
