"""The driver's read of a run's preference data before anything is started (mdpo_ray.launch.check_data).

It runs the workers' own code (rows.py, pairs.read_pairs): a missing file, an unreadable line, a missing
column, a format that does not fit, bad rows under on_bad_rows=error, or no usable row at all is the same
DataError a worker would raise, found before MLflow or Ray is asked for anything. `datasets` caches the
reading and the row pass, so workers on this machine reuse them. What is left to the workers: a path this
machine does not have when they run elsewhere (a joined cluster), a hub dataset's rows (here only its card
is read: the name, the split, the columns), and what only tokenizing tells (prompts longer than max_length).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import datasets

from mdpo_ray import storage
from mdpo_ray.config import DataConfig
from mdpo_ray.data import formats, rows
from mdpo_ray.data.pairs import read_pairs
from mdpo_ray.data.rows import DataError


def check_pairs(data: DataConfig, *, workers_here: bool, tokenizer: Callable[[], Any]) -> list[str]:
    """Check data.train and data.eval; a line for each saying what was checked. `workers_here`: the Train
    workers run on this machine, so what is missing here is missing for them. `tokenizer()` loads the
    run's tokenizer (called once, only for a source on this machine)."""
    tokenizer = functools.cache(tokenizer)
    said = []
    for key, source, split in (("data.train", data.train, data.train_split), ("data.eval", data.eval, data.eval_split)):
        if source is None:
            continue
        with _quiet_datasets():
            if rows.is_hub_name(source):
                said.append(f"{key}: {_check_hub(source, split, data.format, workers_here)}")
            elif not storage.is_remote(source) and not Path(source).expanduser().exists() and not workers_here:
                said.append(f"{key}: {source} is not on this machine; the Train workers read and check it")
            else:  # here, or missing on the machine the workers run on: read_rows says "data file not found"
                said.append(f"{key}: {_check_local(source, split, data, tokenizer)}")
    return said


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """The check speaks through its DataError or its line; datasets' progress bars, and its own log of a
    parse error that becomes that DataError, would come before it."""
    verbosity, bars = datasets.logging.get_verbosity(), datasets.is_progress_bar_enabled()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def _hub_columns(source: str, split: str) -> list[str] | None:
    """What the Hub's card of dataset `source` tells without downloading a row: a DataError when there is
    no such dataset or split, else its column names (None when the card does not list them)."""
    try:
        info = datasets.load_dataset_builder(source).info
    except Exception as exc:
        raise rows.hub_error(source, split, exc) from exc
    if info.splits and split not in info.splits:
        raise DataError(f"{source} has splits {sorted(info.splits)}, not {split!r}; set data.train_split/eval_split")
    return list(info.features) if info.features else None


def _check_hub(source: str, split: str, fmt: str, workers_here: bool) -> str:
    try:
        names = _hub_columns(source, split)
    except DataError as error:
        if workers_here:  # the workers would fail the same way, on this machine
            raise
        return f"{source} not checked here ({str(error).splitlines()[0]}); the Train workers read it"
    if names is not None:
        formats.check_columns(names, source, fmt)
    return f"{source} (Hugging Face Hub, split {split!r}: {'columns ' + ', '.join(names) if names else 'found'}); " \
           "the Train workers check its rows"


def _check_local(source: str, split: str, data: DataConfig, tokenizer: Callable[[], Any]) -> str:
    """A file or folder here, or on S3 (which every node reads alike)."""
    if not storage.is_remote(source) and not Path(source).expanduser().exists():
        rows.read_rows(source, split)  # the workers' own "data file not found", said before a tokenizer is loaded
    try:
        loaded = tokenizer()
    except Exception as error:  # noqa: BLE001 (a model only the workers have, or a model error they report)
        _, fmt = formats.read_rows_as(source, split=split, format=data.format)
        return (f"{source} reads as data.format={fmt}; its rows are left to the Train workers (the tokenizer does "
                f"not load here: {str(error).splitlines()[0] if str(error) else type(error).__name__})")
    _, stats, fmt = read_pairs(source, split=split, tokenizer=loaded, format=data.format, on_bad_rows=data.on_bad_rows)
    bad = f"{stats.n_bad()} bad rows to drop" if stats.n_bad() else "no bad rows"
    return f"{source}: {stats.n_rows} rows as data.format={fmt}, {bad}"
