"""mdpo_ray.data.pairs: every source kind and format becomes the same prompt/completion token ids, bad rows
are reported by their 0-based row number, truncation follows the documented policy, and the collated
loss_mask covers exactly the completion tokens (+ EOS), chosen rows first.

All offline: a tiny byte-level BPE is trained on the spot, and the datasets cache lives in tmp_path.
"""

import copy
import json

import datasets
import huggingface_hub
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from mdpo_ray.config import DataConfig
from mdpo_ray.data.pairs import DataError, DataStats, collate_pairs, load_pairs, load_train_eval, read_rows

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
STANDARD = [
    {"prompt": "Q: what is 2 + 2? A:", "chosen": " 4", "rejected": " 5"},
    {"prompt": "Q: what is 3 + 4? A:", "chosen": " 7", "rejected": " 12"},
    {"prompt": "Say hello.", "chosen": " hello world", "rejected": " goodbye"},
]


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


@pytest.fixture(autouse=True)
def offline_cache(tmp_path, monkeypatch):
    """No hub, and a fresh datasets cache per test (datasets reads these at import, so patch both)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))


@pytest.fixture(scope="module")
def tokenizer():
    """Byte-level BPE with <pad>/<s>/</s>, BOS prepended by the post-processor, and a chat template."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator([r["prompt"] + r["chosen"] + r["rejected"] for r in STANDARD] * 20, trainer)
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def ids(tok, text, bos=False):
    return ([tok.bos_token_id] if bos else []) + tok(text, add_special_tokens=False)["input_ids"]


def expected_pair(tok, prompt, chosen, rejected):
    """Prompt with BOS; completions + EOS; the contract of load_pairs."""
    eos = [tok.eos_token_id]
    return ids(tok, prompt, bos=True), ids(tok, chosen) + eos, ids(tok, rejected) + eos


def as_tuples(pairs):
    return [(p["prompt_input_ids"], p["chosen_input_ids"], p["rejected_input_ids"]) for p in pairs]


def load(source, tok, **kw):
    return load_pairs(source, split="train", tokenizer=tok, max_length=kw.pop("max_length", 64), **kw)


# ------------------------------------------------------------------------------------- formats, sources


@pytest.mark.parametrize("fmt", ["auto", "standard"])
def test_standard_jsonl(tmp_path, tokenizer, fmt):
    pairs, stats = load(write_jsonl(tmp_path / "x.jsonl", STANDARD), tokenizer, format=fmt)
    assert set(pairs.column_names) == {"row", "prompt_input_ids", "chosen_input_ids", "rejected_input_ids"}
    assert list(pairs["row"]) == [0, 1, 2]
    assert as_tuples(pairs) == [expected_pair(tokenizer, **r) for r in STANDARD]
    assert (stats.n_rows, stats.n_kept, stats.n_bad(), stats.n_truncated) == (3, 3, 0, 0)
    assert stats.summary() == f"{tmp_path / 'x.jsonl'}: 3 rows, 3 kept"


@pytest.mark.parametrize("fmt", ["auto", "implicit"])
def test_implicit_strings_split_at_the_shared_prefix(tmp_path, tokenizer, fmt):
    rows = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in STANDARD]
    pairs, _ = load(write_jsonl(tmp_path / "x.jsonl", rows), tokenizer, format=fmt)
    # The trailing space of the shared prefix goes with the completions: " 4" / " 5", as in STANDARD.
    assert as_tuples(pairs) == [expected_pair(tokenizer, **r) for r in STANDARD]


def conversational_expected(tok, question, chosen, rejected):
    prompt_text = f"<|user|>{question}</s>\n<|assistant|>"
    return expected_pair(tok, prompt_text, f"{chosen}</s>\n", f"{rejected}</s>\n")


