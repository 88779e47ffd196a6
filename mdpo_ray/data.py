"""Preference pairs -> tokenized, prompt-masked, collated batches, via `datasets`.

Sources: a .jsonl/.json/.parquet file, a `Dataset.save_to_disk` directory (a DatasetDict: the named
split), a folder of data files, or a Hugging Face Hub dataset name. A file is one split.

Formats (`auto` looks at the first row whose `chosen` is a string or a list):
  standard        prompt, chosen, rejected strings.
  implicit        chosen and rejected strings only; the prompt is their longest common prefix, minus
                  trailing whitespace, which goes with the completions (BPE tokens carry the leading
                  space, so " 42" tokenizes as it would in running text).
  conversational  chosen/rejected are lists of {role, content} messages; the prompt is the `prompt`
                  message list, or, when there is none (or it is a plain string, as in
                  ultrafeedback_binarized, whose chosen already holds the user turn), the messages
                  chosen and rejected share. Rendered with the tokenizer's chat template.

Tokens: prompt = tokenizer(prompt_text) with its special tokens (BOS), unless the text already starts
with BOS (chat templates often render it); completion = tokenizer(text, no special tokens) + [EOS].

Truncation policy: the prompt is never cut, since a cut prompt asks a different question. A pair whose
prompt has >= max_length tokens is dropped (DataStats.n_prompt_too_long); otherwise each completion is
cut from the end to max_length - len(prompt) tokens (DataStats.n_truncated). A cut completion loses its
EOS: the model is not taught to stop where the text did not stop.

Bad rows (missing field, wrong type, empty prompt or completion, chosen identical to rejected) are
dropped and recorded in DataStats, or with on_bad_rows="error" reported at once. Row numbers are
0-based positions in the source, kept in the `row` column.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch

from mdpo_ray.config import DataConfig

_FILE_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_TEXT_COLUMNS = ["prompt_text", "chosen_text", "rejected_text", "bad_reason"]


class DataError(ValueError):
    """Data the user must fix; the message names the file, the rows and the fix."""


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

    def as_metrics(self, prefix: str) -> dict[str, float]:
        return {
            f"data/{prefix}_rows": float(self.n_rows),
            f"data/{prefix}_kept": float(self.n_kept),
            f"data/{prefix}_bad_rows": float(self.n_bad()),
            f"data/{prefix}_prompt_too_long": float(self.n_prompt_too_long),
            f"data/{prefix}_truncated": float(self.n_truncated),
        }


def _rows_text(rows: list[int], limit: int) -> str:
    shown = ", ".join(str(row) for row in rows[:limit])
    more = f" and {len(rows) - limit} more" if len(rows) > limit else ""
    return f"row{'s' if len(rows) > 1 else ''} {shown}{more}"


# ---------------------------------------------------------------------------------------------- reading


def read_rows(source: str, split: str) -> datasets.Dataset:
    """The raw rows of `source` (see the module docstring for the kinds); `split` is ignored for files."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_directory(path, split)
    if path.is_file():
        loader = _FILE_LOADERS.get(path.suffix.lower())
        if loader is None:
            raise DataError(f"{path}: unsupported file type; use .jsonl, .json, .parquet or a save_to_disk folder")
        try:
            return datasets.load_dataset(loader, data_files=str(path), split="train")
        except Exception as exc:
            raise DataError(f"could not read {path}: {_loader_detail(path, exc)}") from exc
    if _looks_like_path(source):  # a typo in a path should not turn into a confusing hub lookup
        raise DataError(f"data file not found: {source} (looked for {path.resolve()}); check data.train / data.eval")
    try:
        return datasets.load_dataset(source, split=split)
    except Exception as exc:
        raise DataError(
            f"could not load {source!r} (split {split!r}): there is no such local file or directory "
            f"({path.resolve()}) and loading it from the Hugging Face Hub failed: {exc}"
        ) from exc


def _read_directory(path: Path, split: str) -> datasets.Dataset:
    try:
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            loaded = datasets.load_from_disk(str(path))
        else:  # a folder of data files, e.g. a hub snapshot copied to an offline cluster
            loaded = datasets.load_dataset(str(path), split=split)
    except Exception as exc:
        raise DataError(
            f"could not read directory {path}: {exc}; expected a Dataset.save_to_disk directory or a folder of "
            f".jsonl/.parquet files"
        ) from exc
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path} has splits {sorted(loaded)}, not {split!r}; set data.train_split/eval_split")
        return loaded[split]
    return loaded


def _loader_detail(path: Path, exc: Exception) -> str:
    """Name the offending line of a JSONL file; the parser's own message says only 'row N' of a block."""
    if path.suffix.lower() == ".jsonl":
        with path.open(encoding="utf-8", errors="replace") as lines:
            for number, line in enumerate(lines, start=1):
                try:
                    if line.strip():
                        json.loads(line)
                except json.JSONDecodeError as err:
                    return f"line {number} is not valid JSON ({err.msg}, column {err.colno}); fix or delete that line"
    cause = exc.__cause__ or exc  # datasets wraps the parser error in DatasetGenerationError
    return f"{type(cause).__name__}: {cause}"


