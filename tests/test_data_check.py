"""Fast tier: bad data ends `mdpo-ray train` and `mdpo-ray sweep` on the driver, exit 2 with the message
alone, before Ray starts or an MLflow run opens (mdpo_ray.data.check); and a DataError a Train worker
raises reaches the user first, through Ray's wrappers. Nothing here starts Ray."""

import json
import types

import datasets
import pytest
import ray

from mdpo_ray import cli, cluster
from mdpo_ray.config import DataConfig
from mdpo_ray.data.check import check_pairs
from mdpo_ray.data.rows import DataError


@pytest.fixture(autouse=True)
def no_cluster_here(tmp_path, monkeypatch):
    """As on a machine with no `ray start` cluster: Ray would start a local instance (RAY_TMPDIR is where
    it looks for the address `ray start` leaves)."""
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "no-ray"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def _lines(path, rows):
    path.write_text("".join(row if isinstance(row, str) else json.dumps(row) + "\n" for row in rows))
    return path


def _broken_line_45(tiny_task, tmp_path):
    lines = tiny_task["train"].read_text().splitlines(keepends=True)
    lines[44] = lines[44].replace('"chosen":', '"chosen"', 1)  # line 45 of 48: the parse fails deep in the file
    return _lines(tmp_path / "broken.jsonl", lines)


def _run(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _assert_stopped_before_anything(code, err, tmp_path, expected):
    assert code == 2
    assert err.startswith(f"mdpo-ray: {expected}") and err.count("\n") == 1, err  # the message alone
    assert not ray.is_initialized()
    assert not (tmp_path / "runs").exists()  # no MLflow store, so no run left half-opened; no checkpoints either


def test_a_broken_json_line_ends_train_on_the_driver_with_the_line_to_fix(tiny_task, tiny_run_overrides, tmp_path,
                                                                          capsys):
    bad = _broken_line_45(tiny_task, tmp_path)
    args = [a for o in [*tiny_run_overrides, f"data.train={bad}"] for a in ("--set", o)]
    code, _, err = _run(["train", *args], capsys)
    _assert_stopped_before_anything(code, err, tmp_path, f"could not read {bad}: line 45 is not valid JSON (")
    assert err.rstrip().endswith("fix or delete that line")


BAD_DATA = {  # key -> (file rows, the start of the message)
    "data.train": ([{"prompt": "a", "chosen": "b"}], "{path}: no 'rejected' column"),
    "data.eval": ([{"prompt": "a", "chosen": "b", "rejected": "b"}] * 2, "{path}: none of its 2 rows is a usable"),
    "data.generation_eval": (['{"prompt": "1+1=", "answer": 2}\n', "{oops\n"], "{path}: line 2 is not valid JSON"),
}


@pytest.mark.parametrize("key", BAD_DATA)
def test_bad_eval_or_problem_files_end_train_on_the_driver_too(key, tiny_run_overrides, tmp_path, capsys):
    rows, message = BAD_DATA[key]
    bad = _lines(tmp_path / "bad.jsonl", rows)
    args = [a for o in [*tiny_run_overrides, f"{key}={bad}"] for a in ("--set", o)]
    code, _, err = _run(["train", *args], capsys)
    _assert_stopped_before_anything(code, err, tmp_path, message.format(path=bad))


def test_bad_rows_under_on_bad_rows_error_and_a_missing_file_end_train_on_the_driver(tiny_task, tiny_run_overrides,
                                                                                      tmp_path, capsys):
    rows = [json.loads(line) for line in tiny_task["train"].read_text().splitlines()]
    rows[3]["rejected"] = rows[3]["chosen"]
    bad = _lines(tmp_path / "bad.jsonl", rows)
    args = [a for o in [*tiny_run_overrides, f"data.train={bad}", "data.on_bad_rows=error"] for a in ("--set", o)]
    code, _, err = _run(["train", *args], capsys)
    assert code == 2 and "1 bad rows (0-based; read as data.format=standard):\n  chosen identical to rejected: row 3\n" \
        "Fix them, or set data.on_bad_rows=drop" in err
    assert not ray.is_initialized() and not (tmp_path / "runs").exists()

    missing = tmp_path / "nope.jsonl"
    args = [a for o in [*tiny_run_overrides, f"data.train={missing}"] for a in ("--set", o)]
    code, _, err = _run(["train", *args], capsys)
    _assert_stopped_before_anything(code, err, tmp_path, f"data file not found: {missing}")


def test_a_sweep_checks_its_base_data_before_tune_starts(tiny_task, tiny_run_overrides, tmp_path, capsys):
    bad = _broken_line_45(tiny_task, tmp_path)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("name: doomed\nspace:\n  loss.beta: {grid: [0.1, 0.5]}\nmetric: eval/rewards/accuracies\n")
    args = [a for o in [*tiny_run_overrides, f"data.train={bad}"] for a in ("--set", o)]
    code, _, err = _run(["sweep", str(sweep), *args], capsys)
    assert code == 2 and err.startswith(f"mdpo-ray: could not read {bad}: line 45 is not valid JSON"), err
    assert not ray.is_initialized()
    assert not list(tmp_path.glob("runs/doomed/tune")) and not list(tmp_path.glob("runs/**/doomed-*"))


def test_good_data_is_read_once_here_and_said(tiny_task, tiny_run_overrides):
    """The driver's pass leaves what the workers read in the datasets cache."""
    data = DataConfig(train=str(tiny_task["train"]), eval=str(tiny_task["eval"]))
    loads = []
    said = check_pairs(data, workers_here=True, tokenizer=lambda: loads.append(1) or _tokenizer(tiny_task))
    assert said == [f"data.train: {tiny_task['train']}: 48 rows as data.format=standard, no bad rows",
                    f"data.eval: {tiny_task['eval']}: 12 rows as data.format=standard, no bad rows"]
    assert loads == [1]


def _tokenizer(tiny_task):
    from mdpo_ray.config import ModelConfig
    from mdpo_ray.training.model import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path=str(tiny_task["model"])))


