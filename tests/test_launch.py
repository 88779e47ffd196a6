"""Fast tier: how `cluster.init_ray` starts or joins Ray (ray.init is replaced; nothing starts), and what
a run does when it cannot."""

import socket

import pytest

from mdpo_ray import cluster, launch


@pytest.fixture
def ray_init_calls(monkeypatch):
    import ray

    calls = []
    monkeypatch.setattr(ray._private.services, "find_bootstrap_address", lambda temp_dir: None)  # no `ray start` here
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    for key in (*cluster.RAY_ENV, *cluster.LOCAL_RAY_ENV, *cluster.CPU_ALLOCATOR_ENV, "RAY_ADDRESS"):
        monkeypatch.delenv(key, raising=False)
    return calls


def test_a_local_instance_gets_the_local_settings(ray_init_calls):
    assert cluster.init_ray(use_gpu=True) is True
    (kwargs,) = ray_init_calls
    assert kwargs["runtime_env"]["env_vars"] == cluster.RAY_ENV | cluster.LOCAL_RAY_ENV


def test_a_cpu_only_local_instance_keeps_freed_memory_in_its_workers(ray_init_calls):
    assert cluster.init_ray(use_gpu=False) is True
    (kwargs,) = ray_init_calls
    assert kwargs["runtime_env"]["env_vars"] == cluster.RAY_ENV | cluster.LOCAL_RAY_ENV | cluster.CPU_ALLOCATOR_ENV


def test_a_glibc_setting_of_the_users_own_is_left_alone(ray_init_calls, monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "")  # even empty: glibc's defaults, inherited by the workers
    cluster.init_ray(use_gpu=False)
    (kwargs,) = ray_init_calls
    assert "GLIBC_TUNABLES" not in kwargs["runtime_env"]["env_vars"]