HI, HELLO, BYE = user("hi"), assistant("hello world"), assistant("goodbye")


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": HI, "chosen": HELLO, "rejected": BYE},
        {"chosen": HI + HELLO, "rejected": HI + BYE},
        # ultrafeedback_binarized style: a text prompt column beside whole conversations
        {"prompt": "hi", "chosen": HI + HELLO, "rejected": HI + BYE},
    ],
    ids=["explicit_prompt", "implicit_prompt", "text_prompt_column"],
)
@pytest.mark.parametrize("fmt", ["auto", "conversational"])
def test_conversational(tmp_path, tokenizer, row, fmt):
    pairs, stats = load(write_jsonl(tmp_path / "c.jsonl", [row, row]), tokenizer, format=fmt)
    assert as_tuples(pairs) == [conversational_expected(tokenizer, "hi", "hello world", "goodbye")] * 2
    assert stats.n_kept == 2


def test_parquet_and_save_to_disk_match_jsonl(tmp_path, tokenizer):
    from_jsonl, _ = load(write_jsonl(tmp_path / "x.jsonl", STANDARD), tokenizer)
    table = datasets.Dataset.from_list(STANDARD)
    table.to_parquet(str(tmp_path / "x.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict(train=table.select([0]), test=table).save_to_disk(str(tmp_path / "saved_dict"))
    for source in (tmp_path / "x.parquet", tmp_path / "saved"):
        assert as_tuples(load(str(source), tokenizer)[0]) == as_tuples(from_jsonl)
    test_split, _ = load_pairs(str(tmp_path / "saved_dict"), split="test", tokenizer=tokenizer, max_length=64)
    assert as_tuples(test_split) == as_tuples(from_jsonl)
    with pytest.raises(DataError, match=r"splits \['test', 'train'\], not 'validation'"):
        read_rows(str(tmp_path / "saved_dict"), "validation")


# ------------------------------------------------------------------------------------------- bad rows

BAD_ROWS = [
    STANDARD[0],
    {"prompt": "Q:", "rejected": " 5"},  # 1: missing chosen
    {"prompt": 7, "chosen": " 4", "rejected": " 5"},  # 2: wrong type (datasets keeps mixed types as Json)
    {"prompt": "Q:", "chosen": "   ", "rejected": " 5"},  # 3: whitespace-only completion
    {"prompt": "Q:", "chosen": " 4", "rejected": ""},  # 4: empty completion
    {"prompt": "Q:", "chosen": " 4", "rejected": " 4"},  # 5: identical
    STANDARD[1],
]
BAD_REASONS = {
    "missing field 'chosen'": [1],
    "wrong type for 'prompt' (expected str, got int)": [2],
    "empty completion": [3, 4],
    "chosen identical to rejected": [5],
}


def test_bad_rows_dropped_and_reported_by_row(tmp_path, tokenizer):
    pairs, stats = load(write_jsonl(tmp_path / "bad.jsonl", BAD_ROWS), tokenizer)
    assert stats.bad_rows == BAD_REASONS
    assert list(pairs["row"]) == [0, 6] and (stats.n_rows, stats.n_kept, stats.n_bad()) == (7, 2, 5)
    assert "dropped 5 bad rows (missing field 'chosen': row 1; " in stats.summary()
    assert "empty completion: rows 3, 4;" in stats.summary()
    assert stats.counts() == {"rows": 7, "kept": 2, "bad_rows": 5, "prompt_too_long": 0, "truncated": 0}


def test_bad_rows_error_mode_lists_rows_and_the_fix(tmp_path, tokenizer):
    source = write_jsonl(tmp_path / "bad.jsonl", BAD_ROWS)
    with pytest.raises(DataError) as caught:
        load(source, tokenizer, on_bad_rows="error")
    message = str(caught.value)
    assert source in message and "set data.on_bad_rows=drop to skip them" in message
    for reason, rows in BAD_REASONS.items():
        assert f"{reason}: row{'s' if len(rows) > 1 else ''} {', '.join(map(str, rows))}" in message


def test_bad_conversational_rows(tmp_path, tokenizer):
    good = {"prompt": user("hi"), "chosen": assistant("hello world"), "rejected": assistant("goodbye")}
    rows = [
        good,
        {**good, "rejected": [{"role": "assistant", "content": None}]},
        {**good, "rejected": assistant("hello world")},
        {**good, "chosen": assistant(" ")},
        {"prompt": [], "chosen": assistant("a"), "rejected": assistant("b")},
    ]
    _, stats = load(write_jsonl(tmp_path / "c.jsonl", rows), tokenizer)
    assert stats.bad_rows == {
        "wrong type for 'rejected' (expected a list of {role, content} messages, got a message without a string "
        "role and content)": [1],
        "chosen identical to rejected": [2],
        "empty completion": [3],
        "empty prompt": [4],
    }


def test_no_surviving_rows_names_source_and_most_common_reason(tmp_path, tokenizer):
    rows = [{"prompt": user("hi"), "chosen": assistant("a"), "rejected": assistant("b")}] * 3
    source = write_jsonl(tmp_path / "conv.jsonl", rows)
    expected = r"conv\.jsonl: none of its 3 rows.*wrong type for 'prompt' \(expected str, got list\)"
    with pytest.raises(DataError, match=expected + ".*read as data.format=standard"):
        load(source, tokenizer, format="standard")


# ----------------------------------------------------------------------------------------- truncation


def test_truncation_policy(tmp_path, tokenizer):
    long_prompt = "Say hello. " * 10
    rows = [STANDARD[2], {"prompt": long_prompt, "chosen": " hello", "rejected": " goodbye"}]
    prompt_ids, chosen_ids, rejected_ids = expected_pair(tokenizer, **STANDARD[2])
    max_length = len(prompt_ids) + 2  # room for two completion tokens
    assert len(chosen_ids) > 2 and len(ids(tokenizer, long_prompt, bos=True)) >= max_length
    pairs, stats = load(write_jsonl(tmp_path / "t.jsonl", rows), tokenizer, max_length=max_length)
    assert (stats.n_kept, stats.n_prompt_too_long, stats.n_truncated) == (1, 1, 1)
    assert list(pairs["row"]) == [0]
    # The prompt is whole; each completion keeps its first two tokens and, cut, loses its EOS.
    assert as_tuples(pairs) == [(prompt_ids, chosen_ids[:2], rejected_ids[:2])]
    assert f"1 with a prompt of >= max_length={max_length} tokens" in stats.summary()
    assert f"1 pairs had completions truncated to fit max_length={max_length}" in stats.summary()


def test_every_prompt_too_long_is_an_error(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"max_length=3 tokens \(raise data.max_length\)"):
        load(write_jsonl(tmp_path / "t.jsonl", STANDARD), tokenizer, max_length=3)


# ------------------------------------------------------------------------------------------- batching


def test_collate_pairs_masks_exactly_the_completions():
    rows = [
        {"prompt_input_ids": [1, 10], "chosen_input_ids": [11, 2], "rejected_input_ids": [12, 13, 2]},
        {"prompt_input_ids": [1], "chosen_input_ids": [14], "rejected_input_ids": [15, 2]},
    ]
    batch = collate_pairs(rows, pad_token_id=0)
    assert batch["input_ids"].tolist() == [
        [1, 10, 11, 2, 0],  # chosen 0
        [1, 14, 0, 0, 0],  # chosen 1
        [1, 10, 12, 13, 2],  # rejected 0
        [1, 15, 2, 0, 0],  # rejected 1
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1] * 5, [1, 1, 1, 0, 0]]
    assert batch["loss_mask"].tolist() == [
        [False, False, True, True, False],
        [False, True, False, False, False],
        [False, False, True, True, True],
        [False, True, True, False, False],
    ]
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long
    assert batch["loss_mask"].dtype == torch.bool


def test_masked_tokens_decode_to_completion_plus_eos(tmp_path, tokenizer):
    pairs, _ = load(write_jsonl(tmp_path / "x.jsonl", STANDARD), tokenizer)
    batch = collate_pairs(list(pairs), pad_token_id=tokenizer.pad_token_id)
    completions = [r["chosen"] for r in STANDARD] + [r["rejected"] for r in STANDARD]
    for input_ids, loss_mask, completion in zip(batch["input_ids"], batch["loss_mask"], completions, strict=True):
        assert tokenizer.decode(input_ids[loss_mask]) == completion + "</s>"


# ------------------------------------------------------------------------------------ train/eval split


def test_eval_fraction_split_is_deterministic_disjoint_and_by_prompt(tmp_path, tokenizer):
    rows = [{"prompt": f"Q{i // 2}:", "chosen": f" a{i}", "rejected": f" b{i}"} for i in range(40)]
    cfg = DataConfig(train=write_jsonl(tmp_path / "x.jsonl", rows), eval_fraction=0.25)
    train, evals, stats = load_train_eval(cfg, tokenizer, seed=0)
    again_train, again_eval, _ = load_train_eval(cfg, tokenizer, seed=0)
    assert (list(train["row"]), list(evals["row"])) == (list(again_train["row"]), list(again_eval["row"]))
    assert len(evals) == 10 and sorted(list(train["row"]) + list(evals["row"])) == list(range(40))
    # Both pairs of a prompt land on the same side: no eval prompt is trained on.
    assert {tuple(p) for p in train["prompt_input_ids"]}.isdisjoint(tuple(p) for p in evals["prompt_input_ids"])
    assert list(load_train_eval(cfg, tokenizer, seed=1)[1]["row"]) != list(evals["row"])
    assert [s.n_rows for s in stats] == [40]


def test_separate_eval_source_and_no_eval(tmp_path, tokenizer):
    source = write_jsonl(tmp_path / "x.jsonl", STANDARD)
    train, evals, stats = load_train_eval(DataConfig(train=source, eval=source), tokenizer, seed=0)
    assert len(train) == len(evals) == 3 and len(stats) == 2
    assert load_train_eval(DataConfig(train=source), tokenizer, seed=0)[1] is None


# ---------------------------------------------------------------------------------- errors for users


def test_missing_file_names_it(tmp_path, tokenizer):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=f"data file not found: {missing}"):
        load(missing, tokenizer)
    with pytest.raises(DataError, match="data file not found: data/prefs.jsonl"):
        read_rows("data/prefs.jsonl", "train")


