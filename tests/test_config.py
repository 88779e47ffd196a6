"""Config: YAML + dotted overrides validated once; errors name the key and the fix; exit code 2 before Ray."""

import subprocess
import sys

import pytest

from mdpo_ray.config import BUILTIN, ConfigError, flatten, load_config, to_yaml, validate_config


def test_defaults_are_the_builtin_minor_dpo_run():
    cfg = load_config()
    assert cfg.loss.name == "minor_dpo" and cfg.loss.reject_threshold == 0.0
    assert cfg.data.train == BUILTIN and cfg.model.name_or_path == BUILTIN
    assert cfg.scaling.num_workers == 2
    assert cfg.per_worker_batch_size == cfg.optim.batch_size // 2


def test_eval_curves_have_five_points_after_the_first_by_default():
    assert load_config().eval_every_steps == 20  # 100 steps, logging every 10: evals at 0, 20, ..., 100
    assert load_config(None, ["optim.max_steps=30"]).eval_every_steps == 10  # never between logging steps
    assert load_config(None, ["eval.every_steps=0"]).eval_every_steps == 0  # before and after only


def test_yaml_then_overrides_revalidated(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("loss:\n  name: dpo\n  beta: 0.2\noptim:\n  lr: 3.0e-5\n")
    cfg = load_config(path, ["loss.beta=0.5", "optim.betas=[0.9, 0.95]", "scaling.num_workers=1"])
    assert (cfg.loss.name, cfg.loss.beta, cfg.optim.lr, cfg.optim.betas) == ("dpo", 0.5, 3e-5, (0.9, 0.95))
    with pytest.raises(ConfigError, match="loss.beta"):
        load_config(path, ["loss.beta=0"])


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("loss.betta=1", "loss.betta: unknown key"),
        ("loss.reject_threshold=0.5", "loss.reject_threshold"),
        ("loss.name=kto", "loss.name"),
        ("optim.batch_size=15", "optim.batch_size (15) must be a multiple of scaling.num_workers (2)"),
        ("scaling.mixed_precision=bf16", "needs scaling.use_gpu=true"),
        ("name=bad/name", "name"),
        ("loss", "expected key=value"),
        ("loss.beta.x=1", "loss.beta: Input should be a valid number"),
        ("eval.every_steps=25", "eval.every_steps (25) must be a multiple of tracking.log_every_steps (10)"),
    ],
)
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert needle in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "ok"),
    [
        (["scaling.gpus_per_worker=1"], True),
        (["scaling.num_workers=1", "scaling.gpus_per_worker=0.5"], True),  # sweep trials sharing a GPU
        (["scaling.gpus_per_worker=0.5"], False),  # 2 ranks could land on one GPU: NCCL refuses
        (["scaling.num_workers=1", "scaling.gpus_per_worker=2"], False),  # one rank would leave a GPU idle
    ],
)
def test_gpus_per_worker_is_one_rank_per_gpu(overrides, ok):
    overrides = ["scaling.use_gpu=true", *overrides]
    if ok:
        load_config(None, overrides)
        return
    with pytest.raises(ConfigError, match=r"scaling.gpus_per_worker \(\S+\) must be 1 with scaling.use_gpu=true"):
        load_config(None, overrides)
    load_config(None, overrides[1:])  # on CPU the GPU count is not read


def test_builtin_model_needs_builtin_data():
    with pytest.raises(ConfigError, match="set model.name_or_path to your own model"):
        load_config(None, ["data.train=my.jsonl"])


def test_bad_yaml_file_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("loss: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml is not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pairs.jsonl").write_text("")
    cfg = load_config(None, ["data.train=pairs.jsonl", "model.name_or_path=some-org/hub-model", "output_dir=out"])
    assert cfg.data.train == str(tmp_path / "pairs.jsonl")
    assert cfg.model.name_or_path == "some-org/hub-model"  # not a local path: a hub id, left alone
    assert cfg.output_dir == str(tmp_path / "out")


def test_yaml_round_trip_and_flatten():
    cfg = load_config(None, ["loss.beta=0.3"])
    again = validate_config(__import__("yaml").safe_load(to_yaml(cfg)))
    assert again == cfg
    flat = flatten(cfg)
    assert flat["loss.beta"] == "0.3" and flat["optim.betas"] == "[0.9, 0.999]"


def test_cli_exits_2_on_bad_config_before_ray():
    probe = (
        "import sys; from mdpo_ray.cli import main; rc = main(['train', '--set', 'loss.beta=-1']); "
        "print('ray imported' if 'ray' in sys.modules else 'ray not imported'); sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert "loss.beta: Input should be greater than 0" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout.strip() == "ray not imported"


def test_cli_config_prints_resolved_yaml():
    proc = subprocess.run(
        [sys.executable, "-m", "mdpo_ray", "config", "--set", "loss.name=dpo"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "name: dpo" in proc.stdout


def test_checked_in_run_and_sweep_configs_validate():
    from pathlib import Path

    import yaml

    from mdpo_ray.sweep_config import load_sweep

    for path in sorted((Path(__file__).resolve().parents[1] / "sweeps").rglob("*.yaml")):
        # raises ConfigError naming the file and key if one rots
        load_sweep(path) if "space" in yaml.safe_load(path.read_text()) else load_config(path)


def test_a_relative_output_dir_inside_a_ray_jobs_working_dir_copy_exits_2_naming_the_fix(tmp_path, monkeypatch,
                                                                                           capsys):
    from mdpo_ray.cli import main
    from mdpo_ray.config import check_storage_outlives_job

    copy = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_1"  # as Ray unpacks it
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    assert main(["train", "--set", "optim.max_steps=1"]) == 2
    message = capsys.readouterr().err
    assert f"output_dir ({copy / 'mdpo_runs'}) and tracking.mlflow_uri" in message and "(the default store" in message
    assert "--set output_dir=/mnt/shared/mdpo_runs" in message and "--set tracking.mlflow_uri=http://" in message
    shared = [f"output_dir={tmp_path / 'shared'}"]
    check_storage_outlives_job(load_config(None, shared))  # an absolute output_dir: its default store is fine too
    with pytest.raises(ConfigError, match=r"^tracking.mlflow_uri \(sqlite:///.*runtime_resources"):
        check_storage_outlives_job(load_config(None, [*shared, "tracking.mlflow_uri=sqlite:///mlflow.db"]))
