"""System tier, across nodes: a Ray cluster of a head and two worker nodes on this machine
(ray.cluster_utils.Cluster: each node its own raylet with its own resources, joined by the head's
address as `ray start --address` joins them), shared by the module. On it: a run spread one worker
per node that has a worker process killed, then loses a node, and ends where an uninterrupted one-node
run ends; and a sweep whose trials spread over both nodes and share one reference table."""

import os
import signal
import socket
import threading
import time

import pytest
import torch
from conftest import s3_keys, s3_server
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM

from mdpo_ray.config import load_config
from mdpo_ray.sweep_config import load_sweep, trial_config
from mdpo_ray.tracking.mlflow_runs import WORKER_NODES_TAG

pytestmark = pytest.mark.slow

BUCKET = "mdpo-multinode"
NODE_CPUS = 2  # a node fits both workers of a run: PACK puts them on one node, SPREAD on two
STEPS, EVERY, LOG_EVERY = 30, 10, 5


@pytest.fixture(scope="module")
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    from mdpo_ray.cluster import RAY_ENV

    # The S3 server's settings, like RAY_ENV, before the nodes start, so their workers get them too.
    with s3_server(BUCKET), pytest.MonkeyPatch.context() as env:
        for key, value in RAY_ENV.items():
            env.setenv(key, value)
        # CPU 0: as on cluster.yaml's head, nothing trains there. The dashboard (Ray's State API) on a
        # free port: another Ray on this machine may hold the default one.
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            dashboard_port = probe.getsockname()[1]
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "dashboard_port": dashboard_port})
        for _ in range(2):
            cluster.add_node(num_cpus=NODE_CPUS)
        ray.init(address=cluster.address)
        try:
            yield cluster
        finally:
            ray.shutdown()
            cluster.shutdown()


@pytest.fixture(scope="module")
def base(tiny_overrides_under, tmp_path_factory):
    """Overrides of the runs here: the tiny task, 30 fp32 steps with a checkpoint every 10."""
    return [*tiny_overrides_under(tmp_path_factory.mktemp("multinode")), f"optim.max_steps={STEPS}",
            f"checkpoint.every_steps={EVERY}", f"tracking.log_every_steps={LOG_EVERY}", "optim.lr=1e-3",
            "scaling.mixed_precision=fp32"]


@pytest.fixture(scope="module")
def one_node_run(two_nodes, base):
    """The uninterrupted reference: 2 workers, PACK (the default), so both on one node."""
    from mdpo_ray import launch

    summary = launch.train(load_config(None, [*base, "scaling.num_workers=2", "name=one-node"]))
    return summary, _losses(summary), _parameters(summary)


def _client(cfg) -> MlflowClient:
    return MlflowClient(tracking_uri=cfg.mlflow_uri)


def _run(cfg):
    """The MLflow run named cfg.name (None before launch.train has opened it)."""
    client = _client(cfg)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id], f"tags.`mdpo.run_name` = '{cfg.name}'") if experiment else []
    assert len(runs) <= 1
    return runs[0] if runs else None


def _placement(run) -> dict[int, str]:
    """Rank -> Ray node id, from the tag rank 0 sets at each (re)start: "<node>:<ranks>;..."."""
    ranks = {}
    for group in run.data.tags[WORKER_NODES_TAG].split(";"):
        node, _, listed = group.partition(":")
        ranks |= {int(rank): node for rank in listed.split(",")}
    return ranks


def _losses(summary) -> list[tuple[int, float]]:
    history = _client(summary.config).get_metric_history(summary.mlflow_run_id, "loss")
    return [(m.step, m.value) for m in history]


def _parameters(summary) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(summary.export_dir).state_dict()


def _worker_nodes(cluster) -> set[str]:
    return {node.node_id for node in cluster.worker_nodes}


def _in_turn(steps: list, done: list, deadline_s=600) -> None:
    """A watcher thread: for each (path, action) in turn, once `path` exists (a checkpoint: the run is past
    it), runs `action` and appends what it returns to `done`."""
    def watch():
        deadline = time.time() + deadline_s
        for path, action in steps:
            while not path.exists():
                if time.time() > deadline:
                    return
                time.sleep(0.05)
            done.append(action())
    threading.Thread(target=watch, daemon=True).start()


def _ends_like(summary, one_node, *, name):
    """The run finished in one MLflow run, logged the one-node run's losses and ended at its parameters."""
    _, reference_losses, reference_parameters = one_node
    run = _run(summary.config)
    assert run.info.status == "FINISHED" and run.info.run_id == summary.mlflow_run_id, name
    losses = _losses(summary)
    steps = [step for step, _ in losses]
    assert set(steps) == {0, *range(LOG_EVERY, STEPS + 1, LOG_EVERY)}, steps  # steps after the checkpoint may repeat
    assert steps[-1] == STEPS
    expected = dict(reference_losses)
    for step, value in losses:  # every logged loss, the repeated ones after the restart included
        assert value == pytest.approx(expected[step], rel=1e-4), (name, step)
    parameters = _parameters(summary)
    assert parameters.keys() == reference_parameters.keys()
    for key, value in reference_parameters.items():
        torch.testing.assert_close(parameters[key], value, rtol=0, atol=1e-5, msg=f"{name}: {key}")
    # The figures docs/cluster.md quotes (shown with pytest -rP).
    print(f"{name}: {len(losses)} loss points over {len(set(steps))} steps, max relative loss difference "
          f"{max(abs(v / expected[s] - 1) for s, v in losses):.1e}, max parameter difference "
          f"{max((parameters[k] - v).abs().max().item() for k, v in reference_parameters.items()):.1e}")
    return run