def test_unknown_name_is_tried_on_the_hub_and_both_failures_explained(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"no such local file or directory .*tmp.*Hugging Face Hub failed"):
        read_rows("someorg/prefs", "train")


def test_empty_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"empty\.jsonl is empty"):
        read_rows(str(tmp_path / "empty.jsonl"), "train")


def test_malformed_jsonl_line_names_file_and_line(tmp_path, tokenizer):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(STANDARD[0]) + "\n" + '{"prompt": "a", chosen": "b"}\n')
    with pytest.raises(DataError, match=rf"could not read {path}: line 2 is not valid JSON"):
        load(str(path), tokenizer)


def test_missing_column(tmp_path, tokenizer):
    source = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "a", "chosen": "b"}])
    with pytest.raises(DataError, match=r"no 'rejected' column \(found \['prompt', 'chosen'\]\)"):
        load(source, tokenizer)


def test_tokenizer_requirements(tmp_path, tokenizer):
    row = {"prompt": user("hi"), "chosen": assistant("a"), "rejected": assistant("b")}
    conv = write_jsonl(tmp_path / "c.jsonl", [row])
    no_template = copy.deepcopy(tokenizer)
    no_template.chat_template = None
    with pytest.raises(DataError, match="no chat template .*set model.chat_template"):
        load(conv, no_template)
    unstable = copy.deepcopy(tokenizer)
    unstable.chat_template = "{{ messages | length }}" + CHAT_TEMPLATE  # the message count leads the text
    with pytest.raises(DataError, match=r"c\.jsonl row 0: the tokenizer's chat template is not prefix-stable"):
        load(conv, unstable)
    # A template that rejects one row's content (here a system turn) drops that row, like any bad row.
    no_system = copy.deepcopy(tokenizer)
    no_system.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}" + CHAT_TEMPLATE
    )
    with_system = {**row, "prompt": [{"role": "system", "content": "be brief"}] + user("hi")}
    _, stats = load(write_jsonl(tmp_path / "s.jsonl", [row, with_system]), no_system)
    assert stats.bad_rows == {"chat template failed: no system role": [1]}
    no_eos = copy.deepcopy(tokenizer)
    no_eos.eos_token = None
    with pytest.raises(DataError, match="no eos_token"):
        load(write_jsonl(tmp_path / "x.jsonl", STANDARD), no_eos)


