"""Which Ray a run uses: the cluster it is submitted to or runs on, or a local instance set up for
the cores that train (its settings, the Train actors it leaves out, a dead address left behind), and
how that instance ends: with every process of it gone.

Part of the Ray boundary with launch.py, which calls `init_ray` and `trainer` for each run.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import threading
from contextlib import suppress

import psutil
import ray
from ray.train import TrainingFailedError
from ray.train.torch import TorchTrainer

from mdpo_ray.config import ConfigError

# Every ray.train.report waits on the controller's health-check poll (2 s by default): at 0.1 s a
# 20-report run no longer spends most of its time blocked in report (measured, see STACK_NOTES).
RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
           # Train V2 routes print() through a logger and also tees it when stdout is wrapped: each
           # line twice. Plain prints reach the driver once through Ray's log forwarding.
           "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
           # Per-file progress bars from every worker drown the step lines; the step lines say it all.
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}

# A local instance runs on the cores that train: each of Ray's ~10 processes wakes every few ms, and a
# 2-thread CPU step stalls whenever either thread is preempted (benchmarks/vs_trl.py;
# docs/performance.md). Joining a cluster changes none of Ray's settings.
LOCAL_RAY_ENV = {
    # Ray starts workers at niceness 15 so a busy node cannot starve its own raylet/GCS; then every
    # wake-up of those (niceness 0) preempts the training threads at once. Locally the control plane
    # is nearly idle and still gets its share at equal niceness.
    "RAY_worker_niceness": "0",
    # Polls the GCS for node drains every 5 s in an actor process of its own; nothing drains a local machine.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}

# A CPU step allocates and frees the same large blocks every step (the scored logits, 66 MiB at vocab
# 32k; the head's and embedding's gradients). glibc hands each block over 32 MiB to mmap and back to
# the kernel on free, trims its heap whenever the top is free, and serves a non-main thread (where Ray
# Train runs the loop) from an arena whose heaps cannot hold a block over 64 MiB: so every step faults
# the same memory in again, 13% of a 2-core step's CPU in the kernel (docs/performance.md). Keeping
# freed memory in the process (one arena, no trimming, no mmap below 4 GiB) costs 0.1-0.25 GiB of
# peak RSS. It must be in a process's environment when it starts, so only workers get it, and only on
# a CPU-only local instance: on a GPU node it would keep every freed host buffer (a checkpoint rank 0
# loaded) for good. A GLIBC_TUNABLES of the user's own, even empty, is left alone.
CPU_ALLOCATOR_ENV = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=1:glibc.malloc.mmap_threshold=4294967296:"
                                       "glibc.malloc.trim_threshold=17179869184:glibc.malloc.top_pad=1073741824"}


def _cluster_only_callbacks() -> tuple[type, ...]:
    try:
        from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    except ImportError:  # moved in another Ray version: its defaults stay
        return ()
    return DatasetsCallback, PlacementGroupCleanerCallback


def _started_here() -> bool:
    """Whether ray.init in this process started the instance (a head node that ends with this process),
    rather than joining one: RAY_ADDRESS unset is not enough, since ray.init also joins a cluster that
    `ray start` left on this machine."""
    try:
        from ray._private import worker  # internal: where ray.init keeps the node it started or joined
    except ImportError:
        return False
    node = getattr(worker, "_global_node", None)
    return node is not None and node.is_head()


class _Trainer(TorchTrainer):
    """A TorchTrainer whose fit lets go of its run's controller when it returns, and whose failure names
    a bad input that a worker found first."""

    def fit(self):
        previous = signal.getsignal(signal.SIGINT)
        try:
            return super().fit()
        except TrainingFailedError as failure:
            if (error := _user_error(failure)) is None:
                raise
            # The workers' tracebacks scroll past in Ray's output; what the user must fix goes first.
            raise type(error)(f"{error}\n(a Train worker found this: Ray's log of it is above{_logs_dir()})") from failure
        finally:
            # fit leaves its Ctrl-C handler installed, and the handler holds the run's TrainController: the
            # controller would outlive its run until this process exits, and die then only if Ray's teardown
            # gets to it before the raylet is gone (one left behind after a sweep). Restored, the handle is
            # released and Ray ends the controller now, while the instance is whole.
            if previous is not None and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, previous)


def _user_error(failure: BaseException) -> ConfigError | None:
    """The ConfigError (a DataError, say) a Train worker or the controller raised, found through Ray's
    wrappers: WorkerGroupError.worker_failures, ControllerError.controller_failure, the user exception's
    wrapper, RayTaskError.cause and the __cause__/__context__ chains."""
    pending, seen = [failure], set()
    while pending:
        error = pending.pop()
        if not isinstance(error, BaseException) or id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, ConfigError):
            return error
        pending += [error.__cause__, error.__context__, getattr(error, "controller_failure", None),
                    getattr(error, "_base_exc", None), getattr(error, "cause", None),
                    *(getattr(error, "worker_failures", None) or {}).values()]
    return None


def _logs_dir() -> str:
    try:
        from ray._private import worker  # internal: the node this driver started or joined

        return f" and in {worker._global_node.get_logs_dir_path()}"
    except (ImportError, AttributeError):
        return ""


class _LocalTrainer(_Trainer):
    """A TorchTrainer for an instance this process started: without two helper actors that one machine
    does not need. Each is a process whose main thread wakes every 10 ms (Ray's signal check, ~0.007
    cores apiece), taken from the training threads of a CPU run. The placement-group cleaner frees a
    run's resources when its controller dies on a cluster that outlives it; a local instance ends with
    this process. The dataset manager serves Ray Datasets, and mdpo-ray passes none."""

    def _create_default_callbacks(self):
        drop = _cluster_only_callbacks() if not getattr(self, "datasets", None) else ()
        return [c for c in super()._create_default_callbacks() if not isinstance(c, drop)]


def trainer(*args, **kwargs) -> TorchTrainer:
    return (_LocalTrainer if _started_here() else _Trainer)(*args, **kwargs)


def _will_start_instance() -> bool:
    """Whether ray.init() will start an instance rather than join one. It joins RAY_ADDRESS (set inside
    `ray job submit`) and also, without it, the cluster that `ray start` left on this machine: on the
    head node of cluster.yaml (`ray attach`), that is an autoscaling cluster."""
    try:  # the lookup ray.init(address=None) makes: RAY_ADDRESS, else /tmp/ray/ray_current_cluster
        from ray._private.services import get_ray_address_from_environment
    except ImportError:  # moved in another Ray version
        return "RAY_ADDRESS" not in os.environ
    return get_ray_address_from_environment(None, None) is None


def _host_port(address: str | None) -> tuple[str, int] | None:
    host, _, port = (address or "").rpartition(":")
    return (host.strip("[]"), int(port)) if host and port.isdigit() else None  # [::1]:6379 too


def _stale_start_address() -> str | None:
    """The GCS address `ray start` recorded in /tmp/ray/ray_current_cluster, when nothing answers there.

    A `ray start` that was killed, or a node that crashed, leaves the file behind without `ray stop`;
    ray.init() then retries that address for good, printing GCS timeouts. RAY_ADDRESS is the user's
    own choice and is not second-guessed."""
    if os.environ.get("RAY_ADDRESS"):
        return None
    try:
        from ray._private.services import find_bootstrap_address
    except ImportError:  # moved in another Ray version: Ray's own behaviour
        return None
    address = find_bootstrap_address(None)
    if (host_port := _host_port(address)) is None:
        return None
    try:
        socket.create_connection(host_port, timeout=5).close()
        return None
    except OSError:
        return address


def _is_this_machine(address: str) -> bool:
    host = _host_port(address)[0]
    try:  # only an address of one of this machine's interfaces can be bound
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.bind((host, 0))
        return True
    except OSError:
        return False


def workers_run_here() -> bool:
    """Whether the Train workers will run on this machine and see its files: on an instance this process
    started, or that init_ray will start, rather than on a cluster it joins."""
    if ray.is_initialized():
        return _started_here()
    if _will_start_instance():
        return True
    stale = _stale_start_address()  # init_ray starts a local instance in place of this machine's dead head
    return stale is not None and _is_this_machine(stale)


def init_ray(*, use_gpu: bool) -> bool:
    """Joins the cluster inside `ray job submit` or on a node of one; otherwise starts a local instance,
    for a run that trains on GPUs or on CPUs only. True when it started one (its resources are all
    there will be)."""
    for key, value in RAY_ENV.items():  # also where Ray is up already (a Tune trial starting a trainer)
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return False
    address = None
    if stale := _stale_start_address():
        fix = "run `ray stop` (it removes the file), or set RAY_ADDRESS to the cluster to join"
        if not _is_this_machine(stale):
            raise ConfigError(f"no Ray cluster answers at {stale}, the address `ray start` left in "
                              f"/tmp/ray/ray_current_cluster: start that cluster's head, or {fix}")
        # This machine's own head is gone: there is nothing to join, so do what a clean machine does.
        print(f"mdpo-ray: nothing answers at {stale}, the address a `ray start` that is gone left in "
              "/tmp/ray/ray_current_cluster; starting a local Ray instance (`ray stop` removes the file)", flush=True)
        address = "local"
    local = address == "local" or _will_start_instance()
    # The dashboard stays (0.03 of 2 cores at rest): it is Ray's State API and its UI, and on a cluster
    # Train's placement-group cleaner warns every second without it.
    env = RAY_ENV | (LOCAL_RAY_ENV if local else {})
    if local and not use_gpu and "GLIBC_TUNABLES" not in os.environ:
        env |= CPU_ALLOCATOR_ENV
    ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)
    if _started_here():
        atexit.unregister(stop_ray)
        atexit.register(stop_ray)  # runs before Ray's own atexit shutdown, registered when ray was imported
    return local


def stop_ray(linger_s: float = 10.0) -> None:
    """ray.shutdown(), and for an instance this process started, wait until every process of it is gone.

    ray.shutdown disconnects this driver and at once stops the raylet and the GCS; it does not wait for
    the workers. The raylet ends those it still counts as its own, but the actors this driver owned are
    being ended just then (their owner went), and one of them, a TrainController, was seen to outlive
    the instance. So the raylet's processes are noted before the shutdown and waited for after it; one
    still there after `linger_s` is killed."""
    processes = []
    if ray.is_initialized() and _started_here() and (raylet := _raylet_pid()) is not None:
        with suppress(psutil.Error):
            processes = psutil.Process(raylet).children(recursive=True)
    ray.shutdown()
    _, lingering = psutil.wait_procs(processes, timeout=linger_s)
    for process in lingering:
        with suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(lingering, timeout=linger_s)


def _raylet_pid() -> int | None:
    try:
        from ray._private import ray_constants, worker  # internal: the processes ray.init started

        return worker._global_node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    except (ImportError, AttributeError, KeyError, IndexError):
        return None
