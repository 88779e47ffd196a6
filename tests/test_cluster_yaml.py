"""cluster.yaml is what `ray up` reads: it must pass Ray's own schema and keep what docs/cluster.md promises
(the pinned image is the installed Ray, nothing binds to all interfaces, the repo is installed, no secrets).

No network and no Ray start: `ray up` runs the same prepare_config + validate_config before it calls AWS.
"""

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = yaml.safe_load((ROOT / "cluster.yaml").read_text())
SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _commands(cfg: dict) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    node_type_keys = ("initialization_commands", "worker_setup_commands")
    return ([cmd for key in keys for cmd in cfg.get(key, [])]
            + [cmd for node in cfg["available_node_types"].values() for key in node_type_keys
               for cmd in node.get(key, [])])


def _shared_mount(cfg: dict) -> str:
    """The host path bind-mounted into the container at the same path: the shared filesystem."""
    binds = [re.fullmatch(r"-v (\S+):(\S+)", opt) for opt in cfg["docker"]["run_options"]]
    (mount,) = [m.group(1) for m in binds if m and m.group(1) == m.group(2)]
    return mount


def test_matches_rays_schema():
    jsonschema.validate(CLUSTER, SCHEMA)


def test_passes_ray_up_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(CLUSTER)))


@pytest.mark.parametrize("path, typo", [((), "setup_comands"), (("docker",), "imgae"),
                                        (("available_node_types", "gpu_worker"), "max_worker")])
def test_schema_rejects_a_misspelled_key(path, typo):
    bad = copy.deepcopy(CLUSTER)
    parent = bad
    for key in path:
        parent = parent[key]
    right = {"setup_comands": "setup_commands", "imgae": "image", "max_worker": "max_workers"}[typo]
    parent[typo] = parent.pop(right)
    with pytest.raises(jsonschema.ValidationError, match=typo):
        jsonschema.validate(bad, SCHEMA)


def test_image_is_the_pinned_ray_gpu_image_of_the_installed_ray():
    docker = CLUSTER["docker"]
    images = {docker["image"], docker.get("head_image", docker["image"]), docker.get("worker_image", docker["image"])}
    images |= {node["docker"]["worker_image"] for node in CLUSTER["available_node_types"].values()
               if "worker_image" in node.get("docker", {})}
    for image in images:
        pinned = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3\d+-gpu", image)
        assert pinned, f"{image}: want rayproject/ray:<x.y.z>-py3XX-gpu (not ray-ml, not latest, not unpinned)"
        assert pinned.group(1) == ray.__version__, f"{image} != installed ray {ray.__version__}"


def test_nothing_binds_to_all_interfaces():
    commands = _commands(CLUSTER)
    (mlflow,) = [cmd for cmd in commands if "mlflow server" in cmd]
    host = re.search(r"--host[= ]+(\S+)", mlflow)
    assert host, "mlflow server needs an explicit --host (the head's private IP)"
    assert host.group(1).strip("\"'") not in {"0.0.0.0", "::", "[::]", "127.0.0.1", "localhost"}
    (head_start,) = [cmd for cmd in CLUSTER["head_start_ray_commands"] if "ray start --head" in cmd]
    assert "--dashboard-host=127.0.0.1" in head_start
    assert not [cmd for cmd in commands if "0.0.0.0" in cmd or "--host ::" in cmd]


def test_ray_token_auth_is_on_and_the_token_is_synced_not_written():
    assert "-e RAY_AUTH_MODE=token" in CLUSTER["docker"]["run_options"]
    assert CLUSTER["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_setup_installs_this_package_from_the_synced_repo():
    (remote,) = [remote for remote, local in CLUSTER["file_mounts"].items() if (ROOT / local).resolve() == ROOT]
    assert f"pip install -e {remote}" in CLUSTER["setup_commands"]
    setup = " ".join(CLUSTER["setup_commands"])
    assert "torch==" not in setup and "whl/cpu" not in setup, "torch must come as the CUDA build"


def test_head_runs_no_trials_and_gpu_workers_autoscale_from_zero():
    nodes = CLUSTER["available_node_types"]
    head = nodes[CLUSTER["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    workers = [node for name, node in nodes.items() if name != CLUSTER["head_node_type"]]
    assert workers and all(node["min_workers"] == 0 and node["max_workers"] >= 1 for node in workers)


def test_no_secrets_in_the_file():
    """A token or key literal, or a credential variable given a literal value ($VAR references are fine)."""
    text = (ROOT / "cluster.yaml").read_text()
    leaks = re.findall(r"hf_[A-Za-z0-9]{30,}|AKIA[0-9A-Z]{16}|"
                       r"(?:HF_TOKEN|HUGGING_FACE_HUB_TOKEN|AWS_ACCESS_KEY_ID|AWS_SECRET_ACCESS_KEY|RAY_AUTH_TOKEN)"
                       r"[\\\"']*\s*[=:]\s*[\\\"']*(?!\$)\w", text)
    assert not leaks


def test_object_storage_and_mlflow_match_the_gpu_run_config():
    """sweeps/runs/hub_model_gpu.yaml (and beta_penalty.yaml, built on it) must run unchanged on this cluster:
    its output_dir is the bucket the nodes' instance profiles reach, and MLflow's artifacts go there too."""
    run = yaml.safe_load((ROOT / "sweeps" / "runs" / "hub_model_gpu.yaml").read_text())
    bucket = re.fullmatch(r"s3://([a-z0-9.-]+)/\S+", run["output_dir"]).group(1)
    nodes = CLUSTER["available_node_types"]
    assert nodes["head"]["node_config"]["IamInstanceProfile"] == {"Name": "mdpo-ray-head"}
    assert all(node["node_config"]["IamInstanceProfile"] == {"Name": "mdpo-ray-worker"}
               for name, node in nodes.items() if name != CLUSTER["head_node_type"])
    host = re.fullmatch(r"http://([^:/]+):5000", run["tracking"]["mlflow_uri"]).group(1)
    assert any(f"{host}\" | sudo tee -a /etc/hosts" in cmd for cmd in CLUSTER["initialization_commands"])
    (mlflow,) = [cmd for cmd in _commands(CLUSTER) if "mlflow server" in cmd]
    assert re.search(rf"--artifacts-destination s3://{re.escape(bucket)}/", mlflow)


def test_efs_is_the_alternative_mounted_only_when_asked_for():
    """With EFS_ID empty (the default) nothing is mounted: /mnt/shared is then each node's own disk (and a
    multi-node run refuses an output_dir there); set, it is the shared file system at the same path."""
    mount = _shared_mount(CLUSTER)
    (efs,) = [cmd for cmd in CLUSTER["initialization_commands"] if "mount -t nfs4" in cmd]
    assert efs.startswith("EFS_ID=;") and 'if [ -n "$EFS_ID" ]; then' in efs and mount in efs
