"""Greedy answer accuracy: answer parsing, and batched left-padded decoding equal to one prompt at a time."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig, LlamaForCausalLM

from mdpo_ray.config import BuiltinTaskConfig
from mdpo_ray.task import arith
from mdpo_ray.task.generation import _left_padded, extract_answer, greedy_answer_accuracy

# Different lengths on purpose: batched decoding left-pads the shorter ones.
PROMPTS = ["Q: 1+2= A:", "Q: 97-53-5-33= A:", "Q: 9+9-1= A:", "Q: 40-4+17= A:", "Q: 5-5-0= A:"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" 97-53=44; 44-5=39; 39-33=6. #### 6", 6),
        ("#### 12 #### 7", 7),  # the last marker wins
        ("####-3", -3),
        ("The total is 1,234.\n#### 1,234", 1234),
        ("#### 6.00", 6),
        ("#### 6.5", None),
        ("#### x", None),
        ("#### ", None),
        ("6", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.fixture(scope="module")
def tokenizer():
    return arith.build_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    """A random model with a wide init, so greedy outputs vary with the prompt and with positions (a small
    init decodes one repeated character, which would hide padding and position-id mistakes)."""
    config = arith.model_config(BuiltinTaskConfig(hidden_size=64, intermediate_size=128), tokenizer)
    config.initializer_range = 1.0
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _decode_one(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    return out[0, ids.shape[1] :].tolist()


def _until_eos(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def test_batched_left_padded_decoding_equals_one_at_a_time(model, tokenizer):
    token_lists = tokenizer(PROMPTS)["input_ids"]
    assert len({len(ids) for ids in token_lists}) > 2
    input_ids, attention_mask = _left_padded(token_lists, tokenizer.pad_token_id)
    with torch.no_grad():
        batched = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                 max_new_tokens=20, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
    generated = [row[input_ids.shape[1] :].tolist() for row in batched]
    singles = [_decode_one(model, tokenizer, p, 20) for p in PROMPTS]
    assert len({tuple(s) for s in singles}) == len(PROMPTS)  # the check has teeth: outputs differ by prompt
    for prompt, row, single in zip(PROMPTS, generated, singles):
        assert _until_eos(row, tokenizer.eos_token_id) == single, prompt


@pytest.mark.parametrize("batch_size", [1, 2, len(PROMPTS)])
def test_greedy_answer_accuracy_decodes_each_prompt_as_if_alone(model, tokenizer, batch_size, monkeypatch):
    singles = [_decode_one(model, tokenizer, p, 12) for p in PROMPTS]
    completions: list[list[int]] = []
    generate = model.generate

    def recording_generate(**kwargs):
        out = generate(**kwargs)
        completions.extend(row[kwargs["input_ids"].shape[1] :].tolist() for row in out)
        return out

    monkeypatch.setattr(model, "generate", recording_generate)
    model.train()
    problems = [{"prompt": p, "answer": 0} for p in PROMPTS]
    correct, total = greedy_answer_accuracy(model, tokenizer, problems, max_new_tokens=12, batch_size=batch_size)
    assert model.training  # the mode it was called in comes back
    model.eval()
    assert total == len(PROMPTS) and 0 <= correct <= total
    assert [_until_eos(c, tokenizer.eos_token_id) for c in completions] == singles


class ScriptedModel(torch.nn.Module):
    """Stands in for a causal LM: answers every prompt with the same completion, records each generate call."""

    device = torch.device("cpu")

    def __init__(self, tokenizer, completion: str):
        super().__init__()
        self.script = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        self.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id)
        self.calls: list[dict] = []

    def generate(self, *, input_ids, attention_mask, **kwargs):
        self.calls.append(dict(input_ids=input_ids, attention_mask=attention_mask, **kwargs))
        return torch.cat([input_ids, torch.tensor(self.script).expand(len(input_ids), -1)], dim=1)


def test_accuracy_scores_the_text_after_the_prompt_and_skips_padding_rows(tokenizer):
    model = ScriptedModel(tokenizer, " 1+2=3. #### 3")
    problems = [
        {"prompt": "Q: 1+2= A:", "answer": 3},
        {"prompt": "Q: 10-6-1= A:", "answer": "3"},
        {"prompt": "Q: 2+2= A:", "answer": 4},
        {"prompt": "Q: 3+3= A:", "answer": None},  # padding a distributed shard: decoded, not counted
        {"prompt": "Q: 30-27= A:", "answer": "Three is 3.\n#### 3"},  # a GSM8K-style solution
    ]
    counts = greedy_answer_accuracy(model, tokenizer, problems, max_new_tokens=20, batch_size=4, synced_gpus=True)
    assert counts == (3, 4)
    assert [len(call["input_ids"]) for call in model.calls] == [4, 1]
    first = model.calls[0]
    assert first["do_sample"] is False and first["synced_gpus"] is True and first["max_new_tokens"] == 20
    assert first["pad_token_id"] == tokenizer.pad_token_id and tokenizer.eos_token_id in first["eos_token_id"]
    lengths = [len(tokenizer(p["prompt"])["input_ids"]) for p in problems[:4]]
    assert first["attention_mask"].sum(1).tolist() == lengths
    for row, length in zip(first["input_ids"], lengths):  # left padding: each prompt ends at the last column
        width = len(row)
        assert row[: width - length].eq(tokenizer.pad_token_id).all()
        assert row[width - length].item() == tokenizer.bos_token_id


def test_a_bad_answer_is_a_user_error(tokenizer):
    model = ScriptedModel(tokenizer, " #### 3")
    with pytest.raises(ValueError, match="not an integer"):
        greedy_answer_accuracy(model, tokenizer, [{"prompt": "Q: 1+2= A:", "answer": "three"}],
                               max_new_tokens=5, batch_size=1)
