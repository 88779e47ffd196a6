"""Per-sequence log-probs of completions, from one forward over the concatenated chosen+rejected batch.

One forward for both halves (the DPO reference `concatenated_forward`) halves the number of FSDP
all-gathers per step. Log-softmax is taken in fp32 one chunk of positions at a time (~64 MiB), so a
bf16 model never materialises a full-vocabulary fp32 copy of its (2B, T, V) logits
(benchmarks/logps_memory.py: 132 MiB extra instead of 1-4 GiB at vocab 32k-128k).
"""

from __future__ import annotations

import torch
from torch import nn

CHUNK_FLOATS = 2**24  # fp32 elements per log-softmax chunk (64 MiB): positions per chunk = this / (2B * V)


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(input_ids[:, t] | input_ids[:, <t]) for t >= 1.

    logits: (N, T, V) in any dtype; input_ids: (N, T). Returns (N, T-1) fp32.
    """
    targets = input_ids[:, 1:]
    out = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
    step = max(1, CHUNK_FLOATS // (logits.shape[0] * logits.shape[-1]))
    for start in range(0, targets.shape[1], step):
        end = min(start + step, targets.shape[1])
        chunk = logits[:, start:end].float()  # position t-1 predicts token t
        picked = chunk.gather(-1, targets[:, start:end, None]).squeeze(-1)
        out[:, start:end] = picked - torch.logsumexp(chunk, dim=-1)
    return out


def sequence_logps(
    logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor, *, average: bool = False
) -> torch.Tensor:
    """Sum (or mean) of completion-token log-probs per sequence.

    loss_mask: (N, T) bool, True at completion tokens (prompt and padding False). Returns (N,) fp32.
    """
    mask = loss_mask[:, 1:].to(torch.float32)
    summed = (token_logps(logits, input_ids) * mask).sum(-1)
    return summed / mask.sum(-1).clamp(min=1) if average else summed


def concatenated_logps(
    model: nn.Module, batch: dict[str, torch.Tensor], *, average: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen_logps (B,), rejected_logps (B,)) from one forward over the (2B, T) batch, chosen rows first."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logps = sequence_logps(logits, batch["input_ids"], batch["loss_mask"], average=average)
    n_pairs = logps.shape[0] // 2
    return logps[:n_pairs], logps[n_pairs:]