def _looks_like_path(source: str) -> bool:
    # Hub ids are "name" or "org/name", so one slash alone does not make a path.
    return (
        source.startswith(("/", ".", "~"))
        or source.count("/") > 1
        or "\\" in source
        or Path(source).suffix.lower() in (*_FILE_LOADERS, ".arrow", ".csv")
    )


# ------------------------------------------------------------------------------------ rows -> pair texts


class _BadRow(Exception):
    """A row that cannot become a pair; str(self) is the reason, grouped in DataStats.bad_rows."""


def _column(rows: datasets.Dataset, name: str) -> Iterator[Any]:
    """One column's values, read in batches: per-row access costs ~15 µs a row (seconds per 1e5 rows)."""
    for batch in rows.select_columns([name]).iter(batch_size=4096):
        yield from batch[name]


def _first_value(rows: datasets.Dataset, column: str) -> Any:
    """The first string or list in `column` (None if there is none): what the data looks like."""
    values = _column(rows, column) if column in rows.column_names else []
    return next((value for value in values if isinstance(value, (str, list))), None)


def _resolve_format(rows: datasets.Dataset, source: str, requested: str) -> str:
    names = rows.column_names
    for column in ("chosen", "rejected"):
        if column not in names:
            raise DataError(
                f"{source}: no {column!r} column (found {names}); a preference pair needs 'chosen' and 'rejected', "
                f"and 'prompt' unless the prompt is their shared beginning"
            )
    if requested == "auto":
        chosen = _first_value(rows, "chosen")
        if chosen is None:
            raise DataError(f"{source}: no row has a string or a message list in 'chosen'; cannot detect the format")
        if isinstance(chosen, list):
            return "conversational"
        return "standard" if "prompt" in names else "implicit"
    if requested not in ("standard", "implicit", "conversational"):
        raise DataError(f"unknown data format {requested!r}; use auto, standard, conversational or implicit")
    if requested == "standard" and "prompt" not in names:
        raise DataError(
            f"{source}: data.format=standard needs a 'prompt' column (found {names}); use data.format=implicit "
            f"when the prompt is the shared beginning of chosen and rejected"
        )
    return requested


