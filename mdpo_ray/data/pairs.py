"""Preference pairs -> tokenized, prompt-masked, collated batches, via `datasets`.

Sources are read by `mdpo_ray.data.rows`, and `mdpo_ray.data.formats` turns rows into prompt/chosen/rejected
texts, flagging bad rows; this module turns those texts into token ids, applies the truncation policy, splits
off eval pairs and collates batches.

Tokens: prompt = tokenizer(prompt_text) with its special tokens (BOS), unless the text already starts
with BOS (chat templates often render it); completion = tokenizer(text, no special tokens) + [EOS].

Truncation policy: the prompt is never cut, since a cut prompt asks a different question. A pair whose
prompt has >= max_length tokens is dropped (DataStats.n_prompt_too_long); otherwise each completion is
cut from the end to max_length - len(prompt) tokens (DataStats.n_truncated). A cut completion loses its
EOS: the model is not taught to stop where the text did not stop.

Bad rows are dropped and recorded in DataStats, or with on_bad_rows="error" reported at once.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import datasets
import torch

from mdpo_ray.config import DataConfig
from mdpo_ray.data.formats import TEXT_COLUMNS, read_pair_texts
from mdpo_ray.data.rows import DataError, column_values, read_rows

__all__ = ["DataError", "DataStats", "collate_pairs", "load_pairs", "load_train_eval", "pair_sizes", "prompt_ids",
           "read_pairs", "read_rows", "real_tokens"]


@dataclass
class DataStats:
    source: str
    n_rows: int  # rows read
    n_kept: int  # pairs kept after validation and truncation
    bad_rows: dict[str, list[int]] = field(default_factory=dict)  # reason -> 0-based row indices
    n_prompt_too_long: int = 0  # dropped: the prompt alone has >= max_length tokens
    n_truncated: int = 0  # kept pairs whose completion(s) were cut to fit max_length
    max_length: int | None = None  # for the summary line

    def n_bad(self) -> int:
        return sum(len(rows) for rows in self.bad_rows.values())

    def summary(self) -> str:
        line = f"{self.source}: {self.n_rows} rows, {self.n_kept} kept"
        dropped = []
        if self.bad_rows:
            reasons = "; ".join(f"{reason}: {_rows_text(rows, 5)}" for reason, rows in self.bad_rows.items())
            dropped.append(f"{self.n_bad()} bad rows ({reasons})")
        if self.n_prompt_too_long:
            dropped.append(f"{self.n_prompt_too_long} with a prompt of >= max_length={self.max_length} tokens")
        if dropped:
            line += "; dropped " + ", ".join(dropped)
        if self.n_truncated:
            line += f"; {self.n_truncated} pairs had completions truncated to fit max_length={self.max_length}"
        return line

    def counts(self) -> dict[str, int]:
        """The counts a run tags in MLflow (data/<split>_<count>, named in mdpo_ray.training.metrics)."""
        return {"rows": self.n_rows, "kept": self.n_kept, "bad_rows": self.n_bad(),
                "prompt_too_long": self.n_prompt_too_long, "truncated": self.n_truncated}


def _rows_text(rows: list[int], limit: int) -> str:
    shown = ", ".join(str(row) for row in rows[:limit])
    more = f" and {len(rows) - limit} more" if len(rows) > limit else ""
    return f"row{'s' if len(rows) > 1 else ''} {shown}{more}"


# ------------------------------------------------------------------------------------ texts -> token ids


def prompt_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of prompt texts: with the tokenizer's special tokens (BOS), unless a text starts with BOS."""
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token
    rendered = [i for i, text in enumerate(texts) if bos and text.startswith(bos)]
    if rendered:  # the chat template wrote BOS already; adding another would be off-distribution
        plain = tokenizer([texts[i] for i in rendered], add_special_tokens=False)["input_ids"]
        for i, row_ids in zip(rendered, plain, strict=True):
            ids[i] = row_ids
    return ids


