"""Preference-pair sources -> raw rows (how the rows become texts: mdpo_ray.data.formats).

Sources: a .jsonl/.json/.parquet file, a `Dataset.save_to_disk` directory (a DatasetDict: the named
split), a folder of data files, or a Hugging Face Hub dataset name. A file is one split. A file or folder
may be on S3 (s3://bucket/key), read from a copy on the node (mdpo_ray.storage.staged).
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


def column_values(rows: datasets.Dataset, name: str) -> Iterator[Any]:
    """One column's values, read in batches: per-row access costs ~15 µs a row (seconds per 1e5 rows)."""
    for batch in rows.select_columns([name]).iter(batch_size=4096):
        yield from batch[name]
