"""Per-sequence log-probs of completions, from one forward over the concatenated chosen+rejected batch.

One forward for both halves (the DPO reference `concatenated_forward`) halves the number of FSDP
all-gathers per step.

Only the positions whose next token is a completion token go through the LM head. A forward
pre-hook on the model's output embedding hands it those rows of the final hidden states, (1, n, H)
instead of (2B, T, H): prompt and padding logits are never used, and on a small model the head is
most of the FLOPs (hidden 256, vocab 32k: 16.4 of 22.7 MFLOP per token) and all of the big
activations. The model is still called as a whole, so FSDP2's root hooks (the all-gather of the
embeddings, final norm and head) and the model's own logit post-processing (scaling, soft-capping:
elementwise, so indifferent to which rows it sees) apply unchanged. A model whose head is not a
separate module called once on (2B, T, H) hidden states gets the full (2B, T, V) logits instead.

Log-softmax is taken in fp32 one chunk of rows at a time (~64 MiB), so a bf16 model never
materialises a full-vocabulary fp32 copy of its logits (benchmarks/logps_memory.py: 132 MiB extra
instead of 1-4 GiB at vocab 32k-128k for the full-logits path).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

CHUNK_FLOATS = 2**24  # fp32 elements per log-softmax chunk (64 MiB): rows per chunk = this / V


def picked_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[i, targets[i]] in fp32, one chunk of rows at a time.

    logits: (n, V) in any dtype; targets: (n,). Returns (n,) fp32.
    """
    out = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
    step = max(1, CHUNK_FLOATS // logits.shape[-1])
    for start in range(0, targets.shape[0], step):
        chunk = logits[start : start + step].float()
        picked = chunk.gather(-1, targets[start : start + step, None]).squeeze(-1)
        out[start : start + step] = picked - torch.logsumexp(chunk, dim=-1)
    return out


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
    """Sum (or mean) of completion-token log-probs per sequence, from full logits.

    loss_mask: (N, T) bool, True at completion tokens (prompt and padding False). Returns (N,) fp32.
    """
    mask = loss_mask[:, 1:].to(torch.float32)
    summed = (token_logps(logits, input_ids) * mask).sum(-1)
    return summed / mask.sum(-1).clamp(min=1) if average else summed


@contextmanager
def _head_on_scored_rows(head: nn.Module | None, scored: torch.Tensor) -> Iterator[list[bool]]:
    """While open, `head` sees only hidden[scored] as (1, n, H); yields a list that records each such call.

    scored: (N, T) bool, True at the positions whose logits are used.
    """
    calls: list[bool] = []

    def select(module: nn.Module, args: tuple):
        if len(args) != 1 or args[0].shape[:2] != scored.shape:
            return None  # not the (N, T, H) call we expect: leave it alone, the caller falls back
        calls.append(True)
        return (args[0][scored].unsqueeze(0),)

    handle = head.register_forward_pre_hook(select) if head is not None else None
    try:
        yield calls
    finally:
        if handle is not None:
            handle.remove()


def concatenated_logps(
    model: nn.Module, batch: dict[str, torch.Tensor], *, average: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen_logps (B,), rejected_logps (B,)) from one forward over the (2B, T) batch, chosen rows first."""
    input_ids, loss_mask = batch["input_ids"], batch["loss_mask"]
    targets_mask = loss_mask[:, 1:]  # token t+1 is scored from position t
    scored = torch.zeros_like(loss_mask)
    scored[:, :-1] = targets_mask
    get_head = getattr(model, "get_output_embeddings", None)
    with _head_on_scored_rows(get_head() if get_head else None, scored) as calls:
        logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"], use_cache=False).logits
    if not calls:  # no separable head (or an unusual one): score the full logits
        logps = sequence_logps(logits, input_ids, loss_mask, average=average)
    else:
        assert len(calls) == 1 and logits.shape[:2] == (1, int(scored.sum())), (len(calls), logits.shape)
        tokens = picked_logps(logits[0], input_ids[:, 1:][targets_mask])  # row-major, as hidden[scored]
        # Back in place and summed per row: a dense sum is deterministic on CUDA (index_add's atomics are
        # not), so the policy and a resident reference sum identical token log-probs to identical totals
        # and step 0's Δw, Δl are exactly 0 (MinorDPO's first step is then DPO's).
        per_token = torch.zeros(targets_mask.shape, dtype=torch.float32, device=tokens.device)
        logps = per_token.masked_scatter(targets_mask, tokens).sum(-1)
        if average:
            logps = logps / targets_mask.sum(-1).clamp(min=1)
    n_pairs = logps.shape[0] // 2
    return logps[:n_pairs], logps[n_pairs:]
