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

Log-softmax is taken in fp32 one chunk of rows at a time (~64 MiB), forward and backward, so a bf16
model never materialises a full-vocabulary fp32 copy of its logits, not even one kept for backward
(benchmarks/logps_memory.py has the figures at vocab 32k and 128k).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from mdpo_ray.config import ConfigError, RunConfig
from mdpo_ray.training import attention

CHUNK_FLOATS = 2**24  # fp32 elements per log-softmax chunk (64 MiB): rows per chunk = this / V


class _PickedLogps(torch.autograd.Function):
    """log_softmax(logits)[i, targets[i]] in fp32, one chunk of rows at a time, forward and backward.

    Plain autograd through a chunked log-softmax keeps every fp32 chunk for its backward: a full fp32
    copy of the logits after all. This keeps the logits as they came (bf16 on a GPU) and each row's
    logsumexp, and recomputes the softmax one chunk at a time in backward.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        out = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(out)
        for rows in _chunks(logits):
            chunk = logits[rows].float()
            lse[rows] = torch.logsumexp(chunk, dim=-1)
            out[rows] = chunk.gather(-1, targets[rows, None]).squeeze(-1) - lse[rows]
        ctx.save_for_backward(logits, targets, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for rows in _chunks(logits):
            # d/dlogits of (logit[target] - logsumexp) = onehot(target) - softmax, times the incoming grad.
            chunk = torch.exp(logits[rows].float() - lse[rows, None]).mul_(-grad_out[rows, None])
            grad[rows] = chunk.scatter_add_(-1, targets[rows, None], grad_out[rows, None])
        return grad, None


def _chunks(logits: torch.Tensor) -> Iterator[slice]:
    step = max(1, CHUNK_FLOATS // logits.shape[-1])
    return (slice(start, start + step) for start in range(0, logits.shape[0], step))


def picked_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[i, targets[i]] in fp32, one chunk of rows at a time (~64 MiB of fp32).

    logits: (n, V) in any dtype; targets: (n,). Returns (n,) fp32.
    """
    return _PickedLogps.apply(logits, targets)


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(input_ids[:, t] | input_ids[:, <t]) for t >= 1.

    logits: (N, T, V) in any dtype; input_ids: (N, T). Returns (N, T-1) fp32.
    """
    n, t, v = logits.shape
    # Position t-1 predicts token t. The last position predicts nothing; it gets a dummy target (its
    # gradient is 0) so the logits are used as one (N*T, V) view rather than copied without that column.
    targets = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1)
    return picked_logps(logits.reshape(n * t, v), targets.reshape(n * t)).view(n, t)[:, :-1]


def sequence_logps(
    logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor, *, average: bool = False
) -> torch.Tensor:
    """Sum (or mean) of completion-token log-probs per sequence, from full logits.

    loss_mask: (N, T) bool, True at completion tokens (prompt and padding False). Returns (N,) fp32.
    """
    mask = loss_mask[:, 1:].to(torch.float32)
    summed = (token_logps(logits, input_ids) * mask).sum(-1)
    return summed / mask.sum(-1).clamp(min=1) if average else summed


def chosen_token_mean_nll(policy_chosen_logps: torch.Tensor, loss_mask: torch.Tensor, *,
                          average: bool) -> torch.Tensor:
    """Per-pair token-mean NLL of the chosen completion, −(1/|y_w|)·Σ_t log π(y_w,t | …): the term
    `loss.nll_weight` weighs (mdpo_ray.training.losses.with_chosen_nll), whether the loss sums or averages.

    policy_chosen_logps: (B,) as concatenated_logps returned them (length-averaged when `average`);
    loss_mask: the batch's (2B, T) mask, chosen rows first. Returns (B,) fp32.
    """
    if average:
        return -policy_chosen_logps
    n_pairs = policy_chosen_logps.shape[0]
    tokens = loss_mask[:n_pairs, 1:].sum(-1).clamp(min=1).to(policy_chosen_logps.dtype)
    return -policy_chosen_logps / tokens


def device_batch(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A collate_pairs batch on `device`, plus `scored_index`: the flat (row-major) positions whose next
    token is a completion token, the rows the LM head sees (a packed batch brings its own).

    The positions are counted here, on the host that built the batch: counting them on a GPU (boolean
    indexing) stopped the host until the device had caught up, three times a forward, and the device
    then idled while the host queued the rest. The copies are pinned and non-blocking, so the host collates and
    queues the next step while the device still runs this one's optimizer step.
    """
    host = dict(batch)
    if "scored_index" not in host:
        scored = torch.zeros_like(batch["loss_mask"])
        scored[:, :-1] = batch["loss_mask"][:, 1:]  # position t scores token t+1
        host["scored_index"] = scored.flatten().nonzero().squeeze(1)
    return {key: to_device(value, device) for key, value in host.items()}


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`; to a GPU from pinned memory without blocking (a copy from pageable
    memory may wait for the device to finish its queued work)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


@contextmanager
def _head_on_scored_rows(head: nn.Module | None, shape: torch.Size, index: torch.Tensor) -> Iterator[list[bool]]:
    """While open, `head` sees only the rows `index` of the (N, T, H) hidden states as (1, n, H); yields
    a list that records each such call. shape: (N, T)."""
    calls: list[bool] = []

    def select(module: nn.Module, args: tuple):
        if len(args) != 1 or args[0].shape[:2] != shape:
            return None  # not the (N, T, H) call we expect: leave it alone, the caller falls back
        calls.append(True)
        return (args[0].flatten(0, 1).index_select(0, index).unsqueeze(0),)

    handle = head.register_forward_pre_hook(select) if head is not None else None
    try:
        yield calls
    finally:
        if handle is not None:
            handle.remove()


def concatenated_logps(
    model: nn.Module, batch: dict[str, torch.Tensor], *, average: bool = False, mean_logits: bool = False
) -> tuple[torch.Tensor, ...]:
    """(chosen_logps (B,), rejected_logps (B,)) from one forward over the (2B, T) batch, chosen rows first;
    with mean_logits, also each sequence's mean logit over its completion positions and the vocabulary
    (detached, (B,) each: TRL's logits/chosen and logits/rejected, per pair).

    batch: a collate_pairs batch through `device_batch`, padded or packed (data.padding_free: the model
    sees the packed rows and their position_ids; `scored_slot` puts each scored position back in the
    sequences' (2B, T) layout). Nothing here reads a value back to the host beyond what the model's own
    forward does, so on a GPU the host queues the forward and backward ahead of the device
    (tests/test_logps.py).
    """
    input_ids, index, loss_mask = batch["input_ids"], batch["scored_index"], batch["loss_mask"]
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "position_ids") if key in batch}
    get_head = getattr(model, "get_output_embeddings", None)
    with _head_on_scored_rows(get_head() if get_head else None, input_ids.shape, index) as calls:
        logits = model(**inputs, use_cache=False).logits
    if calls:
        assert len(calls) == 1 and logits.shape[:2] == (1, index.numel()), (len(calls), logits.shape)
        scored_logits = logits[0]
    else:  # no separable head (or an unusual one): the full logits, of which only the scored rows count
        scored_logits = logits.flatten(0, 1).index_select(0, index)
    # Flat position p scores token p + 1 of the same row (p is never a row's last position).
    tokens = picked_logps(scored_logits, input_ids.flatten()[index + 1])
    # Back in place, in the (2B, T) layout, and summed per sequence: a dense sum is deterministic on CUDA
    # (index_add's atomics are not), so the policy and a resident reference sum identical token log-probs to
    # identical totals and step 0's Δw, Δl are exactly 0 (MinorDPO's first step is then DPO's).
    slots = batch.get("scored_slot", index)
    per_token = torch.zeros(loss_mask.numel(), dtype=torch.float32, device=tokens.device)
    logps = per_token.index_copy(0, slots, tokens).view(loss_mask.shape).sum(-1)
    if average:
        logps = logps / loss_mask[:, 1:].sum(-1).clamp(min=1)
    n_pairs = logps.shape[0] // 2
    if not mean_logits:
        return logps[:n_pairs], logps[n_pairs:]
    logit_means = _row_means(scored_logits.detach(), slots, loss_mask)
    return logps[:n_pairs], logps[n_pairs:], logit_means[:n_pairs], logit_means[n_pairs:]


def _row_means(scored_logits: torch.Tensor, index: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Each sequence's mean logit over its scored positions and the vocabulary, (N,) fp32. scored_logits:
    (n, V), the rows at `index`. In fp32 chunks, so a bf16 model never holds an fp32 copy of its logits."""
    with torch.no_grad():
        per_position = torch.cat([scored_logits[rows].float().mean(-1) for rows in _chunks(scored_logits)])
        summed = torch.zeros(loss_mask.numel(), dtype=torch.float32, device=per_position.device)
        summed = summed.index_copy(0, index, per_position).view(loss_mask.shape).sum(-1)
        return summed / loss_mask[:, 1:].sum(-1).clamp(min=1)


def check_packed_attention(model: nn.Module, device: torch.device) -> None:
    """Raise a ConfigError unless `model` keeps packed sequences apart (data.padding_free=true); made ready to
    (prepare_packing)."""
    problem = prepare_packing(model, device)
    if problem is not None:
        raise ConfigError(f"data.padding_free: {problem}; set data.padding_free=false (data.group_by_length=true "
                          "with optim.micro_batch_size also saves padding)")


def resolve_padding_free(cfg: RunConfig, model: nn.Module, device: torch.device,
                         say: Callable[[str], None]) -> RunConfig:
    """`cfg` (a RunConfig) with data.padding_free a bool: `auto` packs when `model` keeps packed sequences
    apart and pads otherwise, saying why; `true` stops the run when it does not. Every rank runs the same
    check on the same weights, so all decide alike."""
    setting = cfg.data.padding_free
    if setting is False:
        return cfg
    if setting is True:
        check_packed_attention(model, device)
        return cfg
    problem = prepare_packing(model, device)
    if problem is not None:
        say(f"data.padding_free=auto: padded batches, since {problem}")
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"padding_free": problem is None})})


def prepare_packing(model: nn.Module, device: torch.device) -> str | None:
    """Why `model` cannot run packed rows (packed_attention_problem), or None once it is ready to: a model
    with sdpa attention is switched to attention by sequence (mdpo_ray.training.attention; its packed rows
    are then one row a forward), and checked again so."""
    problem = packed_attention_problem(model, device)
    if problem is None and attention.use_for_packing(model):
        problem = packed_attention_problem(model, device)
    return problem


@torch.no_grad()
def packed_attention_problem(model: nn.Module, device: torch.device) -> str | None:
    """Why `model` does not keep packed sequences apart (data.padding_free), or None if it does, found by
    running it: transformers isolates them only for attention that builds its mask from position_ids
    (sdpa, eager, flex) or reads them as varlen boundaries (flash-attention); linear-attention and
    convolution layers, or a model that ignores position_ids, let one sequence see another.

    Two packed rows, [first, second] and [other, second], must give `second` the same logits (it attends
    to nothing before it, so they are the same computation), and the logits it gets alone (loosely: the
    rows' shapes differ, and a bf16 model rounds differently).
    """
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    first, other, second = (torch.randint(vocab, (n,), generator=gen) for n in (6, 6, 7))
    positions = torch.cat([torch.arange(6), torch.arange(7)]).expand(2, -1)
    rows = torch.stack([torch.cat([first, second]), torch.cat([other, second])])
    packed = model(input_ids=rows.to(device), position_ids=positions.to(device), use_cache=False).logits[:, 6:]
    alone = model(input_ids=second[None].to(device), use_cache=False).logits[0]
    packed, alone = packed.float(), alone.float()
    scale = alone.abs().max().clamp(min=1e-6)
    crosstalk = float((packed[0] - packed[1]).abs().max() / scale)
    moved = float((packed - alone).abs().max() / scale)
    if crosstalk <= 1e-4 and moved <= 2e-2:
        return None
    attention = getattr(model.config, "_attn_implementation", "?")
    return (f"{type(model).__name__} (attention: {attention}) does not keep packed sequences apart: a sequence's "
            f"logits change by {crosstalk:.2g} (relative) with the sequence packed before it, and by {moved:.2g} "
            f"from those it gets alone. Packing needs attention that honours position_ids resets (transformers' "
            f"sdpa, eager or flash-attention)")
