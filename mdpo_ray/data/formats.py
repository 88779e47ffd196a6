"""Raw preference rows (mdpo_ray.data.rows) -> prompt/chosen/rejected texts, one per row, bad rows flagged.

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

Iterative training samples from the rows' prompts as the data holds them (`prompt_rows`): a text, or the
messages before the answers, rendered by `render_prompt` exactly as the pairs' prompts are here.
"""

from __future__ import annotations

from typing import Any

import datasets

from mdpo_ray.data.rows import DataError, column_values, read_rows

TEXT_COLUMNS = ["prompt_text", "chosen_text", "rejected_text", "bad_reason"]
Prompt = str | list[dict]  # a text, or {role, content} messages


class _BadRow(Exception):
    """A row that cannot become a pair; str(self) is the reason, grouped in DataStats.bad_rows."""


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


def row_prompt(row: dict, fmt: str, prompt_is_messages: bool) -> Prompt:
    """What a row asks, as the data holds it: the `prompt` text (standard), the text chosen and rejected share,
    minus trailing whitespace (implicit), or the messages before the answers (conversational: the `prompt`
    messages when the source's prompts are messages, else those chosen and rejected share)."""
    if fmt == "standard":
        return _text(row, "prompt")
    if fmt == "conversational":
        if prompt_is_messages:
            return _messages(row, "prompt")
        chosen, rejected = _messages(row, "chosen"), _messages(row, "rejected")
        return chosen[: _shared_length(chosen, rejected)]
    chosen, rejected = _text(row, "chosen"), _text(row, "rejected")
    return chosen[: _shared_length(chosen, rejected)].rstrip()


def render_prompt(tokenizer, prompt: Prompt) -> str:
    """The text a completion of `prompt` follows: messages through the chat template with the assistant's
    turn opened (add_generation_prompt), as the pairs' prompts are rendered; a text as it is."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def _string_texts(row: dict, fmt: str, prompt_gets_bos: bool) -> tuple[str, str, str]:
    prompt = row_prompt(row, fmt, prompt_is_messages=False)
    chosen, rejected = _text(row, "chosen"), _text(row, "rejected")
    if fmt != "standard":
        chosen, rejected = chosen[len(prompt) :], rejected[len(prompt) :]
    _check_completions(chosen, rejected, not chosen.strip(), not rejected.strip())
    if not prompt and not prompt_gets_bos:  # the first completion token would have nothing to condition on
        raise _BadRow("empty prompt")
    return prompt, chosen, rejected


def _conversation_texts(row: dict, index: int, prompt_is_messages: bool, tokenizer, source: str):
    prompt = row_prompt(row, "conversational", prompt_is_messages)
    chosen, rejected = _messages(row, "chosen"), _messages(row, "rejected")
    if not prompt_is_messages:  # the prompt is the messages they share
        chosen, rejected = chosen[len(prompt) :], rejected[len(prompt) :]
    blank = lambda messages: not any(m["content"].strip() for m in messages)
    _check_completions(chosen, rejected, blank(chosen), blank(rejected))
    if not prompt:  # chat templates refuse an empty conversation
        raise _BadRow("empty prompt")
    try:
        prompt_text = render_prompt(tokenizer, prompt)
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


def prompt_rows(source: str, *, split: str, format: str) -> list[dict]:
    """The rows of `source` that have a prompt, each with `prompt` set to it (row_prompt): what iterative
    training samples from. A row without one is left out here; the data check has reported it already."""
    rows, fmt = read_rows_as(source, split=split, format=format)
    messages = isinstance(_first_value(rows, "prompt"), list)
    out = []
    for row in rows:
        try:
            prompt = row_prompt(row, fmt, messages)
        except _BadRow:
            continue
        if prompt:
            out.append(dict(row) | {"prompt": prompt})
    return out
