"""Iterative on-policy training's pure parts: the iterate: config, the verifiers and the pairing rules."""

import sys
import textwrap

import pytest

from mdpo_ray.config import ConfigError, IterateConfig, load_config
from mdpo_ray.iterate.sample import HFGenerator, round_rows, sample_round
from mdpo_ray.iterate.verify import final_answer_check, load_verifier, make_pairs, score

ROW = {"prompt": "Q: 2+3-1= A:", "chosen": " 2+3=5; 5-1=4. #### 4", "rejected": " 2+3=5; 5-1=3. #### 3"}
RIGHT, WRONG, NO_ANSWER = " 2+3=5; 5-1=4. #### 4", " 2+3=6; 6-1=5. #### 5", " 2+3=5; 5-1"


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """An importable module `my_checks` with a float verifier, a bool one, a non-function and a broken return."""
    (tmp_path / "my_checks.py").write_text(textwrap.dedent("""
        def contains_four(prompt, completion, row):
            return 1.0 if "4" in completion else 0.0

        def always(prompt, completion, row):
            return True

        def broken(prompt, completion, row):
            return "yes"

        THRESHOLD = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_checks"
    sys.modules.pop("my_checks", None)


# --- iterate: config -------------------------------------------------------------------------------


def test_iterate_defaults_to_a_single_run():
    cfg = load_config()
    assert cfg.iterate.rounds == 0 and cfg.iterate.verifier is None and cfg.iterate.reference == "previous"
    assert load_verifier(cfg.iterate) is final_answer_check


@pytest.mark.parametrize(("spec", "needle"), [
    ("no_such_module_xyz:check", "cannot import 'no_such_module_xyz'"),
    ("my_checks:missing", "'my_checks' has no function 'missing'"),
    ("my_checks:THRESHOLD", "my_checks:THRESHOLD is not a function (it is a int value)"),
    ("my_checks.contains_four", "not of the form package.module:function"),
])
def test_a_verifier_that_does_not_resolve_is_a_config_error_naming_the_key(user_module, spec, needle):
    with pytest.raises(ConfigError, match="iterate.verifier") as info:
        load_config(None, [f"iterate.verifier={spec}"])
    assert needle in str(info.value)


def test_a_user_verifier_is_loaded_from_its_module(user_module):
    cfg = load_config(None, ["iterate.verifier=my_checks:contains_four"])
    verifier = load_verifier(cfg.iterate)
    assert verifier("p", "#### 4", {}) == 1.0 and verifier("p", "#### 5", {}) == 0.0


@pytest.mark.parametrize(("override", "needle"), [
    ("iterate.samples_per_prompt=1", "iterate.samples_per_prompt"),
    ("iterate.temperature=0", "iterate.temperature"),
    ("iterate.reference=sft", "iterate.reference"),
    ("iterate.prompts_per_round=0", "iterate.prompts_per_round"),
])
def test_bad_iterate_values_are_refused_with_the_key(override, needle):
    with pytest.raises(ConfigError, match="iterate") as info:
        load_config(None, [override])
    assert needle in str(info.value)


@pytest.mark.parametrize(("overrides", "needle"), [
    (["model.lora.r=4", "export.lora=both"], "Set export.lora=adapter"),
    (["model.lora.r=4", "iterate.reference=initial"], "set reference=precompute or iterate.reference=previous"),
])
def test_iterate_rounds_refuse_what_the_rounds_cannot_chain(overrides, needle):
    with pytest.raises(ConfigError, match="iterate.rounds|iterate.reference") as info:
        load_config(None, ["iterate.rounds=2", *overrides])
    assert needle in str(info.value)
    load_config(None, overrides)  # each is fine for a single run


def test_a_resident_lora_reference_cannot_be_another_model():
    with pytest.raises(ConfigError, match="model.reference with model.lora.r > 0 needs reference=precompute"):
        load_config(None, ["model.lora.r=4", "model.reference=gpt2"])
    load_config(None, ["model.lora.r=4", "model.reference=gpt2", "reference=precompute"])


# --- verifiers -------------------------------------------------------------------------------------


def test_final_answer_check_compares_the_integer_after_the_last_marker():
    assert final_answer_check(ROW["prompt"], RIGHT, ROW) is True  # truth from the chosen answer
    assert final_answer_check(ROW["prompt"], WRONG, ROW) is False
    assert final_answer_check(ROW["prompt"], NO_ANSWER, ROW) is False  # no final answer: wrong
    assert final_answer_check("p", "#### 5", {"prompt": "p", "answer": 5}) is True  # an int answer wins
    assert final_answer_check("p", "#### 5", {"prompt": "p", "answer": "5"}) is True
    assert final_answer_check("p", "#### 5", {"prompt": "p", "answer": "so #### 1,005"}) is False
    assert final_answer_check("p", "#### 1005", {"prompt": "p", "answer": "so #### 1,005"}) is True
    with pytest.raises(ValueError, match="iterate.verifier"):
        final_answer_check("p", "#### 5", {"prompt": "p", "chosen": "five"})
    talk = {"prompt": [{"role": "user", "content": "2+3-1="}], "chosen": [{"role": "assistant", "content": RIGHT}]}
    assert final_answer_check(talk["prompt"], RIGHT, talk) and not final_answer_check(talk["prompt"], WRONG, talk)


def test_scores_read_bools_and_numbers_against_one_half(user_module):
    assert score(lambda p, c, r: True, "p", "c", {}) and not score(lambda p, c, r: False, "p", "c", {})
    assert score(lambda p, c, r: 0.5, "p", "c", {}) and not score(lambda p, c, r: 0.49, "p", "c", {})
    assert score(lambda p, c, r: 1, "p", "c", {})
    from my_checks import broken
    with pytest.raises(ValueError, match="broken returned 'yes'"):
        score(broken, "p", "c", {})
    with pytest.raises(ValueError, match="must return a bool or a number"):
        score(lambda p, c, r: float("nan"), "p", "c", {})


# --- pairing ---------------------------------------------------------------------------------------


def _rows(n):
    return [{"prompt": f"Q: {i}+0= A:", "answer": i} for i in range(n)]


def test_pairs_are_a_correct_and_an_incorrect_completion_and_one_sided_prompts_are_counted():
    rows = _rows(4)
    completions = [
        ["#### 0", "#### 7", "#### 0", "#### 9"],  # mixed: one pair
        ["#### 1", "#### 1", "#### 1", "#### 1"],  # all correct
        ["#### 5", "", "nothing", "#### 6"],  # all wrong (the empty one too)
        ["#### 3", "   ", "#### 3", "#### 3"],  # correct but the other is empty: nothing to reject
    ]
    out = make_pairs(rows, completions, final_answer_check, seed=0)
    assert [p["prompt"] for p in out.pairs] == [rows[0]["prompt"]]
    assert out.pairs[0]["chosen"] == "#### 0" and out.pairs[0]["rejected"] in ("#### 7", "#### 9")
    assert (out.prompts_all_correct, out.prompts_all_wrong) == (2, 1)
    assert (out.samples, out.correct) == (16, 2 + 4 + 0 + 3)
    assert out.metrics() == {"iterate/pairs": 1.0, "iterate/prompts_all_correct": 2.0,
                             "iterate/prompts_all_wrong": 1.0, "iterate/sample_accuracy": 9 / 16}


def test_pairing_is_seeded_deterministic_and_each_prompt_draws_alone():
    rows = _rows(30)
    completions = [[f"#### {i}", f"#### {i} ok", f"#### {i + 1}", f"#### {i + 2}", f"#### {i + 3}"]
                   for i in range(30)]
    first = make_pairs(rows, completions, final_answer_check, seed=7)
    assert make_pairs(rows, completions, final_answer_check, seed=7) == first
    assert make_pairs(rows, completions, final_answer_check, seed=8).pairs != first.pairs  # 30 draws of 2 x 3
    # Prompt i's pair depends on (seed, i) and its own samples only: changing the others leaves it alone.
    changed = [completions[0]] + [["#### 99", "#### 98"]] * 29
    assert make_pairs(rows, changed, final_answer_check, seed=7).pairs == first.pairs[:1]
    for pair, row in zip(first.pairs, rows, strict=True):
        assert final_answer_check(row["prompt"], pair["chosen"], row)
        assert not final_answer_check(row["prompt"], pair["rejected"], row)


def test_a_user_verifier_decides_the_pairs(user_module):
    verifier = load_verifier(load_config(None, ["iterate.verifier=my_checks:contains_four"]).iterate)
    out = make_pairs([{"prompt": "p"}], [["has 4", "has 5"]], verifier, seed=0)
    assert out.pairs == [{"prompt": "p", "chosen": "has 4", "rejected": "has 5"}]


def test_mismatched_rows_and_samples_are_refused():
    with pytest.raises(ValueError, match="2 rows but 1"):
        make_pairs(_rows(2), [["#### 0"]], final_answer_check, seed=0)


# --- sampling a round ------------------------------------------------------------------------------


def test_a_round_draws_distinct_prompts_seeded_and_anew_each_round():
    rows = [{"prompt": f"Q: {i % 20}+0= A:", "answer": i % 20, "copy": i // 20} for i in range(40)]  # each twice
    everything = round_rows(rows, IterateConfig(), seed=0, round_index=0)
    assert [r["prompt"] for r in everything] == [f"Q: {i}+0= A:" for i in range(20)]
    assert all(r["copy"] == 0 for r in everything)  # a prompt's first row
    cfg = IterateConfig(prompts_per_round=5)
    first = round_rows(rows, cfg, seed=0, round_index=0)
    assert len(first) == 5 and len({r["prompt"] for r in first}) == 5
    assert [r["answer"] for r in first] == sorted(r["answer"] for r in first)  # in data order
    assert round_rows(rows, cfg, seed=0, round_index=0) == first
    assert round_rows(rows, cfg, seed=0, round_index=1) != first
    talk = [{"prompt": [{"role": "user", "content": f"Q: {i % 3}+0="}], "n": i} for i in range(6)]  # each twice
    assert [r["n"] for r in round_rows(talk, IterateConfig(), seed=0, round_index=0)] == [0, 1, 2]


def test_rounds_sample_the_prompts_of_every_data_format(tmp_path):
    """data.formats.prompt_rows: the prompt as the data holds it, whatever the format; a row without one is left
    out (the data check reported it)."""
    import json

    from mdpo_ray.data.formats import prompt_rows

    def source(name, rows):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return str(path)

    user = [{"role": "user", "content": "Q: 1+1="}]
    answer = lambda text: [{"role": "assistant", "content": text}]
    cases = {
        "standard": ([ROW, {"prompt": None, "chosen": "a", "rejected": "b"}], [ROW["prompt"]]),
        "implicit": ([{"chosen": "Q: 2+2= A: 4", "rejected": "Q: 2+2= A: 5"}], ["Q: 2+2= A:"]),
        "messages": ([{"prompt": user, "chosen": answer("#### 2"), "rejected": answer("#### 3")}], [user]),
        "shared": ([{"chosen": user + answer("#### 2"), "rejected": user + answer("#### 3")}], [user]),
    }
    for name, (rows, prompts) in cases.items():
        read = prompt_rows(source(name, rows), split="train", format="auto")
        assert [row["prompt"] for row in read] == prompts, name
    assert prompt_rows(source("keeps", [ROW | {"answer": 4}]), split="train", format="auto")[0]["answer"] == 4


@pytest.fixture(scope="module")
def generator():
    """transformers sampling on a random tiny model of the built-in task (wide init: varied outputs)."""
    import torch
    from transformers import LlamaForCausalLM

    from mdpo_ray.config import BuiltinTaskConfig
    from mdpo_ray.task import arith

    tokenizer = arith.build_tokenizer()
    config = arith.model_config(BuiltinTaskConfig(hidden_size=64, intermediate_size=128), tokenizer)
    config.initializer_range = 1.0
    torch.manual_seed(0)
    return HFGenerator(LlamaForCausalLM(config).eval(), tokenizer, max_new_tokens=8, batch_size=3)


def test_the_transformers_backend_samples_n_per_prompt_reproducibly(generator):
    import torch

    prompts = ["Q: 1+2= A:", "Q: 97-53-5-33= A:", "Q: 9+9-1= A:", "Q: 40-4+17= A:"]
    state = torch.random.get_rng_state()
    first = generator.sample(prompts, n=3, temperature=1.0, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    assert [len(c) for c in first] == [3, 3, 3, 3] and all(isinstance(t, str) for c in first for t in c)
    assert generator.sample(prompts, n=3, temperature=1.0, seed=1) == first
    assert generator.sample(prompts, n=3, temperature=1.0, seed=2) != first


def test_a_sampled_round_accounts_for_every_prompt_and_sample(generator):
    rows = [{"prompt": f"Q: {i}+{i}= A:", "answer": 2 * i} for i in range(6)]
    cfg = IterateConfig(samples_per_prompt=4, prompts_per_round=5, temperature=1.5)
    has_digit_one = lambda prompt, completion, row: "1" in completion  # splits random samples
    out = sample_round(generator, rows, cfg, has_digit_one, seed=0, round_index=2)
    assert out.pairs and len(out.pairs) + out.prompts_all_correct + out.prompts_all_wrong == 5
    assert out.samples == 5 * 4
    assert all("1" in p["chosen"] and "1" not in p["rejected"] for p in out.pairs)
    assert sample_round(generator, rows, cfg, has_digit_one, seed=0, round_index=2) == out


def test_a_conversation_is_sampled_from_the_tokens_its_pairs_are_trained_on(generator, tmp_path, monkeypatch):
    """Messages are rendered with the chat template and tokenized as training tokenizes a pair's prompt (one BOS,
    though the template writes it), and the saved pairs are conversational data whose prompt tokens are exactly
    those the policy was sampled from, and whose answers are the samples."""
    import copy

    from mdpo_ray.data.pairs import load_pairs
    from mdpo_ray.iterate.store import PAIRS_FILE, save_pairing

    tokenizer = copy.deepcopy(generator.tokenizer)  # the task's character tokenizer: Q, A, digits, signs
    tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}{{ 'Q: ' if m['role'] == 'user' else 'A:' }}"
                               "{{ m['content'] }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}A:{% endif %}")
    chat = HFGenerator(generator.model, tokenizer, max_new_tokens=8, batch_size=3)
    seen = []
    generate = chat.model.generate

    def recording(**kwargs):
        for ids, mask in zip(kwargs["input_ids"], kwargs["attention_mask"], strict=True):
            seen.append(ids[mask.bool()].tolist())
        return generate(**kwargs)

    monkeypatch.setattr(chat.model, "generate", recording)
    rows = [{"prompt": [{"role": "user", "content": f"{i}+{i}="}], "answer": 2 * i} for i in range(6)]
    has_digit_one = lambda prompt, completion, row: "1" in completion
    out = sample_round(chat, rows, IterateConfig(samples_per_prompt=4, temperature=1.5), has_digit_one, seed=0,
                       round_index=0)
    assert out.pairs and all(isinstance(pair["prompt"], list) for pair in out.pairs)
    assert all(pair["chosen"][0]["role"] == "assistant" and "1" in pair["chosen"][0]["content"] for pair in out.pairs)
    assert seen[0][:2] == [tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids("Q")]  # one BOS
    save_pairing(str(tmp_path), out)
    pairs, _ = load_pairs(str(tmp_path / PAIRS_FILE), split="train", tokenizer=tokenizer, max_length=128)
    by_prompt = {tokenizer.decode(ids): ids for ids in seen}
    for pair, trained in zip(out.pairs, pairs, strict=True):
        sampled_from = by_prompt[tokenizer.decode(trained["prompt_input_ids"])]
        assert trained["prompt_input_ids"] == sampled_from
        chosen = tokenizer.decode(trained["chosen_input_ids"])
        assert chosen.startswith(pair["chosen"][0]["content"]), (chosen, pair)


def test_the_run_description_and_trial_names_say_the_nll_term():
    from mdpo_ray.tracking.labels import SHORT_KEYS, describe_loss

    assert describe_loss(load_config(None, ["loss.name=dpo"]).loss) == "dpo β=0.1"
    assert describe_loss(load_config(None, ["loss.name=dpo", "loss.nll_weight=1"]).loss) == "dpo β=0.1 + nll 1"
    assert SHORT_KEYS["loss.nll_weight"] == "nll"


# --- saved rounds ----------------------------------------------------------------------------------


def test_a_saved_round_is_read_back_instead_of_resampled(tmp_path):
    from mdpo_ray.iterate.store import PAIRING_FILE, load_pairing, round_location, sampled_once

    location = round_location(str(tmp_path / "run"), 2)
    assert location.endswith("iterate/round_002")
    completions = [["#### 0", "#### 9"], ["#### 1", "#### 1"], ["#### 7", "#### 8"]]
    calls = []

    def sample():
        calls.append(1)
        return make_pairs(_rows(3), completions, final_answer_check, seed=3)

    first, reused = sampled_once(location, sample)
    assert not reused and len(calls) == 1 and first.pairs
    again, reused = sampled_once(location, sample)
    assert reused and len(calls) == 1 and again == first
    # A save killed before its counts file: the round is not complete, so it is sampled again.
    (tmp_path / "run" / "iterate" / "round_002" / PAIRING_FILE).unlink()
    assert load_pairing(location) is None
    assert sampled_once(location, sample) == (first, False) and len(calls) == 2


def test_saved_pairs_are_a_training_file(tmp_path):
    """pairs.jsonl is what the round trains on: data.train reads it as standard {prompt, chosen, rejected} rows."""
    from mdpo_ray.iterate.store import PAIRS_FILE, round_location, save_pairing

    location = round_location(str(tmp_path / "run"), 0)
    save_pairing(location, make_pairs(_rows(2), [["#### 0", "#### 5"], ["#### 6", "#### 1"]], final_answer_check,
                                      seed=0))
    from mdpo_ray.data.formats import read_rows_as

    rows, fmt = read_rows_as(f"{location}/{PAIRS_FILE}", split="train", format="auto")
    assert fmt == "standard"
    assert rows.to_list() == [{"prompt": "Q: 0+0= A:", "chosen": "#### 0", "rejected": "#### 5"},
                              {"prompt": "Q: 1+0= A:", "chosen": "#### 1", "rejected": "#### 6"}]