def test_a_path_missing_here_is_left_to_workers_elsewhere_but_an_error_for_workers_here(tmp_path):
    """On a joined cluster the workers may have a path the driver does not (a node-local disk)."""
    missing = str(tmp_path / "on-the-nodes.jsonl")
    unused = lambda: pytest.fail("no tokenizer is needed for a path that is not here")
    said = check_pairs(DataConfig(train=missing), workers_here=False, tokenizer=unused)
    assert said == [f"data.train: {missing} is not on this machine; the Train workers read and check it"]
    with pytest.raises(DataError, match=f"data file not found: {missing}"):
        check_pairs(DataConfig(train=missing), workers_here=True, tokenizer=unused)


def test_a_hub_dataset_is_checked_by_its_card_alone(monkeypatch):
    card = types.SimpleNamespace(splits={"train_prefs": None, "test_prefs": None},
                                 features={"prompt": None, "chosen": None, "rejected": None})
    monkeypatch.setattr(datasets, "load_dataset_builder", lambda name: types.SimpleNamespace(info=card))
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("no rows are downloaded here"))
    unused = lambda: pytest.fail("no tokenizer is needed for the card")
    (said,) = check_pairs(DataConfig(train="org/prefs", train_split="train_prefs"), workers_here=True, tokenizer=unused)
    assert said.startswith("data.train: org/prefs (Hugging Face Hub, split 'train_prefs': columns prompt, chosen")
    with pytest.raises(DataError, match=r"org/prefs has splits \['test_prefs', 'train_prefs'\], not 'train'"):
        check_pairs(DataConfig(train="org/prefs"), workers_here=True, tokenizer=unused)
    card.features = {"prompt": None, "chosen": None}
    with pytest.raises(DataError, match=r"org/prefs: no 'rejected' column"):
        check_pairs(DataConfig(train="org/prefs", train_split="train_prefs"), workers_here=True, tokenizer=unused)

    def offline(name):
        raise ConnectionError("no route to the hub")

    monkeypatch.setattr(datasets, "load_dataset_builder", offline)
    with pytest.raises(DataError, match="loading it from the Hugging Face Hub failed: no route to the hub"):
        check_pairs(DataConfig(train="org/prefs"), workers_here=True, tokenizer=unused)
    (said,) = check_pairs(DataConfig(train="org/prefs"), workers_here=False, tokenizer=unused)
    assert said.startswith("data.train: org/prefs not checked here (") and said.endswith("the Train workers read it")


def _worker_failure(error: Exception):
    """What TorchTrainer.fit raises when a Train worker raised `error` (Ray Train V2's own wrappers)."""
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2.api.exceptions import WorkerGroupError

    wrapped = UserExceptionWithTraceback(error, traceback_str="Traceback (most recent call last): ...")
    return WorkerGroupError("[Rank 0 Error Snippet]: ...", {0: wrapped, 1: wrapped})


@pytest.mark.parametrize("head", [True, False], ids=["local_instance", "joined_cluster"])
def test_a_workers_data_error_is_raised_as_itself_message_first(monkeypatch, head):
    import ray.train
    from ray.train.torch import TorchTrainer

    failure = _worker_failure(DataError("/data/train.jsonl: no rows"))
    monkeypatch.setattr(TorchTrainer, "fit", lambda self: (_ for _ in ()).throw(failure))
    monkeypatch.setattr(ray._private.worker, "_global_node", types.SimpleNamespace(
        is_head=lambda: head, get_logs_dir_path=lambda: "/tmp/ray/session_x/logs"), raising=False)
    trainer = cluster.trainer(lambda: None, scaling_config=ray.train.ScalingConfig(num_workers=1))
    with pytest.raises(DataError) as raised:
        trainer.fit()
    assert str(raised.value) == ("/data/train.jsonl: no rows\n(a Train worker found this: Ray's log of it is above "
                                 "and in /tmp/ray/session_x/logs)")
    assert raised.value.__cause__ is failure

    other = _worker_failure(RuntimeError("CUDA error"))  # not the user's to fix: Ray's error as it was
    monkeypatch.setattr(TorchTrainer, "fit", lambda self: (_ for _ in ()).throw(other))
    with pytest.raises(type(other)):
        trainer.fit()


def test_fit_restores_the_ctrl_c_handler_that_holds_the_runs_controller(monkeypatch):
    """TorchTrainer.fit installs a SIGINT handler that closes over the run's controller and never removes
    it: the controller would then live until the driver exits (and can be left behind by it)."""
    import signal

    import ray.train
    from ray.train.torch import TorchTrainer

    def fit_like_ray(self, fail=False):
        controller = object()
        signal.signal(signal.SIGINT, lambda signum, frame: controller)
        if fail:
            raise RuntimeError("worker died")
        return "result"

    mine = lambda signum, frame: None
    previous = signal.signal(signal.SIGINT, mine)
    try:
        trainer = cluster.trainer(lambda: None, scaling_config=ray.train.ScalingConfig(num_workers=1))
        monkeypatch.setattr(TorchTrainer, "fit", fit_like_ray)
        assert trainer.fit() == "result" and signal.getsignal(signal.SIGINT) is mine
        monkeypatch.setattr(TorchTrainer, "fit", lambda self: fit_like_ray(self, fail=True))
        with pytest.raises(RuntimeError):
            trainer.fit()
        assert signal.getsignal(signal.SIGINT) is mine
    finally:
        signal.signal(signal.SIGINT, previous)
