"""What each step of a run reads and at what learning rate: pure functions of the step number.

A resumed run, a skipped non-finite step and any number of workers therefore see the batches and the
learning rates an uninterrupted one-worker run would, with no sampler or scheduler state to save.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from mdpo_ray.config import OptimConfig
from mdpo_ray.training import reference as ref


@lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def batch_indices(step: int, *, n: int, batch_size: int, seed: int, rank: int, world: int) -> list[int]:
    """This rank's slice of global batch `step` (1-based) in an endless stream of seeded epochs.

    The data position is a pure function of the step, so a resumed run sees exactly the batches an
    uninterrupted one would, and 1 or N workers see the same global batches.
    """
    per_rank = batch_size // world
    positions = range((step - 1) * batch_size + rank * per_rank, (step - 1) * batch_size + (rank + 1) * per_rank)
    return [int(_epoch_order(n, seed, p // n)[p % n]) for p in positions]


def micro_batches(step: int, *, n: int, batch_size: int, micro_batch_size: int, seed: int, rank: int, world: int,
                  lengths: list[int] | None = None) -> list[list[int]]:
    """This rank's micro-batches of global batch `step`: its batch_indices slice cut in order, or, given
    `lengths` (each pair's longer sequence, data.group_by_length), the whole global batch sorted by length,
    cut into micro-batches and dealt to the ranks in turn.

    Grouped, each rank still gets batch_size / world pairs and the global batch is the same set of pairs,
    so the step's loss (the sum over the global batch over its size) and gradient do not change; its order
    is a function of the step, so a resumed run sees what an uninterrupted one would. Dealing in turn gives
    the ranks micro-batches of about the same length at each accumulation step: they wait on each other
    inside every forward (FSDP's all-gathers).
    """
    if lengths is None:
        indices = batch_indices(step, n=n, batch_size=batch_size, seed=seed, rank=rank, world=world)
        return ref.batches(indices, micro_batch_size)
    everything = batch_indices(step, n=n, batch_size=batch_size, seed=seed, rank=0, world=1)
    ordered = sorted(everything, key=lambda i: lengths[i])  # stable: equal lengths keep the seeded order
    return ref.batches(ordered, micro_batch_size)[rank::world]


def token_micro_batches(step: int, *, n: int, batch_size: int, seed: int, rank: int, world: int,
                        sizes: list[tuple[int, int]], budget: int, packed: bool) -> list[list[int]]:
    """This rank's batch_indices slice cut, in order, into forwards of at most `budget` tokens
    (optim.micro_batch_tokens): a packed forward costs its sequences' tokens, a padded one its rows times the
    longest sequence. `sizes` are data.pairs.pair_sizes; every pair fits alone (the config checks the budget
    against data.max_length).

    FSDP's collectives need every rank to run as many forwards as the others, so each rank cuts every rank's
    slice (a pure function of the step: no communication) and all run the largest count, a rank that needs
    fewer splitting its costliest forwards in two. The pairs stay those of the plain slice, so the step's loss
    and gradient do not change.
    """
    def cost(micro: list[int]) -> int:
        return sum(sizes[i][0] for i in micro) if packed else 2 * len(micro) * max(sizes[i][1] for i in micro)

    def cut(indices: list[int]) -> list[list[int]]:
        micros = [[indices[0]]]
        for i in indices[1:]:
            if cost([*micros[-1], i]) <= budget:
                micros[-1].append(i)
            else:
                micros.append([i])
        return micros

    cuts = [cut(batch_indices(step, n=n, batch_size=batch_size, seed=seed, rank=r, world=world)) for r in range(world)]
    count, micros = max(map(len, cuts)), cuts[rank]
    while len(micros) < count:  # count <= pairs per rank, so a forward of two pairs or more is left to split
        costliest = max((m for m in micros if len(m) > 1), key=cost)
        half = min(range(1, len(costliest)), key=lambda k: max(cost(costliest[:k]), cost(costliest[k:])))
        at = micros.index(costliest)
        micros[at : at + 1] = [costliest[:half], costliest[half:]]
    return micros


def lr_at(cfg: OptimConfig, step: int) -> float:
    """The learning rate of step `step` (1-based): a linear warm-up over `warmup_steps`, then the schedule.
    A function of the step alone, so a resumed run and a skipped non-finite step keep to the schedule
    with no scheduler state to save or to step."""
    done = step - 1  # steps before this one
    if done < cfg.warmup_steps:
        return cfg.lr * (done + 1) / (cfg.warmup_steps + 1)
    progress = (done - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    if cfg.schedule == "linear":
        return cfg.lr * max(0.0, 1.0 - progress)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr
