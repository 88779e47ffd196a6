"""Attention of packed rows sequence by sequence (data.padding_free): each sequence attends over its own tokens.

transformers' `sdpa` keeps packed sequences apart with a block-diagonal mask over the whole row: a row costs
its width squared whatever it holds, and a masked call leaves PyTorch's fused causal kernels unused. Here
PyTorch's sdpa runs once per sequence, causal and unmasked (the sequences are the runs of a row's
position_ids, each restarting at 0): a row costs the sum of its sequences' squares, what flash-attention's
varlen kernels cost on a GPU, with the same result as the masked call.

A forward that is not a packed training forward gets transformers' own sdpa: a cached decoding step (the
query shorter than the keys), or a row that is one sequence (a padded batch's rows: `position_ids` 0..T-1
with the padding at the end, which no real token attends to under causality).

`use_for_packing` switches a loaded model to it when its attention is `sdpa` over full causal windows; a
model with sliding-window layers keeps transformers' masks, which encode the window.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "sdpa_by_sequence"


def sdpa_by_sequence(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, *, position_ids: torch.Tensor | None = None,
                     scaling: float | None = None, dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query (R, H, W, D), key and value (R, H_kv, W, D); returns (R, W, H, D)."""
    rows, width = query.shape[0], query.shape[2]
    starts = None
    if position_ids is not None and key.shape[2] == width and not (dropout and module.training):
        starts = sequence_starts(position_ids, rows)
    if not starts or all(len(row) == 1 for row in starts):
        return sdpa_attention_forward(module, query, key, value, attention_mask, position_ids=position_ids,
                                      scaling=scaling, dropout=dropout, **kwargs)
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    out = []
    for row, row_starts in enumerate(starts):
        bounds = [*row_starts, width]
        out.append(torch.cat([
            nn.functional.scaled_dot_product_attention(query[row : row + 1, :, a:b], key[row : row + 1, :, a:b],
                                                       value[row : row + 1, :, a:b], is_causal=True, scale=scaling)
            for a, b in itertools.pairwise(bounds)], dim=2))
    return torch.cat(out).transpose(1, 2).contiguous(), None


_last: list = [None, None, None]  # position_ids, (its version, rows), its sequence starts: a forward's layers share one


def sequence_starts(position_ids: torch.Tensor, rows: int) -> list[list[int]]:
    """Where each row's sequences start: 0, then every position whose position_id restarts at 0. Read back to the host
    once per forward, not once per layer: every layer of a forward (and its recomputation under activation
    checkpointing) gets the same position_ids tensor, and on a GPU each read-back waits for the device."""
    if _last[0] is position_ids and _last[1] == (position_ids._version, rows):
        return _last[2]
    starts = _read_starts(position_ids, rows)
    _last[:] = [position_ids, (position_ids._version, rows), starts]
    return starts


def _read_starts(position_ids: torch.Tensor, rows: int) -> list[list[int]]:
    resets = (position_ids.expand(rows, -1)[:, 1:] == 0).nonzero().tolist()  # (row, position - 1) of each restart
    starts = [[0] for _ in range(rows)]
    for row, before in resets:
        starts[row].append(before + 1)
    return starts


def _mask(*args, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """sdpa's mask where a padding mask is given (a padded batch, generation); none for a packed forward (no padding
    mask), whose sequences sdpa_by_sequence reads from position_ids: sdpa's would be a (W, W) block-diagonal mask
    per row, built and never read."""
    return None if attention_mask is None else sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


AttentionInterface.register(NAME, sdpa_by_sequence)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, _mask)


def use_for_packing(model: nn.Module) -> bool:
    """Switch `model` (loaded with sdpa attention) to sdpa_by_sequence, and say whether it now attends by sequence;
    a model that attends otherwise, or has sliding-window layers, is left as it is."""
    config = model.config
    if getattr(config, "_attn_implementation", None) not in ("sdpa", NAME):
        return False
    kinds = getattr(config, "layer_types", None)
    windowed = any("sliding" in kind for kind in kinds) if kinds is not None else \
        bool(getattr(config, "sliding_window", None)) and getattr(config, "use_sliding_window", True)
    if windowed:
        return False
    config._attn_implementation = NAME
    return True


def by_sequence(model: nn.Module) -> bool:
    """Whether `model` attends by sequence (use_for_packing switched it): a packed row may then be as wide as its
    sequences need, since its attention costs the sum of their squares, not its width squared."""
    return getattr(model.config, "_attn_implementation", None) == NAME
