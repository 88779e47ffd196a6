"""Held-out evaluation, sharded over ranks: pair metrics (reward accuracy, Δw, Δl) and greedy answers.

Every rank evaluates an equal-sized shard (FSDP ranks must run the same number of forwards), so up to
world_size − 1 items are left out of each set; the count evaluated is logged with the metrics.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from mdpo_ray import storage
from mdpo_ray.config import EvalConfig, LossConfig, RunConfig
from mdpo_ray.data.pairs import DataError, collate_pairs
from mdpo_ray.task.generation import greedy_answer_accuracy
from mdpo_ray.training import distributed
from mdpo_ray.training.attention import by_sequence
from mdpo_ray.training.logps import chosen_token_mean_nll, concatenated_logps, device_batch
from mdpo_ray.training.losses import LOSSES, with_chosen_nll
from mdpo_ray.training.metrics import pair_metrics
from mdpo_ray.training.reference import batches, cache_key, load_or_compute, rank_shard, take


@torch.no_grad()
def eval_pairs(policy: nn.Module, reference, dataset, *, loss_cfg: LossConfig, eval_cfg: EvalConfig,
               pad_token_id: int, device: torch.device, padding_free: bool = False) -> dict[str, float]:
    mine = rank_shard(len(dataset), distributed.rank(), distributed.world_size())
    if not mine:
        return {}
    was_training = policy.training
    policy.eval()
    columns: list[torch.Tensor] = []
    for chunk in batches(mine, eval_cfg.batch_size):
        batch = device_batch(collate_pairs(take(dataset, chunk), pad_token_id, padding_free=padding_free,
                                           one_row=by_sequence(policy)), device)
        pc, pr, chosen_logits, rejected_logits = concatenated_logps(policy, batch, average=loss_cfg.average_log_prob,
                                                                    mean_logits=True)
        rc, rr = reference.logps(batch, chunk)
        chosen_nll = chosen_token_mean_nll(pc, batch["loss_mask"], average=loss_cfg.average_log_prob)
        columns.append(torch.stack([pc, pr, rc, rr, chosen_logits, rejected_logits, chosen_nll], dim=1).float().cpu())
    policy.train(was_training)
    pc, pr, rc, rr, chosen_logits, rejected_logits, chosen_nll = distributed.gather_cat(torch.cat(columns)).unbind(1)
    losses = with_chosen_nll(LOSSES[loss_cfg.name](pc, pr, rc, rr, **loss_cfg.knobs()), chosen_nll,
                             nll_weight=loss_cfg.nll_weight).losses
    out = pair_metrics(losses=losses, policy_chosen_logps=pc, policy_rejected_logps=pr,
                       reference_chosen_logps=rc, reference_rejected_logps=rr, beta=loss_cfg.beta,
                       reject_threshold=loss_cfg.reject_threshold, policy_chosen_logits=chosen_logits,
                       policy_rejected_logits=rejected_logits, prefix="eval/")
    out["eval/n_pairs"] = float(len(pc))
    return out


def load_problems(path: str, limit: int | None) -> list[dict]:
    """The {prompt, answer} rows of data.generation_eval (a DataError names the line to fix); on S3, read from
    the node's copy."""
    if not storage.is_file(path):  # a local path or an object on S3
        raise DataError(f"data.generation_eval file not found: {path}")
    rows = []
    for number, line in enumerate(Path(storage.staged(path)).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {number} is not valid JSON ({err.msg}, column {err.colno}); fix or "
                            "delete that line") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or "answer" not in row:
            raise DataError(f"{path}: line {number} needs a string 'prompt' and an 'answer' (e.g. 42)")
        rows.append(row)
    return rows[:limit] if limit else rows


def eval_generation(policy: nn.Module, tokenizer, problems: list[dict], *, eval_cfg: EvalConfig) -> dict[str, float]:
    world = distributed.world_size()
    mine = [problems[i] for i in rank_shard(len(problems), distributed.rank(), world)]
    if not mine:
        return {}
    correct, total = greedy_answer_accuracy(policy, tokenizer, mine, max_new_tokens=eval_cfg.max_new_tokens,
                                            batch_size=eval_cfg.generation_batch_size, synced_gpus=world > 1)
    counts = distributed.all_reduce_sum(torch.tensor([correct, total], dtype=torch.float64))
    return {"eval/answer_accuracy": float(counts[0] / counts[1]), "eval/n_problems": float(counts[1])}


def start_generation(policy: nn.Module, tokenizer, problems: list[dict], *, cfg: RunConfig,
                     numerics: dict[str, str]) -> dict[str, float]:
    """eval_generation of the untrained policy, cached next to the reference log-probs: greedy decoding
    of the same weights on the same problems gives the same answers, so a sweep decodes them once."""
    stat = Path(storage.staged(cfg.data.generation_eval)).stat()  # on S3, the copy keeps the object's time
    key = cache_key(cfg.model.name_or_path, generation=[cfg.data.generation_eval, stat.st_size, int(stat.st_mtime)],
                    problems=len(problems), max_new_tokens=cfg.eval.max_new_tokens, max_length=cfg.data.max_length,
                    **numerics)

    def compute() -> torch.Tensor:
        scored = eval_generation(policy, tokenizer, problems, eval_cfg=cfg.eval)
        return torch.tensor([scored["eval/answer_accuracy"], scored["eval/n_problems"]], dtype=torch.float64)

    if len(problems) < distributed.world_size():  # some rank has nothing to decode: nothing to cache
        return eval_generation(policy, tokenizer, problems, eval_cfg=cfg.eval)
    counts, _ = load_or_compute(storage.join(cfg.output_dir, "reference_logps", f"generation-{key}.pt"), compute)
    return {"eval/answer_accuracy": float(counts[0]), "eval/n_problems": float(counts[1])}