def _text(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        raise _BadRow(f"missing field {key!r}")
    if not isinstance(value, str):
        raise _BadRow(f"wrong type for {key!r} (expected str, got {type(value).__name__})")
    return value


def _messages(row: dict, key: str) -> list[dict]:
    value = row.get(key)
    if value is None:
        raise _BadRow(f"missing field {key!r}")
    if not isinstance(value, list):
        got = type(value).__name__
    elif all(isinstance(m, dict) and all(isinstance(m.get(k), str) for k in ("role", "content")) for m in value):
        return value
    else:
        got = "a message without a string role and content"
    raise _BadRow(f"wrong type for {key!r} (expected a list of {{role, content}} messages, got {got})")


def _shared_length(a: str | list, b: str | list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _check_completions(chosen: Any, rejected: Any, chosen_empty: bool, rejected_empty: bool) -> None:
    if chosen == rejected:
        raise _BadRow("chosen identical to rejected")
    if chosen_empty or rejected_empty:
        raise _BadRow("empty completion")


def _string_texts(row: dict, fmt: str, prompt_gets_bos: bool) -> tuple[str, str, str]:
    prompt = _text(row, "prompt") if fmt == "standard" else None
    chosen, rejected = _text(row, "chosen"), _text(row, "rejected")
    if prompt is None:
        prompt = chosen[: _shared_length(chosen, rejected)].rstrip()
        chosen, rejected = chosen[len(prompt) :], rejected[len(prompt) :]
    _check_completions(chosen, rejected, not chosen.strip(), not rejected.strip())
    if not prompt and not prompt_gets_bos:  # the first completion token would have nothing to condition on
        raise _BadRow("empty prompt")
    return prompt, chosen, rejected


def _conversation_texts(row: dict, index: int, prompt_is_messages: bool, tokenizer, source: str):
    prompt = _messages(row, "prompt") if prompt_is_messages else None
    chosen, rejected = _messages(row, "chosen"), _messages(row, "rejected")
    if prompt is None:
        shared = _shared_length(chosen, rejected)
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    blank = lambda messages: not any(m["content"].strip() for m in messages)  # noqa: E731
    _check_completions(chosen, rejected, blank(chosen), blank(rejected))
    if not prompt:  # chat templates refuse an empty conversation
        raise _BadRow("empty prompt")
    try:
        prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        chosen_full = tokenizer.apply_chat_template(prompt + chosen, tokenize=False)
        rejected_full = tokenizer.apply_chat_template(prompt + rejected, tokenize=False)
    except Exception as exc:  # e.g. a template that rejects a system turn: this row's problem, not the data's
        raise _BadRow(f"chat template failed: {exc}") from exc
    for full in (chosen_full, rejected_full):
        if not full.startswith(prompt_text):
            raise DataError(
                f"{source} row {index}: the tokenizer's chat template is not prefix-stable: the prompt rendered "
                f"with add_generation_prompt=True ({prompt_text[-60:]!r}) is not the beginning of the rendered "
                f"conversation ({full[: len(prompt_text)][-60:]!r}), so the completion cannot be cut out of it. "
                f"Use a template whose rendered prompt prefixes the rendered conversation, or render the texts "
                f"yourself and use data.format=standard"
            )
    return prompt_text, chosen_full[len(prompt_text) :], rejected_full[len(prompt_text) :]


def _extract_row(row: dict, index: int, *, fmt, prompt_is_messages, prompt_gets_bos, tokenizer, source) -> dict:
    try:
        if fmt == "conversational":
            texts = _conversation_texts(row, index, prompt_is_messages, tokenizer, source)
        else:
            texts = _string_texts(row, fmt, prompt_gets_bos)
        reason = ""
    except _BadRow as bad:
        texts, reason = ("", "", ""), str(bad)
    return dict(zip(_TEXT_COLUMNS, (*texts, reason), strict=True), row=index)


# ------------------------------------------------------------------------------------ texts -> token ids


def _prompt_ids(tokenizer, texts: list[str]) -> list[list[int]]:
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
    prompts = _prompt_ids(tokenizer, batch["prompt_text"])
    for prompt_ids, chosen_ids, rejected_ids in zip(prompts, chosen, rejected, strict=True):
        room = max_length - len(prompt_ids)
        chosen_ids, rejected_ids = chosen_ids + eos, rejected_ids + eos
        out["prompt_too_long"].append(room < 1)
        out["truncated"].append(room >= 1 and max(len(chosen_ids), len(rejected_ids)) > room)
        out["prompt_input_ids"].append(prompt_ids)
        out["chosen_input_ids"].append(chosen_ids[: max(room, 0)])
        out["rejected_input_ids"].append(rejected_ids[: max(room, 0)])
    return out


def _unflagged(flags: list) -> list[bool]:
    """Filter predicate: keep rows whose flag (a bad-row reason, prompt_too_long) is empty or False."""
    return [not flag for flag in flags]


def load_pairs(
    source: str, *, split: str, tokenizer, max_length: int, format: str = "auto", on_bad_rows: str = "drop"
) -> tuple[datasets.Dataset, DataStats]:
    """Pairs with columns row, prompt_input_ids, chosen_input_ids, rejected_input_ids, and their DataStats."""
    if on_bad_rows not in ("drop", "error"):
        raise DataError(f"on_bad_rows must be 'drop' or 'error', got {on_bad_rows!r}")
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos_token; completions end with EOS so the model learns to stop: set one")
    rows = read_rows(source, split)
    if len(rows) == 0:
        raise DataError(f"{source}: no rows")
    fmt = _resolve_format(rows, source, format)
    if fmt == "conversational" and not tokenizer.chat_template:
        raise DataError(
            f"{source} holds conversations but the tokenizer has no chat_template: set tokenizer.chat_template, "
            f"or render the texts yourself and use data.format=standard"
        )
    options = dict(
        fmt=fmt,
        prompt_is_messages=isinstance(_first_value(rows, "prompt"), list),
        prompt_gets_bos=len(tokenizer("", add_special_tokens=True)["input_ids"]) > 0,
        tokenizer=tokenizer,
        source=source,
    )
    texts = rows.map(_extract_row, with_indices=True, fn_kwargs=options, remove_columns=rows.column_names)
    stats = DataStats(source=source, n_rows=len(rows), n_kept=0, max_length=max_length)
    for row, reason in zip(_column(texts, "row"), _column(texts, "bad_reason"), strict=True):
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
    tokenize = dict(tokenizer=tokenizer, max_length=max_length)
    tokens = texts.map(_tokenize_batch, batched=True, fn_kwargs=tokenize, remove_columns=_TEXT_COLUMNS)
    stats.n_prompt_too_long = sum(_column(tokens, "prompt_too_long"))
    stats.n_truncated = sum(_column(tokens, "truncated"))
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
    for index, prompt_ids in enumerate(_column(pairs, "prompt_input_ids")):
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


def collate_pairs(rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """B pairs -> one (2B, T) batch: the B chosen sequences, then the B rejected ones, right-padded.

    input_ids (2B, T) long: prompt + completion, then pad_token_id; attention_mask (2B, T) long;
    loss_mask (2B, T) bool: True exactly at completion tokens, i.e. where log p(input_ids[t] | <t)
    counts towards the sequence log-prob. T is the longest sequence in the batch.
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
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}
