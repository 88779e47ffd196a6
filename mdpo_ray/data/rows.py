"""Preference-pair sources -> raw rows -> prompt/chosen/rejected texts, one per row, bad rows flagged.

Sources: a .jsonl/.json/.parquet file, a `Dataset.save_to_disk` directory (a DatasetDict: the named
split), a folder of data files, or a Hugging Face Hub dataset name. A file is one split. A file or folder
may be on S3 (s3://bucket/key), read from a copy on the node (mdpo_ray.storage.staged).

Formats (`auto` looks at the first row whose `chosen` is a string or a list):
  standard        prompt, chosen, rejected strings.
  implicit        chosen and rejected strings only; the prompt is their longest common prefix, minus
                  trailing whitespace, which goes with the completions (BPE tokens carry the leading
                  space, so " 42" tokenizes as it would in running text).
  conversational  chosen/rejected are lists of {role, content} messages; the prompt is the `prompt`
                  message list, or, when there is none (or it is a plain string, as in
                  ultrafeedback_binarized, whose chosen already holds the user turn), the messages
                  chosen and rejected share. Rendered with the tokenizer's chat template.

Bad rows (missing field, wrong type, empty prompt or completion, chosen identical to rejected, a chat
template that fails on the row) keep their place with empty texts and the reason in `bad_reason`;
`data.load_pairs` drops them and records them in DataStats, or with on_bad_rows="error" reports them at
once. Row numbers are 0-based positions in the source, kept in the `row` column.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets

from mdpo_ray import storage
from mdpo_ray.config import ConfigError

_FILE_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # "name" or "org/name"
TEXT_COLUMNS = ["prompt_text", "chosen_text", "rejected_text", "bad_reason"]


class DataError(ConfigError):
    """Data the user must fix; the message names the file, the rows and the fix. A ConfigError: the command
    exits 2 with the message alone, whether the driver found it or a Train worker did."""


# ---------------------------------------------------------------------------------------------- reading


def read_rows(source: str, split: str) -> datasets.Dataset:
    """The raw rows of `source` (see the module docstring for the kinds); `split` is ignored for files."""
    if storage.is_remote(source):  # a file or save_to_disk folder on S3: read from this node's copy
        try:
            local = storage.staged(source)
        except FileNotFoundError:
            raise DataError(f"data file not found: {source} (no such object or prefix); check data.train / "
                            "data.eval") from None
        try:
            return read_rows(local, split)
        except DataError as error:  # named as the user gave it, not as the node's copy
            raise DataError(str(error).replace(local, source)) from None
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_directory(path, split)
    if path.is_file():
        loader = _FILE_LOADERS.get(path.suffix.lower())
        if loader is None:
            raise DataError(f"{path}: unsupported file type; use .jsonl, .json, .parquet or a save_to_disk folder")
        if path.stat().st_size == 0:
            raise DataError(f"{path} is empty")
        try:
            return datasets.load_dataset(loader, data_files=str(path), split="train")
        except Exception as exc:
            if bad_line := _bad_jsonl_line(path):  # the parser's chain adds only noise to a Ray worker's traceback
                raise DataError(f"could not read {path}: {bad_line}") from None
            cause = exc.__cause__ or exc  # datasets wraps the parser error in DatasetGenerationError
            raise DataError(f"could not read {path}: {type(cause).__name__}: {cause}") from exc
    if _looks_like_path(source):  # a typo in a path should not turn into a confusing hub lookup
        raise DataError(f"data file not found: {source} (looked for {path.resolve()}); check data.train / data.eval")
    try:
        return datasets.load_dataset(source, split=split)
    except Exception as exc:
        raise hub_error(source, split, exc) from exc


def is_hub_name(source: str) -> bool:
    """Whether `source` is read from the Hugging Face Hub: no such local file or directory, and not a path."""
    return not storage.is_remote(source) and not Path(source).expanduser().exists() and not _looks_like_path(source)


def hub_error(source: str, split: str, exc: Exception) -> DataError:
    """A hub dataset that does not load, said with where a local path was looked for too."""
    return DataError(
        f"could not load {source!r} (split {split!r}): there is no such local file or directory "
        f"({Path(source).expanduser().resolve()}) and loading it from the Hugging Face Hub failed: {exc}"
    )


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


def _bad_jsonl_line(path: Path) -> str | None:
    """The offending line of a JSONL file, said with its fix; the parser's own message says only 'row N' of a block."""
    if path.suffix.lower() != ".jsonl":
        return None
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            try:
                if line.strip():
                    json.loads(line)
            except json.JSONDecodeError as err:
                return f"line {number} is not valid JSON ({err.msg}, column {err.colno}); fix or delete that line"
    return None