def test_joining_a_cluster_keeps_its_settings(ray_init_calls, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert cluster.init_ray(use_gpu=False) is False
    (kwargs,) = ray_init_calls
    assert kwargs["runtime_env"]["env_vars"] == cluster.RAY_ENV


def test_a_cluster_that_ray_start_left_on_this_machine_is_joined_untouched(ray_init_calls, monkeypatch):
    """The head node of cluster.yaml (`ray attach`, no RAY_ADDRESS): ray.init joins the autoscaling
    cluster, so it is not local (the sweep's fits-here check would see the head's CPU: 0)."""
    import ray

    monkeypatch.setattr(ray._private.services, "find_bootstrap_address", lambda temp_dir: "10.0.0.5:6379")
    monkeypatch.setattr(cluster.socket, "create_connection", lambda address, timeout: socket.socket())  # it answers
    assert cluster.init_ray(use_gpu=False) is False
    (kwargs,) = ray_init_calls
    assert kwargs["address"] is None  # ray.init's own lookup joins it
    assert kwargs["runtime_env"]["env_vars"] == cluster.RAY_ENV


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_head_that_ray_start_left_here_and_is_gone_gives_a_local_instance(ray_init_calls, monkeypatch, capsys):
    """A killed `ray start` leaves /tmp/ray/ray_current_cluster behind, and plain ray.init() then retries
    that dead address for good. Nothing answers on this machine: start locally, and say why."""
    import ray

    stale = f"127.0.0.1:{_free_port()}"  # nothing listens there
    monkeypatch.setattr(ray._private.services, "find_bootstrap_address", lambda temp_dir: stale)
    assert cluster.init_ray(use_gpu=False) is True
    (kwargs,) = ray_init_calls
    assert kwargs["address"] == "local"
    assert kwargs["runtime_env"]["env_vars"] == cluster.RAY_ENV | cluster.LOCAL_RAY_ENV | cluster.CPU_ALLOCATOR_ENV
    out = capsys.readouterr().out
    assert stale in out and "ray stop" in out


def test_a_cluster_elsewhere_that_does_not_answer_is_an_error_naming_the_file(ray_init_calls, monkeypatch):
    import ray

    from mdpo_ray.config import ConfigError

    def refused(address, timeout):
        raise ConnectionRefusedError(address)

    monkeypatch.setattr(ray._private.services, "find_bootstrap_address", lambda temp_dir: "10.0.0.5:6379")
    monkeypatch.setattr(cluster.socket, "create_connection", refused)
    with pytest.raises(ConfigError, match=r"10\.0\.0\.5:6379.*ray_current_cluster.*ray stop"):
        cluster.init_ray(use_gpu=False)
    assert ray_init_calls == []  # not left retrying it


def test_a_run_whose_ray_cannot_be_reached_is_closed_failed_not_left_running(monkeypatch):
    from mdpo_ray.config import ConfigError, load_config
    from mdpo_ray.tracking import mlflow_runs

    closed = []
    monkeypatch.setattr(launch, "resolve_builtin", lambda cfg: cfg)
    monkeypatch.setattr(launch, "_open_run", lambda cfg, tags: "run-1")
    monkeypatch.setattr(mlflow_runs, "close_run", lambda cfg, run_id, succeeded: closed.append((run_id, succeeded)))
    monkeypatch.setattr(cluster, "init_ray", lambda **_: (_ for _ in ()).throw(ConfigError("no Ray cluster answers")))
    with pytest.raises(ConfigError):
        launch.train(load_config(None, []))
    assert closed == [("run-1", False)]


def _default_callbacks(monkeypatch, *, head: bool) -> set[str]:
    """Train's default callbacks when ray.init in this process started a head node (or joined one)."""
    import types

    import ray.train

    node = types.SimpleNamespace(is_head=lambda: head)
    monkeypatch.setattr(ray._private.worker, "_global_node", node, raising=False)
    trainer = cluster.trainer(lambda: None, scaling_config=ray.train.ScalingConfig(num_workers=1))
    return {type(c).__name__ for c in trainer._create_default_callbacks()}


CLUSTER_ONLY = {"PlacementGroupCleanerCallback", "DatasetsCallback"}


def test_an_instance_started_here_trains_without_the_cluster_only_actors(monkeypatch):
    callbacks = _default_callbacks(monkeypatch, head=True)
    assert "BackendSetupCallback" in callbacks  # the rest of Train's defaults are kept
    assert not callbacks & CLUSTER_ONLY


def test_a_joined_cluster_keeps_all_of_trains_actors(monkeypatch):
    assert _default_callbacks(monkeypatch, head=False) >= CLUSTER_ONLY | {"BackendSetupCallback"}


@pytest.mark.parametrize("entry", ["worker_entry", "precompute_entry"])
def test_a_gpu_worker_trains_on_the_gpu_ray_gave_it(monkeypatch, entry):
    """Ray Train's device, not the local rank: they differ when Ray's GPU order is not the workers'."""
    import ray.train
    import ray.train.torch
    import torch

    from mdpo_ray.config import load_config
    from mdpo_ray.training import train_loop

    class Context:
        def get_local_rank(self):
            return 1

        def get_world_rank(self):
            return 1

    seen = []
    monkeypatch.setattr(ray.train, "get_context", Context)
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cuda", 3))
    monkeypatch.setattr(train_loop, "train", lambda cfg, worker: seen.append(worker.gpu))
    monkeypatch.setattr(train_loop, "precompute_reference", lambda cfg, worker: seen.append(worker.gpu))
    for use_gpu, gpu in (("true", 3), ("false", 0)):
        cfg = load_config(None, [f"scaling.use_gpu={use_gpu}", "tracking.mlflow_uri=sqlite:////nonexistent/m.db"])
        getattr(launch, entry)({"config": cfg.model_dump(mode="json"), "mlflow_run_id": None})
        assert seen.pop() == gpu


@pytest.mark.parametrize("strategy", ["PACK", "SPREAD", "STRICT_SPREAD"])
def test_the_placement_strategy_reaches_rays_scaling_config(strategy):
    from mdpo_ray.config import load_config

    cfg = load_config(None, [f"scaling.placement_strategy={strategy}", "scaling.num_workers=4"])
    scaling = launch._scaling(cfg)
    assert (scaling.placement_strategy, scaling.num_workers) == (strategy, 4)


def test_the_placement_strategy_defaults_to_rays_and_a_wrong_one_names_the_key():
    from mdpo_ray.config import ConfigError, load_config

    assert launch._scaling(load_config(None, [])).placement_strategy == "PACK"
    with pytest.raises(ConfigError, match="scaling.placement_strategy"):
        load_config(None, ["scaling.placement_strategy=spread_out"])
