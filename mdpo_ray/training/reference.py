"""Reference log-probs: a frozen resident model, or a table computed once and cached on disk.

`precompute` runs the frozen reference over every pair once before training, then frees it, so
training holds one model instead of two. The table is keyed by model + data + tokenisation +
precision, so runs (and sweep trials) over the same reference and data reuse it. Both modes give the
same losses.
"""

from __future__ import annotations

import gc
import hashlib
import io
import json
import time
from collections.abc import Callable
from contextlib import nullcontext
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from mdpo_ray import storage
from mdpo_ray.config import ModelConfig, RunConfig
from mdpo_ray.data.pairs import collate_pairs
from mdpo_ray.training import distributed, lora
from mdpo_ray.training.attention import by_sequence
from mdpo_ray.training.logps import (
    check_packed_attention,
    concatenated_logps,
    device_batch,
    resolve_padding_free,
    to_device,
)
from mdpo_ray.training.model import load_causal_lm


def rank_shard(n: int, rank: int, world: int) -> list[int]:
    """Indices rank::world, truncated so every rank has the same count (FSDP ranks must run the same
    number of forwards); the caller covers the remainder or drops it."""
    per_rank = n // world
    return list(range(rank, per_rank * world, world))


def batches(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def take(dataset, indices: list[int]) -> list[dict]:
    """Rows at `indices` as dicts (one Arrow read, not one per row)."""
    columns = dataset[indices]
    return [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]


class ResidentReference:
    """`adapters_off`: `model` is the LoRA policy itself, computing its base model with its adapters off."""

    def __init__(self, model: nn.Module, *, pad_token_id: int, average: bool, adapters_off: bool = False) -> None:
        self.model, self.pad_token_id, self.average, self.adapters_off = model, pad_token_id, average, adapters_off

    @torch.no_grad()
    def logps(self, batch: dict[str, torch.Tensor], indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        with lora.adapters_off(self.model) if self.adapters_off else nullcontext():
            return concatenated_logps(self.model, batch, average=self.average)


class PrecomputedReference:
    def __init__(self, table: torch.Tensor) -> None:
        self.table = table  # (N, 2): reference chosen, rejected log-probs per dataset position

    def logps(self, batch: dict[str, torch.Tensor], indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = to_device(self.table[torch.tensor(indices)], batch["input_ids"].device)
        return rows[:, 0], rows[:, 1]


@torch.no_grad()
def compute_table(model: nn.Module, dataset, *, batch_size: int, pad_token_id: int, average: bool,
                  device: torch.device, padding_free: bool = False) -> torch.Tensor:
    """(N, 2) reference log-probs for every row, each rank computing its shard; all ranks get the table."""
    n, rank, world = len(dataset), distributed.rank(), distributed.world_size()
    mine = rank_shard(n, rank, world)
    # The n % world leftover rows are spread one per rank, padded with a repeat so counts stay equal.
    leftover = list(range(len(mine) * world, n))
    mine.append(leftover[rank] if rank < len(leftover) else (mine[0] if mine else 0))
    values = []
    for chunk in batches(mine, batch_size):
        batch = device_batch(collate_pairs(take(dataset, chunk), pad_token_id, padding_free=padding_free,
                                           one_row=by_sequence(model)), device)
        chosen, rejected = concatenated_logps(model, batch, average=average)
        values.append(torch.stack([chosen, rejected], dim=1).cpu())
    local = torch.cat(values)
    gathered_idx = distributed.gather_cat(torch.tensor(mine))
    gathered = distributed.gather_cat(local)
    table = torch.empty(n, 2)
    table[gathered_idx] = gathered
    return table


def cache_key(model_id: str, **setting) -> str:
    """Keyed by the reference weights (path + file sizes/mtimes) and whatever else decides the cached
    result (`setting`: the tokenized data, the options), so a change to either computes afresh."""
    weights = []
    path = Path(model_id)
    if path.is_dir():
        for file in sorted(path.iterdir()):
            if file.suffix in {".safetensors", ".bin", ".json"}:
                stat = file.stat()
                weights.append((file.name, stat.st_size, int(stat.st_mtime)))
    blob = json.dumps([model_id, weights, setting], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def numerics(device: torch.device, mp_policy) -> dict[str, str]:
    """What decides a cached forward's values besides weights, data and options: where it ran and in which
    compute precision (bf16 log-probs differ from fp32 by ~1e-2 relative; reused across precisions, a
    run's step-0 Δw and Δl would start away from 0)."""
    return {"device": device.type, "compute_dtype": str(mp_policy.param_dtype or torch.float32)}


def load_or_compute(cache_file: str | Path, compute) -> tuple[torch.Tensor, bool]:
    """(table, reused). Ranks agree on reuse only if every one of them can read the cache, a file or
    (output_dir on object storage) an object."""
    have = torch.tensor([1 if storage.is_file(cache_file) else 0])
    if int(distributed.all_reduce_sum(have)) == distributed.world_size():
        return torch.load(io.BytesIO(storage.read_bytes(cache_file))), True
    table = compute()
    # Rank 0 writes: every rank sees the same output_dir (checked when the workers start, training/distributed.py).
    if distributed.rank() == 0 and not storage.is_file(cache_file):
        buffer = io.BytesIO()
        torch.save(table, buffer)
        storage.write_bytes(cache_file, buffer.getvalue())  # atomic: a concurrent reader never sees half a file
    return table, False


def _in_compute_dtype(model: nn.Module, mp_policy) -> nn.Module:
    """A model that is never updated needs no fp32 master weights: under a bf16 policy its parameters are
    stored in bf16 (half the memory), the very values FSDP2 would cast the policy's to, so step 0's
    Δw, Δl stay exactly 0. Buffers keep their dtype, as under FSDP2 (rotary frequencies stay fp32)."""
    if mp_policy.param_dtype is not None:
        for param in model.parameters():
            param.data = param.data.to(mp_policy.param_dtype)
    return model


def reference_config(cfg: RunConfig) -> ModelConfig:
    """The frozen reference's model settings: the policy's, loaded from `model.reference` when that is set."""
    if cfg.model.reference is None:
        return cfg.model
    return ModelConfig.model_validate(cfg.model.model_dump() | {"name_or_path": cfg.model.reference,
                                                                 "reference": None})


def build(cfg: RunConfig, datasets: tuple, pad_token_id: int, mesh, mp_policy, device: torch.device,
          say: Callable[[str], None], policy: nn.Module | None = None) -> tuple:
    """(train reference, eval reference, cache statuses) for cfg.reference.

    A precomputed table is None for a missing set; statuses say "computed" or "reused" per table.
    With LoRA a resident reference is `policy` with its adapters off; a table is computed from the base
    model loaded alone, the same numbers (the adapters are all that differ), under the same cache key.
    """
    reference_model = reference_config(cfg)

    @lru_cache(maxsize=1)
    def load_frozen() -> nn.Module:
        model = load_causal_lm(reference_model, trainable=False, weights=distributed.rank() == 0)
        model = distributed.shard_model(_in_compute_dtype(model, mp_policy), mesh, mp_policy, frozen=True)
        if cfg.data.padding_free is True:
            check_packed_attention(model, device)  # a table computed packed must be right before it is cached
        return model

    if cfg.data.padding_free == "auto":  # a sweep's precompute, before its trials decide alike on their policy
        cfg = resolve_padding_free(cfg, load_frozen(), device, say)
    average = cfg.loss.average_log_prob
    if cfg.reference == "resident":
        use_policy = cfg.model.lora.r > 0
        assert policy is not None or not use_policy, "a LoRA run's resident reference is its policy"
        resident = ResidentReference(policy if use_policy else load_frozen(), pad_token_id=pad_token_id,
                                     average=average, adapters_off=use_policy)
        return resident, resident, []
    # The frozen model is loaded only if a table is not cached, and freed before training.
    tables, statuses = [], []
    for dataset in datasets:
        if dataset is None:
            tables.append(None)
            continue
        # Packed forwards round differently (~1e-6): a key of their own; padded tables keep the keys they had. The
        # packing is a function of the model (by sequence in one row, or rows no wider than the longest: attention),
        # and `packing` names this layout, so tables packed the earlier way are not taken for these.
        packed = {"padding_free": True, "packing": 2} if cfg.data.padding_free else {}
        key = cache_key(reference_model.name_or_path, data=dataset._fingerprint, max_length=cfg.data.max_length,
                        average=average, **packed, **numerics(device, mp_policy))
        cache_file = storage.join(cfg.output_dir, "reference_logps", f"{key}.pt")
        started = time.perf_counter()
        table, reused = load_or_compute(cache_file, lambda ds=dataset: compute_table(
            load_frozen(), ds, batch_size=cfg.eval.batch_size, pad_token_id=pad_token_id, average=average,
            device=device, padding_free=cfg.data.padding_free))
        say(f"reference log-probs for {len(dataset)} pairs {'reused' if reused else 'computed'} "
            f"({time.perf_counter() - started:.1f} s): {cache_file}")
        tables.append(PrecomputedReference(table))
        statuses.append("reused" if reused else "computed")
    load_frozen.cache_clear()
    gc.collect()  # FSDP2 modules sit in reference cycles: without this the frozen shards outlive the call
    return tables[0], tables[1], statuses
