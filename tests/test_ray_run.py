"""System tier: a real 2-worker Ray Train FSDP2 run on CPU, its MLflow run, checkpoint, resume and export."""

import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from mdpo_ray.config import load_config
from mdpo_ray.training.train_loop import Worker, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_local():
    from mdpo_ray import cluster

    with pytest.MonkeyPatch.context() as env:
        env.delenv("GLIBC_TUNABLES", raising=False)  # a CPU-only instance's own allocator settings, tested below
        cluster.init_ray(use_gpu=False)
    yield
    cluster.stop_ray()


class _Sink:
    def __init__(self):
        self.logged = {}

    def log(self, metrics, step):
        self.logged.setdefault(step, {}).update(metrics)

    def tag(self, key, value):
        pass


def test_two_worker_run_tracks_checkpoints_resumes_and_exports(ray_local, tiny_run_overrides):
    from mdpo_ray import launch

    cfg = load_config(None, [*tiny_run_overrides, "optim.max_steps=4", "scaling.num_workers=2"])
    first = launch.train(cfg)

    # The instance is this process's own: Train ran without the actors only a shared cluster needs.
    import ray
    from ray.util.state import list_actors

    # By its address: with no address the State API looks for Ray instances on the machine, and refuses to
    # choose when it finds two (another test process's).
    here = ray.get_runtime_context().gcs_address
    actors = {a.class_name for a in list_actors(address=here, limit=10_000)}
    assert {"TrainController", "RayTrainWorker"} <= actors
    assert not actors & {"PlacementGroupCleaner", "DatasetManager"}
    # The run's controller ends with the run, while the instance is whole: Ray's Ctrl-C handler, which holds
    # it, is removed when fit returns (else it lives until this process exits, and can outlive the instance).
    alive = [("class_name", "=", "TrainController"), ("state", "=", "ALIVE"),
             ("job_id", "=", ray.get_runtime_context().get_job_id())]
    deadline = time.time() + 60
    while list_actors(address=here, filters=alive) and time.time() < deadline:
        time.sleep(0.5)
    assert not list_actors(address=here, filters=alive)

    client = MlflowClient(tracking_uri=cfg.mlflow_uri)
    run = client.get_run(first.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["loss.name"] == "minor_dpo" and run.data.params["scaling.num_workers"] == "2"
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["config.yaml"]
    for key in ("loss", "rewards/margins", "logps/rejected", "delta_rejected/p50", "stability/penalty_off_frac",
                "grad_norm", "lr", "perf/tokens_per_s", "eval/answer_accuracy"):
        assert key in run.data.metrics, key
    assert run.data.tags["data/train_kept"].isdigit() and not any(k.startswith("data/") for k in run.data.metrics)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [0, 1, 2, 3, 4]

    checkpoint = Path(first.checkpoint)
    assert checkpoint.name == "checkpoint_000004"
    assert {p.name for p in checkpoint.iterdir()} >= {".metadata", "__0_0.distcp", "__1_0.distcp", "trainer_state.json"}

    # FSDP2 over 2 workers computes the same losses as one in-process worker on the same global batches.
    single = _Sink()
    train(load_config(None, [*tiny_run_overrides, "optim.max_steps=4", "scaling.num_workers=1", "name=single"]),
          Worker(sink=single))
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    for step in (0, 1, 2, 3, 4):
        assert history[step] == pytest.approx(single.logged[step]["loss"], rel=1e-4)

    # Same run name, more steps: resumes from checkpoint 4 and continues the same MLflow run.
    longer = launch.train(load_config(None, [*tiny_run_overrides, "optim.max_steps=6", "scaling.num_workers=2"]))
    assert longer.mlflow_run_id == first.mlflow_run_id
    assert client.get_run(longer.mlflow_run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [0, 1, 2, 3, 4, 5, 6]
    assert Path(longer.checkpoint).name == "checkpoint_000006"

    model = AutoModelForCausalLM.from_pretrained(longer.export_dir)
    tokenizer = AutoTokenizer.from_pretrained(longer.export_dir)
    with torch.no_grad():
        ids = tokenizer("Q: 1+2= A:", return_tensors="pt")["input_ids"]
        assert torch.isfinite(model(ids).logits).all()
    describe = launch.describe(longer)
    assert "MLflow UI" in describe and str(longer.export_dir) in describe
    from huggingface_hub import ModelCard

    card = ModelCard.load(longer.export_dir / "README.md").text  # written by a Ray worker: the driver's run id
    assert f"MLflow run `{longer.mlflow_run_id}`" in card and "| steps | 6 of `optim.max_steps` = 6 |" in card
    final = client.get_run(longer.mlflow_run_id).data.metrics["eval/delta_chosen/mean"]
    assert f"| `eval/delta_chosen/mean` | 0 | {final:.4g} |" in card


def test_local_workers_run_at_niceness_zero_with_the_local_settings(ray_local):
    """What init_ray asked of the local instance reached its workers (the raylet starts them)."""
    import os

    import ray

    from mdpo_ray import cluster

    @ray.remote
    def probe():
        return os.nice(0), {key: os.environ.get(key) for key in cluster.LOCAL_RAY_ENV}

    niceness, env = ray.get(probe.remote())
    assert niceness == 0  # Ray's default for workers is 15
    assert env == cluster.LOCAL_RAY_ENV


def test_cpu_only_local_workers_keep_freed_memory(ray_local):
    """The allocator settings reached glibc in the workers, which reads them only when a process starts:
    a freed 100 MiB block is used again without faulting in its 25,600 pages."""
    import ray

    def faults_per_block(megabytes: int = 100) -> int:
        """Minor page faults of a non-main thread (where Ray Train runs the loop) that allocates, fills and
        frees the same large block again and again, as a CPU step does with its logits."""
        import ctypes
        import resource
        import threading

        libc = ctypes.CDLL("libc.so.6")
        libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
        libc.free.argtypes, libc.memset.argtypes = [ctypes.c_void_p], [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
        faults = []

        def block() -> None:
            size = megabytes << 20
            pointer = libc.malloc(size)
            libc.memset(pointer, 1, size)
            libc.free(pointer)

        def loop() -> None:
            block()  # the first time faults in any case
            before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
            for _ in range(5):
                block()
            faults.append((resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before) // 5)

        thread = threading.Thread(target=loop)
        thread.start()
        thread.join()
        return faults[0]

    tuned = ray.get(ray.remote(faults_per_block).remote())
    defaults = ray.get(ray.remote(faults_per_block).options(runtime_env={"env_vars": {"GLIBC_TUNABLES": ""}}).remote())
    assert defaults > 20_000  # glibc's defaults: mmap'd, unmapped on free, faulted in again
    assert tuned < 1_000
