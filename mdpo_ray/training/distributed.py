"""The only module that touches torch.distributed: process group, FSDP2 sharding, reductions, DCP, and
the check that all ranks share one output directory.

World size 1 runs exactly the same code path (a one-rank gloo group, a one-device mesh), so the tests
of the training step exercise the FSDP2 code that a multi-GPU run uses. (torchtitan `parallelize`.)
"""

from __future__ import annotations

import functools
import socket
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from mdpo_ray.config import ConfigError


def ensure_process_group(backend: str = "gloo") -> None:
    """Ray Train sets the group up on its workers; outside Ray (tests, the benchmark) make a one-rank group
    (NCCL on a GPU: gloo lacks the GPU collectives FSDP2 uses)."""
    if not dist.is_initialized():
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def device_for(gpu: int, use_gpu: bool) -> torch.device:
    if use_gpu:
        device = torch.device("cuda", gpu)
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def make_mesh(device: torch.device) -> DeviceMesh:
    return init_device_mesh(device.type, (world_size(),))


def compute_dtype(mode: str, device: torch.device) -> torch.dtype:
    """The dtype a model computes in under `scaling.mixed_precision` = `mode` on `device`: bf16 on a GPU with
    bf16 units (Ampere on), fp32 on CPU, where bf16 matmuls are slow, and for `auto` on older GPUs (V100, T4),
    which only emulate bf16."""
    native_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.bfloat16 if mode == "bf16" or (mode == "auto" and native_bf16) else torch.float32


def mixed_precision(mode: str, device: torch.device) -> MixedPrecisionPolicy:
    """bf16 compute with fp32 gradient reduction where compute_dtype says bf16; plain fp32 elsewhere."""
    if compute_dtype(mode, device) == torch.bfloat16:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_model(model: nn.Module, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy, *,
                frozen: bool = False, checkpoint: bool | str = False, offload: bool = False) -> nn.Module:
    """fully_shard each decoder block, then the root (embeddings, final norm, head).

    `checkpoint` wraps each block in non-reentrant activation checkpointing before sharding (torchtitan's
    order): backward recomputes the block's forward from its input, so a block keeps only its input
    alive between forward and backward. Non-reentrant checkpointing is the one that takes keyword
    arguments (HF blocks get the mask and rotary embeddings as such) and composes with FSDP2's hooks.
    `checkpoint="selective"` keeps what the block's matmuls and attention return as well (checkpoint_blocks).
    `offload` keeps the sharded parameters, their gradients and so the optimizer state in host memory
    (FSDP2's CPUOffloadPolicy): each block is copied to the device for its forward and backward, and
    AdamW steps on the CPU.

    Block classes come from the Hugging Face model's own `_no_split_modules`, so any HF causal LM
    (Llama, Qwen, Mistral, GPT-2, ...) is sharded per block without a per-architecture table.
    FSDP2 keeps the root unsharded after forward until the backward that follows; a frozen model has
    no backward, so across ranks its root reshards after each forward instead of holding the gathered
    embeddings and head on every rank for good. On one rank the gathered root is only a second copy,
    and gathering it again each forward cost a CPU Ray worker ~8% of its speed (benchmarks/vs_trl.py).
    Across ranks the weights and buffers are rank 0's: the other ranks may pass the bare architecture
    on the meta device (`load_causal_lm(weights=False)`) and get their shards from rank 0, one tensor
    at a time, so only rank 0 ever holds the whole model.
    """
    blocks = decoder_blocks(model)
    full = model.state_dict() if mesh.size() > 1 and rank() == 0 else {}  # the unsharded tensors, to send
    if checkpoint:
        blocks = checkpoint_blocks(model, blocks, selective=checkpoint == "selective")
    # Pinned host memory lets the copies to a GPU overlap compute; a CPU-only run (tests) has nothing to pin for.
    offload_policy = CPUOffloadPolicy(pin_memory=mesh.device_type == "cuda") if offload else OffloadPolicy()
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp_policy, offload_policy=offload_policy)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, offload_policy=offload_policy,
                reshard_after_forward=_reshard_root(frozen, mesh.size()))
    if mesh.size() > 1:
        _fill_from_rank0(model, full, offload=offload)
    # generate() must gather the root's shards as forward does: a peft model's generate() runs the inner
    # transformers model's forward, past the root's hooks (a plain model's calls its own forward: no change).
    register_fsdp_forward_method(model, "generate")
    return model


