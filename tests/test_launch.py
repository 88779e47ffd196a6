"""Fast tier: how `launch.init_ray` starts or joins Ray (ray.init is replaced; nothing starts)."""

import pytest

from mdpo_ray import launch


@pytest.fixture
def ray_init_calls(monkeypatch):
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
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
