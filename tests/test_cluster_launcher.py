"""System tier: cluster.yaml's autoscaling, brought up on this machine.

`ray up cluster.yaml` provisions the head (SSH, docker, setup commands), then runs its
head_start_ray_commands: `ray start --head --autoscaling-config=~/ray_bootstrap_config.yaml`, whose
autoscaler launches gpu_worker nodes when work asks for GPUs. Here that last step runs for real, from a
trimmed copy of cluster.yaml, on Ray's fake_multinode provider, which launches each node as a raylet on
this machine. Provisioning needs AWS, and `ray up` itself cannot drive the fake provider (why: the
"What survives what" section of docs/cluster.md).
"""

import copy
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
FAKE_HEAD_TYPE = "ray.head.default"  # the fake provider's head node type, fixed by Ray

# Run in a fresh interpreter (Ray reads the token settings once per process): wait for the autoscaler to
# start a node for a GPU task, then say where the task ran and what nodes there were before and after.
CLIENT = """
import json, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
alive = lambda: {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
before = alive()
node = ray.get(ray.remote(num_gpus=1)(lambda: ray.get_runtime_context().get_node_id()).remote(), timeout=240)
print(json.dumps({"before": before, "ran_on": node, "after": alive()}))
"""


def _fake_copy(gcs_address: str) -> dict:
    """cluster.yaml as the fake provider can run it: its node types, limits and autoscaling settings kept;
    nothing to provision (no SSH, docker, synced files or setup commands); resources stated, since no
    instance type is there to read them from."""
    cfg = copy.deepcopy(yaml.safe_load((ROOT / "cluster.yaml").read_text()))
    cfg["provider"] = {"type": "fake_multinode", "gcs_address": gcs_address, "use_node_id_as_ip": True,
                       "disable_node_updaters": True, "disable_launch_config_check": True}
    cfg |= {"auth": {}, "docker": {}, "file_mounts": {}, "initialization_commands": [], "setup_commands": [],
            "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
            "worker_start_ray_commands": []}
    types = cfg["available_node_types"]
    types[FAKE_HEAD_TYPE] = types.pop(cfg["head_node_type"])
    cfg["head_node_type"] = FAKE_HEAD_TYPE
    for node_type in types.values():
        node_type["node_config"] = {}
    # 1 CPU: Ray starts a Python worker per CPU on a node, and a g6e.48xlarge has 192.
    types["gpu_worker"]["resources"] = {"CPU": 1, "GPU": 8}
    return cfg


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _stop(head: subprocess.Popen) -> None:
    """SIGTERM the `ray start --block` process (it stops the head's processes), then end whatever is left in
    its session by pid: the worker nodes the autoscaler started. Never `ray stop`: it stops every Ray
    instance on the machine."""
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        head.kill()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if os.getsid(int(entry.name)) == head.pid:
                        left.append(int(entry.name))
                except OSError:
                    continue
        for pid in left:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        if not left:
            return
        time.sleep(3)


def test_cluster_yaml_head_starts_a_gpu_worker_when_work_asks_for_a_gpu():
    import ray

    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    workers = cfg["available_node_types"]["gpu_worker"]
    assert cfg["available_node_types"][cfg["head_node_type"]]["resources"] == {"CPU": 0}
    assert workers["min_workers"] == 0  # so only demand starts one

    temp_dir = tempfile.mkdtemp(prefix="ray-fake-")  # short: Ray's socket paths live under it
    address = f"{ray.util.get_node_ip_address()}:{_free_port()}"
    config = Path(temp_dir) / "cluster.yaml"
    config.write_text(yaml.safe_dump(_fake_copy(address)))
    # Token auth, as cluster.yaml turns on in every container; a token of this test's own.
    env = os.environ | {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_AUTH_MODE": "token",
                        "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_TMPDIR": temp_dir}  # its address file there
    env.pop("RAY_ADDRESS", None)
    log = (Path(temp_dir) / "head.log").open("w")
    head = subprocess.Popen(
        ["ray", "start", "--head", f"--port={address.rpartition(':')[2]}", "--num-cpus=0", f"--temp-dir={temp_dir}",
         f"--autoscaling-config={config}", "--include-dashboard=false", "--disable-usage-stats", "--block"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        client = subprocess.run([sys.executable, "-c", CLIENT, address], env=env, capture_output=True, text=True,
                                timeout=300, check=False)
        assert client.returncode == 0, client.stderr[-3000:] + (Path(temp_dir) / "head.log").read_text()[-3000:]
        seen = json.loads(client.stdout.strip().splitlines()[-1])
        status = subprocess.run(["ray", "status", f"--address={address}"], env=env, capture_output=True, text=True,
                                timeout=60, check=True).stdout
    finally:
        _stop(head)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)

    (head_id,) = seen["before"]  # at first the head alone, offering no CPU (nothing trains there)
    assert seen["before"][head_id].get("CPU", 0) == 0
    assert seen["ran_on"] != head_id  # the autoscaler started a node for the GPU task, which ran there
    assert seen["after"][seen["ran_on"]]["GPU"] == 8
    assert 2 <= len(seen["after"]) <= 1 + workers["max_workers"]
    assert "gpu_worker" in status, status  # `ray status` names the node type it launched