@pytest.mark.parametrize("given", ["file", "relative file", "text"])
def test_model_chat_template_gives_a_base_model_tokenizer_a_template(tmp_path, tokenizer, monkeypatch, given):
    """A base model's tokenizer has no chat template: model.chat_template (the Jinja text, or a file holding it,
    relative to the working directory like every path) makes its conversational data readable."""
    from mdpo_ray.config import ConfigError, validate_config
    from mdpo_ray.training.model import load_tokenizer

    base = copy.deepcopy(tokenizer)
    base.chat_template = None
    base.save_pretrained(tmp_path / "base")
    (tmp_path / "chat.jinja").write_text(CHAT_TEMPLATE)
    monkeypatch.chdir(tmp_path)
    value = {"file": str(tmp_path / "chat.jinja"), "relative file": "chat.jinja", "text": CHAT_TEMPLATE}[given]
    conv = write_jsonl(tmp_path / "c.jsonl", [{"prompt": HI, "chosen": HELLO, "rejected": BYE}])
    raw = {"model": {"name_or_path": str(tmp_path / "base"), "chat_template": value}, "data": {"train": conv}}
    loaded = load_tokenizer(validate_config(raw).model)
    assert loaded.chat_template == CHAT_TEMPLATE
    pairs, _ = load(conv, loaded)
    assert as_tuples(pairs) == [conversational_expected(tokenizer, "hi", "hello world", "goodbye")]
    without = load_tokenizer(validate_config(raw | {"model": {"name_or_path": str(tmp_path / "base")}}).model)
    with pytest.raises(DataError, match="set model.chat_template"):
        load(conv, without)
    with pytest.raises(ConfigError, match=r"model.chat_template: 'chat.jnija' is neither a Jinja template .* nor a "
                                          r"file \(looked for .*chat.jnija\)"):
        validate_config(raw | {"model": {"name_or_path": str(tmp_path / "base"), "chat_template": "chat.jnija"}})