def _tokenize_batch(batch: dict, *, tokenizer, max_length: int) -> dict:
    out: dict[str, list] = {k: [] for k in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")}
    out["prompt_too_long"], out["truncated"] = [], []
    eos = [tokenizer.eos_token_id]
    chosen = tokenizer(batch["chosen_text"], add_special_tokens=False)["input_ids"]
    rejected = tokenizer(batch["rejected_text"], add_special_tokens=False)["input_ids"]
    prompts = prompt_ids(tokenizer, batch["prompt_text"])
    for prompt, chosen_ids, rejected_ids in zip(prompts, chosen, rejected, strict=True):
        room = max_length - len(prompt)
        chosen_ids, rejected_ids = chosen_ids + eos, rejected_ids + eos
        out["prompt_too_long"].append(room < 1)
        out["truncated"].append(room >= 1 and max(len(chosen_ids), len(rejected_ids)) > room)
        out["prompt_input_ids"].append(prompt)
        out["chosen_input_ids"].append(chosen_ids[: max(room, 0)])
        out["rejected_input_ids"].append(rejected_ids[: max(room, 0)])
    return out


def _unflagged(flags: list) -> list[bool]:
    """Filter predicate: keep rows whose flag (a bad-row reason, prompt_too_long) is empty or False."""
    return [not flag for flag in flags]


def read_pairs(
    source: str, *, split: str, tokenizer, format: str = "auto", on_bad_rows: str = "drop"
) -> tuple[datasets.Dataset, DataStats, str]:
    """The usable pair texts of `source` (bad rows dropped), their DataStats so far and the format read:
    everything load_pairs decides before tokenizing. The driver runs it before Ray starts
    (mdpo_ray.launch.check_data); `datasets` caches the reading and the row pass, so the workers on the
    same machine read the cache rather than the source again."""
    if on_bad_rows not in ("drop", "error"):
        raise DataError(f"on_bad_rows must be 'drop' or 'error', got {on_bad_rows!r}")
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos_token; completions end with EOS so the model learns to stop: set one")
    texts, fmt = read_pair_texts(source, split=split, tokenizer=tokenizer, format=format)
    stats = DataStats(source=source, n_rows=len(texts), n_kept=0)
    for row, reason in zip(column_values(texts, "row"), column_values(texts, "bad_reason"), strict=True):
        if reason:
            stats.bad_rows.setdefault(reason, []).append(row)
    if stats.bad_rows and on_bad_rows == "error":
        listed = "\n".join(f"  {reason}: {_rows_text(row_ids, 10)}" for reason, row_ids in stats.bad_rows.items())
        raise DataError(
            f"{source}: {stats.n_bad()} bad rows (0-based; read as data.format={fmt}):\n{listed}\n"
            f"Fix them, or set data.on_bad_rows=drop to skip them"
        )
    if stats.n_bad() == stats.n_rows:
        raise DataError(_nothing_left(stats, fmt))
    if stats.bad_rows:
        texts = texts.filter(_unflagged, input_columns="bad_reason", batched=True)
    stats.n_kept = len(texts)
    return texts, stats, fmt


def load_pairs(
    source: str, *, split: str, tokenizer, max_length: int, format: str = "auto", on_bad_rows: str = "drop"
) -> tuple[datasets.Dataset, DataStats]:
    """Pairs with columns row, prompt_input_ids, chosen_input_ids, rejected_input_ids, and their DataStats."""
    texts, stats, fmt = read_pairs(source, split=split, tokenizer=tokenizer, format=format, on_bad_rows=on_bad_rows)
    stats.max_length = max_length
    tokenize = dict(tokenizer=tokenizer, max_length=max_length)
    tokens = texts.map(_tokenize_batch, batched=True, fn_kwargs=tokenize, remove_columns=TEXT_COLUMNS)
    stats.n_prompt_too_long = sum(column_values(tokens, "prompt_too_long"))
    stats.n_truncated = sum(column_values(tokens, "truncated"))
    if stats.n_prompt_too_long:
        tokens = tokens.filter(_unflagged, input_columns="prompt_too_long", batched=True)
    pairs = tokens.remove_columns(["prompt_too_long", "truncated"])
    stats.n_kept = len(pairs)
    if stats.n_kept == 0:
        raise DataError(_nothing_left(stats, fmt))
    return pairs, stats


def _nothing_left(stats: DataStats, fmt: str) -> str:
    problems = Counter({reason: len(rows) for reason, rows in stats.bad_rows.items()})
    too_long = f"prompt of >= max_length={stats.max_length} tokens (raise data.max_length)"
    problems[too_long] = stats.n_prompt_too_long
    reason, count = problems.most_common(1)[0]
    rows = f" ({_rows_text(stats.bad_rows[reason], 10)})" if reason in stats.bad_rows else ""
    return (
        f"{stats.source}: none of its {stats.n_rows} rows is a usable preference pair; most common problem: "
        f"{reason}, {count} rows{rows}. The data was read as data.format={fmt}; set data.format if that is wrong"
    )


def load_train_eval(
    cfg: DataConfig, tokenizer, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset | None, list[DataStats]]:
    """Train and eval pairs, and the DataStats of each source read (train first, then eval if separate)."""
    options = dict(tokenizer=tokenizer, max_length=cfg.max_length, format=cfg.format, on_bad_rows=cfg.on_bad_rows)
    train, train_stats = load_pairs(cfg.train, split=cfg.train_split, **options)
    if cfg.eval is not None:
        eval_pairs, eval_stats = load_pairs(cfg.eval, split=cfg.eval_split, **options)
        return train, eval_pairs, [train_stats, eval_stats]
    if cfg.eval_fraction > 0:
        train, eval_pairs = _hold_out_prompts(train, cfg.eval_fraction, seed, cfg.train)
        return train, eval_pairs, [train_stats]
    return train, None, [train_stats]


def _hold_out_prompts(pairs: datasets.Dataset, fraction: float, seed: int, source: str):
    """Hold out whole prompts, so that no eval prompt is trained on: datasets such as UltraFeedback
    carry several pairs per prompt, and a per-pair split would leak them into the eval numbers."""
    rows_by_prompt: dict[int, list[int]] = {}
    for index, prompt_ids in enumerate(column_values(pairs, "prompt_input_ids")):
        rows_by_prompt.setdefault(hash(tuple(prompt_ids)), []).append(index)  # int-tuple hashes are unsalted
    groups = list(rows_by_prompt.values())  # first-appearance order: deterministic
    if len(groups) < 2:
        raise DataError(f"{source}: data.eval_fraction needs at least 2 distinct prompts, found {len(groups)}")
    order = random.Random(seed).sample(range(len(groups)), len(groups))
    n_eval = min(max(1, round(fraction * len(groups))), len(groups) - 1)
    eval_rows = sorted(i for g in order[:n_eval] for i in groups[g])
    train_rows = sorted(i for g in order[n_eval:] for i in groups[g])
    return pairs.select(train_rows), pairs.select(eval_rows)


# -------------------------------------------------------------------------------------------- batching


def pair_sizes(pairs: datasets.Dataset) -> list[tuple[int, int]]:
    """(tokens of both sequences, tokens of the longer one) of each pair: what the pair adds to a packed
    forward, and what it adds to the width of a padded batch (the key of data.group_by_length)."""
    columns = pairs.select_columns(["prompt_input_ids", "chosen_input_ids", "rejected_input_ids"])
    return [(2 * len(prompt) + len(chosen) + len(rejected), len(prompt) + max(len(chosen), len(rejected)))
            for batch in columns.iter(batch_size=4096) for prompt, chosen, rejected in zip(*batch.values(), strict=True)]


def collate_pairs(rows: list[dict], pad_token_id: int, *, padding_free: bool = False,
                  one_row: bool = False) -> dict[str, torch.Tensor]:
    """B pairs -> one (2B, T) batch: the B chosen sequences, then the B rejected ones, right-padded.

    input_ids (2B, T) long: prompt + completion, then pad_token_id; attention_mask (2B, T) long;
    loss_mask (2B, T) bool: True exactly at completion tokens, i.e. where log p(input_ids[t] | <t)
    counts towards the sequence log-prob. T is the longest sequence in the batch.
    With padding_free, the same sequences packed into rows without padding between them (_pack); with
    one_row too, all in one row (for attention by sequence, whose cost does not grow with a row's width).
    """
    assert rows, "collate_pairs needs at least one pair"
    sequences = [(r["prompt_input_ids"], r["chosen_input_ids"]) for r in rows]
    sequences += [(r["prompt_input_ids"], r["rejected_input_ids"]) for r in rows]
    longest = max(len(prompt) + len(completion) for prompt, completion in sequences)
    input_ids = torch.full((len(sequences), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    loss_mask = torch.zeros(input_ids.shape, dtype=torch.bool)
    for i, (prompt, completion) in enumerate(sequences):
        start, end = len(prompt), len(prompt) + len(completion)
        input_ids[i, :start] = torch.as_tensor(prompt, dtype=torch.long)
        input_ids[i, start:end] = torch.as_tensor(completion, dtype=torch.long)
        attention_mask[i, :end] = 1
        loss_mask[i, start:end] = True
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}
    if not padding_free:
        return batch
    return _pack(batch, pad_token_id, width_limit=int(attention_mask.sum()) if one_row else longest)


def _pack(batch: dict[str, torch.Tensor], pad_token_id: int, *, width_limit: int) -> dict[str, torch.Tensor]:
    """A padded (2B, T) batch as R packed rows: the 2B sequences end to end, first fit, longest first,
    in rows of at most `width_limit` tokens: T, the padded width, so that no row attends over more than a padded
    one would (sdpa and eager attention cost a row's width squared, whatever its mask), or every token (one row,
    for attention by sequence: mdpo_ray.training.attention).

    Each sequence has position_ids 0, 1, ... of its own and no attention_mask is passed: transformers
    then builds a block-diagonal causal mask from the position resets (masking_utils
    find_packed_sequence_indices; flash-attention reads them as varlen boundaries), so each sequence
    attends only to itself. A row shorter than the fullest ends in pad tokens that restart at position 0:
    a sequence of their own that no other attends to and nothing scores.

    input_ids, position_ids (R, W) long, W the fullest row; loss_mask (2B, T) bool as collated: the
    sequences' own layout, in which their log-probs are summed; scored_index (n,): the flat (R*W)
    positions whose next token is a completion token, the rows the LM head sees; scored_slot (n,): the
    same positions in the (2B, T) layout; sequence_lengths (2B,).
    """
    lengths = batch["attention_mask"].sum(1)
    n, padded_width = batch["input_ids"].shape
    rows: list[list[int]] = []
    fill: list[int] = []
    for i in sorted(range(n), key=lambda i: -int(lengths[i])):  # first fit decreasing: few rows, little slack
        length = int(lengths[i])
        row = next((r for r, used in enumerate(fill) if used + length <= width_limit), len(rows))
        if row == len(rows):
            rows.append([])
            fill.append(0)
        rows[row].append(i)
        fill[row] += length
    width = max(fill)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros_like(input_ids)
    start = torch.zeros(n, dtype=torch.long)  # each sequence's first flat position in the packed rows
    for r, row in enumerate(rows):
        offset = 0
        for i in row:
            length = int(lengths[i])
            input_ids[r, offset : offset + length] = batch["input_ids"][i, :length]
            position_ids[r, offset : offset + length] = torch.arange(length)
            start[i] = r * width + offset
            offset += length
        position_ids[r, offset:] = torch.arange(width - offset)
    scored = torch.zeros_like(batch["loss_mask"])
    scored[:, :-1] = batch["loss_mask"][:, 1:]  # position t scores token t+1, of the same sequence
    slot = scored.flatten().nonzero().squeeze(1)
    return {"input_ids": input_ids, "position_ids": position_ids, "loss_mask": batch["loss_mask"],
            "scored_index": start[slot // padded_width] + slot % padded_width, "scored_slot": slot,
            "sequence_lengths": lengths}


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens of a collated batch that are not padding, padded or packed."""
    lengths = batch.get("sequence_lengths")
    return int(lengths.sum() if lengths is not None else batch["attention_mask"].sum())
