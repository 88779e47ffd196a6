"""Shared fixtures: a tiny random-init Llama saved with save_pretrained, and small generated pair files.

Nothing is downloaded: the model is built from a transformers config and loaded back through the
same loading code a user's model goes through.
"""

import collections
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Before torch loads OpenMP: its threads sleep when idle instead of spinning, which on 2 shared cores made
# every torch op several times slower whenever a Ray worker or a subprocess also ran.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Every Ray instance of this test session lives in a temp dir of its own (short: Ray's socket paths must fit
# in 107 bytes), where it also leaves its address file: ray.init() never joins a cluster that a `ray start`
# elsewhere on this machine left in /tmp/ray, nor the one another session's test started (pytest -n 2).
os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="ray")


# --- the order files run in, and where the suite's time went ----------------------------------------------
# With two processes (-n 2 --dist loadfile, pyproject's addopts) the suite ends when the last file ends. xdist
# hands out files in the order given, one at a time as a process runs dry; its default order (most tests
# first) left the Ray files, a few long tests each, to the end, where one ran for minutes beside an idle
# process. Longest first, as last measured, balances the two. A file not measured yet runs after them.
FILE_SECONDS = Path(__file__).with_name("file_seconds.json")
_file_seconds: dict[str, float] = collections.defaultdict(float)
_process_seconds: dict[str, float] = collections.defaultdict(float)


def pytest_addoption(parser):
    parser.addoption("--file-seconds-out", metavar="PATH",
                     help="write each test file's measured seconds to PATH (JSON): the source of "
                          "tests/file_seconds.json, which orders the files longest first")


def pytest_collection_modifyitems(config, items):
    measured = json.loads(FILE_SECONDS.read_text()) if FILE_SECONDS.exists() else {}
    items.sort(key=lambda item: -measured.get(item.nodeid.split("::")[0], 0.0))  # stable: files stay whole


def pytest_runtest_logreport(report):
    _file_seconds[report.nodeid.split("::")[0]] += report.duration
    gateway = getattr(getattr(report, "node", None), "gateway", None)  # under xdist, the process that ran it
    _process_seconds[getattr(gateway, "id", "main")] += report.duration


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    """The last lines CI shows: where the time went, per process and per file (longest last)."""
    if hasattr(config, "workerinput") or not _file_seconds:
        return
    ranked = sorted(_file_seconds.items(), key=lambda kv: kv[1])
    if out := config.getoption("--file-seconds-out"):
        Path(out).write_text(json.dumps({f: round(s, 1) for f, s in reversed(ranked)}, indent=1) + "\n")
    files = ", ".join(f"{Path(f).stem.removeprefix('test_')} {s:.0f}" for f, s in ranked[-24:])
    terminalreporter.write_sep("-", "seconds per test file (the longest 24, longest last)")
    terminalreporter.write_line("\n".join(textwrap.wrap(files, 118)))
    terminalreporter.write_line("busy seconds per process: " + ", ".join(
        f"{name} {s:.0f}" for name, s in sorted(_process_seconds.items())))


@pytest.fixture(scope="session", autouse=True)
def _isolated_caches(tmp_path_factory):
    """Keep Hugging Face caches out of the user's home."""
    home = tmp_path_factory.mktemp("hf_home")
    os.environ["HF_HOME"] = str(home)
    os.environ["HF_DATASETS_CACHE"] = str(home / "datasets")


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="session")
def tiny_task(tmp_path_factory) -> dict[str, Path]:
    """A 2-layer, hidden-32 Llama with the built-in character tokenizer, plus pair and problem files."""
    import torch
    from transformers import LlamaForCausalLM

    from mdpo_ray.config import BuiltinTaskConfig
    from mdpo_ray.task.arith import build_tokenizer, generate_task, model_config

    root = tmp_path_factory.mktemp("tiny_task")
    task_cfg = BuiltinTaskConfig(hidden_size=32, n_heads=4, intermediate_size=64, n_sft_problems=10,
                                 n_pref_pairs=48, n_eval_pairs=12, n_eval_problems=8)
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(model_config(task_cfg, tokenizer))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    task = generate_task(task_cfg)
    return {
        "model": root / "model",
        "train": _write_jsonl(root / "train.jsonl", task["pairs"]),
        "eval": _write_jsonl(root / "eval.jsonl", task["eval_pairs"]),
        "problems": _write_jsonl(root / "problems.jsonl", task["eval_problems"]),
    }