def test_stats_summary_without_drops():
    assert DataStats("s", 5, 5, {}, 0, 0).summary() == "s: 5 rows, 5 kept"


def test_chat_template_that_renders_bos_gives_one_bos(tmp_path, tokenizer):
    llama_like = copy.deepcopy(tokenizer)
    llama_like.chat_template = "{{ bos_token }}" + CHAT_TEMPLATE
    row = {"prompt": user("hi"), "chosen": assistant("hello world"), "rejected": assistant("goodbye")}
    pairs, _ = load(write_jsonl(tmp_path / "c.jsonl", [row]), llama_like)
    assert as_tuples(pairs) == [conversational_expected(tokenizer, "hi", "hello world", "goodbye")]


def test_empty_implicit_prompt_needs_a_bos_token(tmp_path, tokenizer):
    rows = [{"chosen": "yes", "rejected": "no"}, {"chosen": "Q: 4", "rejected": "Q: 5"}]
    source = write_jsonl(tmp_path / "x.jsonl", rows)
    assert load(source, tokenizer)[1].n_kept == 2  # BOS is the prompt the first token conditions on
    no_bos = copy.deepcopy(tokenizer)
    no_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A")
    assert no_bos("yes")["input_ids"] == ids(tokenizer, "yes")
    assert load(source, no_bos)[1].bad_rows == {"empty prompt": [0]}