def _looks_like_path(source: str) -> bool:
    # "data/prefs" could be either, so only what no hub id looks like counts as a path.
    return not _HUB_ID.fullmatch(source) or Path(source).suffix.lower() in (*_FILE_LOADERS, ".arrow", ".csv")



# ------------------------------------------------------------------------------------ rows -> pair texts


class _BadRow(Exception):
    """A row that cannot become a pair; str(self) is the reason, grouped in DataStats.bad_rows."""


def column_values(rows: datasets.Dataset, name: str) -> Iterator[Any]:
    """One column's values, read in batches: per-row access costs ~15 µs a row (seconds per 1e5 rows)."""
    for batch in rows.select_columns([name]).iter(batch_size=4096):
        yield from batch[name]


def _first_value(rows: datasets.Dataset, column: str) -> Any:
    """The first string or list in `column` (None if there is none): what the data looks like."""
    values = column_values(rows, column) if column in rows.column_names else []
    return next((value for value in values if isinstance(value, (str, list))), None)


def check_columns(names: list[str], source: str, requested: str) -> None:
    """What the column names alone tell about a source read as data.format=`requested`."""
    for column in ("chosen", "rejected"):
        if column not in names:
            raise DataError(
                f"{source}: no {column!r} column (found {names}); a preference pair needs 'chosen' and 'rejected', "
                f"and 'prompt' unless the prompt is their shared beginning"
            )
    if requested not in ("auto", "standard", "implicit", "conversational"):
        raise DataError(f"unknown data format {requested!r}; use auto, standard, conversational or implicit")
    if requested == "standard" and "prompt" not in names:
        raise DataError(
            f"{source}: data.format=standard needs a 'prompt' column (found {names}); use data.format=implicit "
            f"when the prompt is the shared beginning of chosen and rejected"
        )


def _resolve_format(rows: datasets.Dataset, source: str, requested: str) -> str:
    names = rows.column_names
    check_columns(names, source, requested)
    if requested != "auto":
        return requested
    chosen = _first_value(rows, "chosen")
    if chosen is None:
        raise DataError(f"{source}: no row has a string or a message list in 'chosen'; cannot detect the format")
    if isinstance(chosen, list):
        return "conversational"
    return "standard" if "prompt" in names else "implicit"


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
    blank = lambda messages: not any(m["content"].strip() for m in messages)
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
    return dict(zip(TEXT_COLUMNS, (*texts, reason), strict=True), row=index)


# ---------------------------------------------------------------------------------------- entry point


def read_rows_as(source: str, *, split: str, format: str) -> tuple[datasets.Dataset, str]:
    """The raw rows of `source` and the format they are read as: what needs no tokenizer."""
    rows = read_rows(source, split)
    if len(rows) == 0:
        raise DataError(f"{source}: no rows")
    return rows, _resolve_format(rows, source, format)


def read_pair_texts(source: str, *, split: str, tokenizer, format: str) -> tuple[datasets.Dataset, str]:
    """One row per source row, with columns row and TEXT_COLUMNS (empty texts and a reason for a bad row),
    and the format the rows were read as."""
    rows, fmt = read_rows_as(source, split=split, format=format)
    if fmt == "conversational" and not tokenizer.chat_template:
        raise DataError(
            f"{source} holds conversations but the tokenizer has no chat template (base models often have none): "
            f"set model.chat_template to a Jinja template or the path of a file holding one, or render the texts "
            f"yourself and use data.format=standard"
        )
    options = dict(
        fmt=fmt,
        prompt_is_messages=isinstance(_first_value(rows, "prompt"), list),
        prompt_gets_bos=len(tokenizer("", add_special_tokens=True)["input_ids"]) > 0,
        tokenizer=tokenizer,
        source=source,
    )
    texts = rows.map(_extract_row, with_indices=True, fn_kwargs=options, remove_columns=rows.column_names)
    return texts, fmt