@pytest.fixture
def tiny_run_overrides(tiny_task, tmp_path) -> list[str]:
    """--set overrides for a few-step run of the tiny task, writing under tmp_path."""
    return _tiny_overrides(tiny_task, tmp_path)


@pytest.fixture(scope="session")
def tiny_overrides_under(tiny_task):
    """tiny_run_overrides writing under a given root: for a fixture wider than one test (a module's cluster)."""
    return lambda root: _tiny_overrides(tiny_task, root)


def _tiny_overrides(tiny_task: dict[str, Path], root: Path) -> list[str]:
    return [
        f"model.name_or_path={tiny_task['model']}",
        f"data.train={tiny_task['train']}",
        f"data.eval={tiny_task['eval']}",
        f"data.generation_eval={tiny_task['problems']}",
        f"output_dir={root / 'runs'}",
        "optim.max_steps=4",
        "optim.batch_size=8",
        "optim.lr=1e-2",
        "optim.warmup_steps=0",
        "tracking.log_every_steps=1",
        "checkpoint.every_steps=2",
        "eval.every_steps=0",  # before and after only; the default (every fifth of the run) would eval each step
        "eval.max_new_tokens=8",
        "eval.batch_size=8",
    ]


class OwnRay:
    """The environment for a subprocess that starts a local Ray instance of its own, and the processes of
    that instance still alive. Ray's processes inherit the driver's environment, so a mark in it finds
    them all, orphans included, and none of another instance on the same machine. RAY_TMPDIR keeps the
    subprocess from joining a cluster that a `ray start` elsewhere on this machine left in /tmp/ray."""

    MARK = "MDPO_TEST_RAY_INSTANCE"

    def __init__(self, name: str, tmp: str):
        self.mark = f"{name}-{os.getpid()}-{id(self)}"
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {self.MARK: self.mark,
                                                                                   "RAY_TMPDIR": tmp}

    def processes(self) -> list[str]:
        import psutil

        found = []
        for process in psutil.process_iter(["pid", "cmdline", "status"]):
            try:
                if process.info["status"] != psutil.STATUS_ZOMBIE and process.environ().get(self.MARK) == self.mark:
                    found.append(f"{process.pid} {' '.join(process.info['cmdline'] or [])[:100]}")
            except psutil.Error:  # gone meanwhile, or not ours to read
                continue
        return found


    def stop(self, grace_s: float = 10.0) -> None:
        """Stop this instance's processes, and only these (`ray stop` would stop every Ray on the machine)."""
        import psutil

        procs = []
        for line in self.processes():
            try:
                procs.append(psutil.Process(int(line.split(" ")[0])))
            except psutil.Error:
                continue
        for proc in procs:
            try:
                proc.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=grace_s)
        for proc in alive:
            try:
                proc.kill()
            except psutil.Error:
                pass


@pytest.fixture
def own_ray(request):
    import shutil
    import tempfile

    tmp = tempfile.mkdtemp(prefix="ray")  # short: Ray's socket paths under it must fit in 107 bytes
    yield OwnRay(request.node.name, tmp)
    shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def s3_server(bucket: str):
    """An S3 server on 127.0.0.1 (moto's, the test extra) with one bucket; while it lasts the AWS settings
    point this process, and a Ray instance or node it starts (whose workers inherit them), at it. Yields a
    boto3 client. pyarrow (Ray's checkpoint uploads and mdpo_ray.storage) reaches it through
    AWS_ENDPOINT_URL, as it would reach MinIO or AWS itself."""
    import boto3

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Its log goes to a file: the server logs every request, and into a pipe nobody reads it blocked for good
    # once the pipe's 64 KiB were full (a module's worth of checkpoints), hanging every later request.
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        raise AssertionError(f"moto's S3 server did not start: {log.read().decode()[-2000:]}") \
                            from None
                    time.sleep(0.2)
            env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                   "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                   "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull,
                   "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
            with pytest.MonkeyPatch.context() as patch:
                for key, value in env.items():
                    patch.setenv(key, value)
                client = boto3.client("s3")
                client.create_bucket(Bucket=bucket)
                yield client
        finally:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def s3_keys(client, bucket: str, prefix: str = "") -> list[str]:
    """The objects under `prefix`, less the empty `dir/` markers pyarrow writes to make directories."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []) if not obj["Key"].endswith("/"))