def test_a_run_spread_over_two_nodes_survives_a_killed_worker_and_a_lost_node(two_nodes, base, one_node_run):
    """One worker per node (SPREAD). Past checkpoint 10 a worker process is killed (an OOM kill); past
    checkpoint 20 the node of rank 1 is taken away (its raylet and every process on it killed). Each time
    the worker group restarts from the latest checkpoint, the second time on the capacity left (the other
    node), in the same MLflow run. Every logged loss and the final parameters match the uninterrupted
    one-node (PACK) run's."""
    from ray.util.state import list_actors

    from mdpo_ray import launch

    one_node = set(_placement(_run(one_node_run[0].config)).values())
    assert len(one_node) == 1 and one_node <= _worker_nodes(two_nodes)  # PACK: both workers on one node

    cfg = load_config(None, [*base, "scaling.num_workers=2", "scaling.placement_strategy=SPREAD",
                             "scaling.max_failures=2", "name=spread"])

    def kill_the_worker_of_rank_0():
        placement = _placement(_run(cfg))
        # This cluster's Train workers only: other Ray instances on the machine are not ours to kill.
        (worker,) = list_actors(address=two_nodes.address,
                                filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE"),
                                         ("node_id", "=", placement[0])])
        os.kill(worker.pid, signal.SIGKILL)  # no chance to clean up
        return placement

    def lose_the_node_of_rank_1():
        placement = _placement(_run(cfg))  # as the first restart placed the workers
        lost = next(node for node in two_nodes.worker_nodes if node.node_id == placement[1])
        two_nodes.remove_node(lost, allow_graceful=False)
        return placement

    faults: list[dict[int, str]] = []
    _in_turn([(cfg.run_dir / f"checkpoint_{EVERY:06d}", kill_the_worker_of_rank_0),
              (cfg.run_dir / f"checkpoint_{2 * EVERY:06d}", lose_the_node_of_rank_1)], faults)
    try:
        summary = launch.train(cfg)
    finally:
        if len(faults) == 2:  # the module's cluster gets its second worker node back (Ray adds nodes from the main thread only)
            two_nodes.add_node(num_cpus=NODE_CPUS)
    assert len(faults) == 2, f"the test caused {len(faults)} of its 2 faults"

    for placement in faults:  # at the start and after the first restart: one worker per node
        assert sorted(placement) == [0, 1] and placement[0] != placement[1], placement
    lost = faults[1][1]
    run = _ends_like(summary, one_node_run, name="spread")
    restarted = _placement(run)  # the tag the second restart set
    assert lost not in restarted.values() and set(restarted.values()) <= _worker_nodes(two_nodes), restarted
    evals = _client(cfg).get_metric_history(run.info.run_id, "eval/answer_accuracy")
    assert {m.step for m in evals} == {0, STEPS}  # evaluated before training and at the end
    checkpoint = summary.checkpoint and os.path.basename(summary.checkpoint)
    assert checkpoint == f"checkpoint_{STEPS:06d}"
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(os.listdir(summary.checkpoint))


SWEEP = f"""
name: spread-sweep
run:
  reference: precompute
  # One trial fills a node: two at a time can only run one on each node.
  scaling: {{num_workers: 1, cpus_per_worker: {NODE_CPUS}}}
space:
  loss.beta: {{grid: [0.1, 0.5]}}
metric: eval/rewards/accuracies
mode: max
"""


def test_a_sweep_spreads_its_trials_over_both_nodes_sharing_one_reference_table(two_nodes, tiny_overrides_under,
                                                                                 tmp_path):
    import boto3

    from mdpo_ray import storage
    from mdpo_ray import sweep as sweeps

    path = tmp_path / "spread.yaml"
    path.write_text(SWEEP)
    # Nodes without a shared file system keep a sweep on object storage: its reference tables, the trials'
    # checkpoints and exports, and its report (MLflow's store is a server on a cluster; here a local file).
    overrides = [*tiny_overrides_under(tmp_path), f"output_dir=s3://{BUCKET}/sweeps",
                 f"tracking.mlflow_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    sweep, base = load_sweep(path, overrides)
    summary = sweeps.run_sweep(sweep, base)
    cfg = trial_config(base, sweeps.shared_run_keys(sweep, base) | {"name": "x"})
    client = _client(cfg)
    children = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{summary.parent_run_id}'")
    assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}
    nodes = [_placement(child)[0] for child in children]
    assert len(set(nodes)) == 2 and set(nodes) <= _worker_nodes(two_nodes), nodes
    # One table pair (train, held-out) computed before the trials, then read by each trial on its node.
    assert {c.data.tags["mdpo.reference_cache"] for c in children} == {"reused,reused"}
    keys = s3_keys(boto3.client("s3"), BUCKET, "sweeps/spread-sweep/")
    tables = [k for k in keys if "/reference_logps/" in k and not k.rsplit("/", 1)[1].startswith("generation-")]
    assert len(tables) == 2, keys
    for child in children:  # each trial's export, from whichever node ran it
        assert f"sweeps/spread-sweep/{child.data.tags['mdpo.run_name']}/export/model.safetensors" in keys, keys
    assert sum("/checkpoint_" in k and k.endswith(".metadata") for k in keys) >= 2, keys  # a checkpoint a trial
    assert "sweeps/spread-sweep/report/trials.md" in keys and summary.report.markdown_path.startswith("s3://")
    assert not list(tmp_path.rglob("s3:*"))  # nothing went to a local folder named like the URI
    assert storage.is_remote(cfg.output_dir)