def checkpoint_blocks(model: nn.Module, blocks: list[nn.Module], *, selective: bool = False) -> list[nn.Module]:
    """Wrap each of `blocks` in non-reentrant activation checkpointing, in place; returns the wrappers.

    Full checkpointing keeps a block's input and recomputes its whole forward in backward: about a third
    more compute. Selective checkpointing (torchtitan's op-level policy) also keeps what the block's
    matmuls and attention kernels return, and recomputes only the rest: norms, rotary embeddings, the
    MLP's activation and product, residual adds, the cheap memory-bound ops that hold most of a block's
    saved tensors (tests/test_planner.py measures the split). The wrappers' state-dict keys stay the
    blocks' (DCP strips the wrapper's prefix), so checkpoints load with and without either.
    """
    wrap = set(blocks)
    options = {"context_fn": functools.partial(create_selective_checkpoint_contexts, _keep_matmuls)} if selective else {}
    apply_activation_checkpointing(
        model, check_fn=lambda m: m in wrap,
        checkpoint_wrapper_fn=lambda m: checkpoint_wrapper(m, checkpoint_impl=CheckpointImpl.NO_REENTRANT, **options))
    wrappers = [m for m in model.modules() if getattr(m, "_checkpoint_wrapped_module", None) in wrap]
    assert len(wrappers) == len(wrap), (len(wrappers), len(wrap))
    return wrappers


_aten = torch.ops.aten
# The ops whose outputs selective checkpointing keeps: the matmuls (a linear is addmm or mm underneath, eager
# attention bmm) and PyTorch's fused attention kernels; flash-attn's own kernels are matched by name.
_KEPT = {getattr(_aten, name).default for name in (
    "mm", "addmm", "bmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention") if hasattr(_aten, name)}


