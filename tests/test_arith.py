"""The generated task: formats, what each kind of rejected answer breaks, split disjointness, determinism."""

from __future__ import annotations

import re

import pytest
from transformers import AutoTokenizer

from mdpo_ray.config import BuiltinTaskConfig
from mdpo_ray.task import arith
from mdpo_ray.task.generation import extract_answer

SMALL = dict(n_sft_problems=300, n_pref_pairs=200, n_eval_pairs=50, n_eval_problems=80)
PROMPT = re.compile(r"^Q: \d{1,2}([+-]\d{1,2}){2,3}= A:$")
STEP = re.compile(r"^(\d+)([+-])(\d+)=(\d+)$")


def parse_chain(completion: str) -> tuple[list[tuple[int, str, int, int]], int]:
    """' 9+2=11; 11-3=8. #### 8' -> ([(9, '+', 2, 11), (11, '-', 3, 8)], 8)."""
    assert completion.startswith(" ")
    body, answer = completion[1:].split(". #### ")
    steps = []
    for text in body.split("; "):
        a, op, b, r = STEP.match(text).groups()
        steps.append((int(a), op, int(b), int(r)))
    return steps, int(answer)


def true_answer(prompt: str) -> int:
    return eval(prompt[3:-4])  # "Q: 97-53-5-33= A:" -> 97-53-5-33 (digits and +/- only, checked by PROMPT)


def consistent(steps) -> bool:
    lefts_follow = all(steps[i + 1][0] == steps[i][3] for i in range(len(steps) - 1))
    arithmetic = all(r == (a + b if op == "+" else a - b) for a, op, b, r in steps)
    return lefts_follow and arithmetic


@pytest.fixture(scope="module", params=["near_miss", "wrong_final"])
def task(request):
    return request.param, arith.generate_task(BuiltinTaskConfig(rejected_kind=request.param, **SMALL))


def test_the_example_from_the_notes():
    problem = arith.Problem((97, 53, 5, 33), ("-", "-", "-"))
    assert problem.prompt == "Q: 97-53-5-33= A:"
    assert problem.chain() == " 97-53=44; 44-5=39; 39-33=6. #### 6"
    assert problem.answer == 6


def test_split_sizes_and_formats(task):
    _, splits = task
    assert {name: len(rows) for name, rows in splits.items()} == {
        "sft": 300, "pairs": 200, "eval_pairs": 50, "eval_problems": 80,
    }
    for row in splits["sft"] + splits["pairs"] + splits["eval_pairs"]:
        assert PROMPT.match(row["prompt"]), row
        steps, answer = parse_chain(row["chosen"])
        assert 2 <= len(steps) <= 3 and consistent(steps)
        assert answer == steps[-1][3] == true_answer(row["prompt"]) == extract_answer(row["chosen"])
        assert len(row["chosen"]) <= arith.MAX_COMPLETION_CHARS
        assert all(0 <= b <= 99 and 0 <= r <= 199 for _, _, b, r in steps)
    for row in splits["eval_problems"]:
        assert set(row) == {"prompt", "answer"} and row["answer"] == true_answer(row["prompt"])


def test_near_miss_changes_one_character_of_a_non_final_result_and_keeps_the_answer():
    splits = arith.generate_task(BuiltinTaskConfig(rejected_kind="near_miss", **SMALL))
    for row in splits["pairs"] + splits["eval_pairs"]:
        chosen, rejected = row["chosen"], row["rejected"]
        assert len(chosen) == len(rejected)
        assert sum(c != r for c, r in zip(chosen, rejected)) == 1
        steps, answer = parse_chain(rejected)
        assert answer == extract_answer(rejected) == true_answer(row["prompt"])
        assert not consistent(steps)
        true_steps, _ = parse_chain(chosen)
        changed = [i for i, (s, t) in enumerate(zip(steps, true_steps)) if s != t]
        assert len(changed) == 1 and changed[0] < len(steps) - 1  # a non-final step, and only its result
        assert steps[changed[0]][:3] == true_steps[changed[0]][:3]
        assert len(rejected) <= arith.MAX_COMPLETION_CHARS


def test_wrong_final_has_a_wrong_answer_from_a_propagated_one_digit_slip():
    splits = arith.generate_task(BuiltinTaskConfig(rejected_kind="wrong_final", **SMALL))
    for row in splits["pairs"] + splits["eval_pairs"]:
        steps, answer = parse_chain(row["rejected"])
        assert answer == extract_answer(row["rejected"]) != true_answer(row["prompt"])
        true_steps, _ = parse_chain(row["chosen"])
        first = next(i for i, (s, t) in enumerate(zip(steps, true_steps)) if s != t)
        slipped, right = str(steps[first][3]), str(true_steps[first][3])
        assert len(slipped) == len(right) and sum(a != b for a, b in zip(slipped, right)) == 1
        carried = all(steps[i][0] == steps[i - 1][3] for i in range(first + 1, len(steps)))
        assert carried and consistent(steps[first + 1 :])  # later steps redo the arithmetic from the slip
        assert all(0 <= r <= 199 for *_, r in steps) and len(row["rejected"]) <= arith.MAX_COMPLETION_CHARS


def test_splits_are_disjoint_by_operands_and_operators(task):
    _, splits = task
    seen: dict[str, str] = {}
    for name, rows in splits.items():
        for row in rows:
            assert row["prompt"] not in seen, (row["prompt"], seen.get(row["prompt"]), name)
            seen[row["prompt"]] = name  # the prompt spells out exactly the operands and operators


def test_deterministic_under_seed_and_held_out_sets_do_not_depend_on_training_sizes():
    cfg = BuiltinTaskConfig(**SMALL)
    assert arith.generate_task(cfg) == arith.generate_task(cfg)
    other_seed = arith.generate_task(BuiltinTaskConfig(**SMALL, seed=1))
    assert other_seed["sft"] != arith.generate_task(cfg)["sft"]
    bigger = arith.generate_task(BuiltinTaskConfig(**{**SMALL, "n_sft_problems": 500, "n_pref_pairs": 300}))
    assert bigger["eval_problems"] == arith.generate_task(cfg)["eval_problems"]
    assert bigger["eval_pairs"] == arith.generate_task(cfg)["eval_pairs"]


def test_tokenizer_is_character_level_and_round_trips(tmp_path):
    tokenizer = arith.build_tokenizer()
    assert len(tokenizer) == len(arith.CHARACTERS) + 3
    text = "Q: 97-53-5-33= A: 97-53=44; 44-5=39; 39-33=6. #### 6"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) == len(text) + 1
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids[1:]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.decode(ids[1:]) == text  # no spaces inserted between characters
    assert len({tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}) == 3

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(text)["input_ids"] == ids
    assert loaded.decode(ids, skip_special_tokens=True) == text
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id,
    )


def test_model_config_matches_the_tokenizer():
    tokenizer = arith.build_tokenizer()
    config = arith.model_config(BuiltinTaskConfig(n_layers=3), tokenizer)
    assert config.vocab_size == len(tokenizer) and config.num_hidden_layers == 3
    assert (config.hidden_size, config.num_attention_heads, config.intermediate_size) == (128, 4, 512)
    assert config.tie_word_embeddings and config.max_position_embeddings == 128
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id,
    )