def _keep_matmuls(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    if func in _KEPT or "flash_attn" in str(func):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's decoder blocks, FSDP2's units: the classes its own `_no_split_modules` names (a peft
    model passes the attribute through from the transformers model)."""
    block_names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    assert blocks, f"{type(model).__name__} declares no _no_split_modules; cannot find its decoder blocks"
    return blocks


def sync_gradients(model: nn.Module, enabled: bool) -> None:
    """Whether the next backward reduce-scatters the gradients across ranks. Off for the non-final
    micro-batches of an accumulated step: each rank then sums its gradients unsharded (in the reduce
    dtype, fp32: a full gradient per rank) and reduces once, on the final micro-batch."""
    assert isinstance(model, FSDPModule), type(model)
    model.set_requires_gradient_sync(enabled)


def _fill_from_rank0(model: nn.Module, full: dict[str, torch.Tensor], *, offload: bool = False) -> None:
    """Every rank's shards and buffers from rank 0's `full` state dict (empty on the other ranks)."""
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        # Where the mesh computes and the broadcasts arrive; offloaded shards live on the host.
        model.to_empty(device=torch.device("cpu") if offload else _comm_device())
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    # Non-persistent buffers (rotary frequencies) are not in a state dict; they are small.
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def _reshard_root(frozen: bool, ranks: int) -> bool | None:
    return True if frozen and ranks > 1 else None  # None: FSDP2's default, kept until the backward


def _comm_device() -> torch.device:
    """NCCL only moves GPU tensors; metric tensors live on the CPU, so they visit the GPU for the collective."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate an equally-shaped tensor from every rank along dim 0 (every rank gets the result)."""
    if world_size() == 1:
        return tensor
    local = tensor.contiguous().to(_comm_device())
    parts = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(parts, local)
    return torch.cat(parts).to(tensor.device)


def gather_objects(obj: object) -> list:
    """Every rank's picklable `obj`, in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks; returns a new tensor on the input's device."""
    if world_size() == 1:
        return tensor
    local = tensor.to(_comm_device(), copy=True)
    dist.all_reduce(local, op=dist.ReduceOp.SUM)
    return local.to(tensor.device)


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Global grad norm before clipping (a plain tensor on every rank, sharded grads included)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


class StorageNotSharedError(ConfigError):
    """A directory the run's ranks must share (output_dir) is each node's own."""


def check_shared_directory(directory: Path, *, key: str, wait_s: float = 5.0) -> None:
    """StorageNotSharedError on every rank unless all ranks see the same `directory`. A collective.

    On a cluster of several nodes without a shared file system a local path is a different directory
    on each node: checkpoints, the reference cache and the export would be scattered across the nodes'
    disks and die with them. Rank 0 writes a file with a fresh random name there and every rank looks
    for it (a new name has no stale NFS lookup cache; a rank that does not see it looks again for
    `wait_s`); rank 0 then removes it. Ranks on one node always share it."""
    if world_size() == 1:
        return
    token = torch.tensor([uuid.uuid4().int >> 65 if rank() == 0 else 0], dtype=torch.int64)  # rank 0's, to all
    marker = directory / f".mdpo-shared-check-{int(all_reduce_sum(token)[0])}"
    if rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        marker.touch()
    deadline = time.monotonic() + wait_s
    while not (seen := marker.is_file()) and time.monotonic() < deadline:
        time.sleep(0.2)
    seen_by = gather_cat(torch.tensor([1 if seen else 0]))  # also the barrier before rank 0 removes it
    if rank() == 0:
        marker.unlink(missing_ok=True)
    blind = [r for r, ok in enumerate(seen_by.tolist()) if not ok]
    if blind:
        raise StorageNotSharedError(
            f"{key} ({directory}) is not shared by the nodes of this run: rank 0 wrote a file there that rank(s) "
            f"{', '.join(map(str, blind))} of {world_size()} cannot see (this is rank {rank()}, on "
            f"{socket.gethostname()}), so checkpoints, the reference cache and the export would be scattered across "
            f"the nodes' own disks. Nothing was trained or saved. Set {key} to a shared filesystem path that every "
            f"node mounts at the same place (e.g. --set {key}=/mnt/shared/mdpo_runs) or to object storage "
            f"(--set {key}=s3://bucket/prefix): docs/cluster.md")


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def save_sharded(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Each rank writes its shard of model + optimizer state into `directory` (rank 0 adds the metadata).

    The directories may differ per rank (node-local temp dirs): Ray merges them into one checkpoint.
    """
    model_sd, optim_sd = _trained_state(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(directory))


def load_sharded(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model_sd, optim_sd = _trained_state(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(directory))  # fails on any trained tensor the checkpoint lacks
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(strict=False))  # the frozen parameters are left out by design


def _trained_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model, optimizer) state dicts of what trains: the parameters the optimizer updates (all of a fully
    fine-tuned model, only a LoRA model's adapters) and its state for them. A LoRA model's frozen base is
    read from model.name_or_path on resume, as at the start. (DCP's own ignore_frozen_params keeps a
    frozen head that is tied to the embeddings, under the head's name.)"""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    trained = {fqn for group in optim_sd["param_groups"] for fqn in group["params"]}
    return {key: value for key, value in model_sd.items() if key in trained}, optim_sd


def full_state_dict(model: nn.Module, *, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """Unsharded CPU state dict on rank 0 (empty elsewhere). A collective: call it on every rank.

    `trainable_only`: leave the frozen parameters out (a LoRA model's base: its adapters remain), but for
    a frozen head tied to the embeddings, which DCP keeps under the head's name.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(model, options=options)
