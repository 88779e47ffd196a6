"""prepare_builtin: the files it leaves, reuse from the cache, and where SFT stops (tiny configs, seconds)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from mdpo_ray.config import BuiltinTaskConfig
from mdpo_ray.task import arith
from mdpo_ray.task.builtin import MARKER, cache_key, prepare_builtin
from mdpo_ray.task.generation import extract_answer, greedy_answer_accuracy
from mdpo_ray.task.sft import SFT_EVAL_PROBLEMS, SFT_SCREEN_PROBLEMS, _sft_backward, _sft_tensors

TINY = dict(
    n_layers=1, hidden_size=32, n_heads=2, intermediate_size=64, n_sft_problems=200, n_pref_pairs=20,
    n_eval_pairs=10, n_eval_problems=20, sft_max_steps=20, sft_eval_every_steps=10, sft_batch_size=16,
)


def tiny(tmp_path, **overrides) -> BuiltinTaskConfig:
    return BuiltinTaskConfig(**{**TINY, "cache_dir": str(tmp_path / "cache"), **overrides})


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One build shared by the tests that only read it: target 0.0 stops at the first eval."""
    cfg = tiny(tmp_path_factory.mktemp("builtin"), sft_target_accuracy=0.0)
    messages: list[str] = []
    return cfg, prepare_builtin(cfg, log=messages.append), messages


def test_build_writes_loadable_model_and_data(built):
    cfg, assets, messages = built
    assert not assets.reused and assets.root.parent == Path(cfg.cache_dir)
    assert assets.root.name == f"builtin-{cache_key(cfg)}"
    assert (assets.model_dir / "model.safetensors").is_file()
    rows = [json.loads(line) for line in assets.train_path.read_text().splitlines()]
    assert len(rows) == cfg.n_pref_pairs and set(rows[0]) == {"prompt", "chosen", "rejected"}
    assert len(assets.eval_path.read_text().splitlines()) == cfg.n_eval_pairs
    problems = [json.loads(line) for line in assets.generation_eval_path.read_text().splitlines()]
    assert len(problems) == cfg.n_eval_problems and set(problems[0]) == {"prompt", "answer"}
    assert any("built in" in m for m in messages)

    model = AutoModelForCausalLM.from_pretrained(assets.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(assets.model_dir)
    assert model.config.num_hidden_layers == cfg.n_layers and model.config.vocab_size == len(tokenizer)
    correct, total = greedy_answer_accuracy(model, tokenizer, problems, max_new_tokens=45, batch_size=32)
    assert total == cfg.n_eval_problems and correct / total == pytest.approx(assets.sft_accuracy)
    assert not [p for p in assets.root.parent.iterdir() if p.name.startswith(".")]  # no staging dir left


def test_target_zero_stops_at_the_first_eval(built):
    cfg, assets, messages = built
    assert assets.sft_steps == cfg.sft_eval_every_steps
    assert [m for m in messages if "SFT step" in m] and not [m for m in messages if "WARNING" in m]


def test_second_call_reuses_without_training(built):
    cfg, first, _ = built
    weights = first.model_dir / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    messages: list[str] = []
    again = prepare_builtin(cfg, log=messages.append)
    assert again.reused and again.root == first.root
    assert (again.sft_accuracy, again.sft_steps) == (first.sft_accuracy, first.sft_steps)
    assert weights.stat().st_mtime_ns == stamp
    assert len(messages) == 1 and "reusing" in messages[0] and "SFT step" not in messages[0]


def test_cache_key_covers_every_field_but_cache_dir_and_rejected_kind(tmp_path):
    cfg = tiny(tmp_path)
    assert cache_key(cfg) == cache_key(tiny(tmp_path / "elsewhere"))
    assert cache_key(cfg) == cache_key(tiny(tmp_path, rejected_kind="wrong_final"))  # one SFT model for all kinds
    assert cache_key(cfg) != cache_key(tiny(tmp_path, seed=1))
    assert cache_key(cfg) != cache_key(tiny(tmp_path, n_layers=2))


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_other_kinds_reuse_the_model_and_pose_the_same_problems(built):
    cfg, first, _ = built
    stamp = (first.model_dir / "model.safetensors").stat().st_mtime_ns
    messages: list[str] = []
    other = prepare_builtin(cfg.model_copy(update={"rejected_kind": "wrong_final"}), log=messages.append)
    assert other.reused and other.model_dir == first.model_dir and other.train_path != first.train_path
    assert (first.model_dir / "model.safetensors").stat().st_mtime_ns == stamp
    near, wrong = _rows(first.train_path), _rows(other.train_path)
    assert [(r["prompt"], r["chosen"]) for r in near] == [(r["prompt"], r["chosen"]) for r in wrong]
    assert all(extract_answer(n["rejected"]) == extract_answer(n["chosen"]) for n in near)
    assert all(extract_answer(w["rejected"]) != extract_answer(w["chosen"]) for w in wrong)


def test_on_policy_rejected_answers_are_the_models_own_wrong_samples(built):
    cfg, first, _ = built
    messages: list[str] = []
    on = prepare_builtin(cfg.model_copy(update={"rejected_kind": "on_policy"}), log=messages.append)
    assert on.reused and on.model_dir == first.model_dir
    assert any("on-policy" in m for m in messages)
    info = json.loads((on.train_path.parent / "info.json").read_text())
    train, held_out = _rows(on.train_path), _rows(on.eval_path)
    assert info["pairs"]["kept"] == len(train) and info["eval_pairs"]["kept"] == len(held_out)
    assert info["pairs"]["kept"] + info["pairs"]["all_correct"] == cfg.n_pref_pairs
    assert train, "a 20-step SFT model gets most answers wrong: there must be pairs"
    near_prompts = {r["prompt"]: r["chosen"] for r in _rows(first.train_path)}
    for row in train + held_out:
        assert extract_answer(row["rejected"]) != extract_answer(row["chosen"]), row
        assert row["rejected"] != row["chosen"]
    assert all(near_prompts[r["prompt"]] == r["chosen"] for r in train)  # the same problems, the same chosen
    # Sampled from the model, not edited from the chosen chain: the texts come from its own distribution.
    assert len({r["rejected"] for r in train}) > 1
    again: list[str] = []
    prepare_builtin(cfg.model_copy(update={"rejected_kind": "on_policy"}), log=again.append)
    assert not any("on-policy" in m for m in again)  # sampled once, then reused


def test_unreachable_target_runs_to_max_steps_with_a_warning(tmp_path):
    cfg = tiny(tmp_path, sft_target_accuracy=1.0, sft_max_steps=15, n_eval_problems=5)
    messages: list[str] = []
    rng_before = torch.random.get_rng_state()
    assets = prepare_builtin(cfg, log=messages.append)
    assert assets.sft_steps == 15 and not assets.reused
    evals = [m for m in messages if "SFT step" in m]
    assert [m.split(":")[0] for m in evals] == ["builtin SFT step 10/15", "builtin SFT step 15/15"]
    assert any(m.startswith("WARNING") and "sft_max_steps" in m for m in messages)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # seeding did not touch the caller's RNG
    assert (assets.root / MARKER).is_file()


def test_stopping_evals_screen_a_quarter_until_they_reach_half_the_target(tmp_path):
    """An untrained model (a few % right) is screened on SFT_SCREEN_PROBLEMS; a target it passes gets all 200."""
    cfg = tiny(tmp_path, n_eval_problems=SFT_EVAL_PROBLEMS + 20, sft_target_accuracy=0.9, sft_max_steps=10)
    messages: list[str] = []
    prepare_builtin(cfg, log=messages.append)
    screened = [m for m in messages if "SFT step" in m]
    assert len(screened) == 1 and f"/{SFT_SCREEN_PROBLEMS} =" in screened[0], screened
    assert any(f"/{cfg.n_eval_problems} =" in m for m in messages if "built in" in m)  # the final figure: all of them
    messages.clear()
    prepare_builtin(cfg.model_copy(update={"sft_target_accuracy": 0.0, "seed": 1}), log=messages.append)
    stopped = [m for m in messages if "SFT step" in m]
    assert len(stopped) == 1 and f"/{SFT_EVAL_PROBLEMS} =" in stopped[0], stopped


def test_sft_step_in_length_groups_has_the_one_padded_batchs_loss_and_gradient(tmp_path):
    """The length-sorted micro-batches' summed loss is the padded batch's token mean (the HF loss), and so are
    the gradients: 2-step and 3-step problems mixed, so the groups are cut to different widths."""
    cfg = tiny(tmp_path)
    tokenizer = arith.build_tokenizer()
    input_ids, labels, lengths = _sft_tensors(arith.generate_task(cfg)["sft"][:16], tokenizer)
    assert len(set(lengths.tolist())) > 2 and int(lengths.max()) == input_ids.shape[1]
    torch.manual_seed(0)
    model = LlamaForCausalLM(arith.model_config(cfg, tokenizer))

    reference = model(input_ids=input_ids, labels=labels).loss  # one batch, padded to its longest row
    reference.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss = _sft_backward(model, input_ids, labels, lengths)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    for param, grad in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(param.grad, grad, rtol=1e-4, atol=1e-6)


def test_sft_steps_do_not_depend_on_the_torch_thread_count(tmp_path):
    """SFT picks its thread count from the machine's load as it goes (_free_cores), so the count must not change
    the model: a few steps of the default-sized model on 1 and on 2 threads give the same weights, bit for bit."""
    cfg = BuiltinTaskConfig()  # the default model's ops and batch
    tokenizer = arith.build_tokenizer()
    input_ids, labels, lengths = _sft_tensors(arith.generate_task(tiny(tmp_path))["sft"][:96], tokenizer)
    trained, threads_before = {}, torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            torch.manual_seed(0)
            model = LlamaForCausalLM(arith.model_config(cfg, tokenizer))
            optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr)
            for batch in torch.arange(len(input_ids)).chunk(3):
                optimizer.zero_grad()
                _sft_backward(model, input_ids[batch], labels[batch], lengths[batch])
                optimizer.step()
            trained[threads] = [p.detach().clone() for p in model.parameters()]
    finally:
        torch.set_num_threads(threads_before)
    assert all(torch.equal(a, b) for a, b in zip(trained[1], trained[2], strict=True))


def test_a_busy_core_is_left_to_the_process_using_it():
    import subprocess
    import sys

    from mdpo_ray.task.sft import _cpu_mark, _free_cores

    busy = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 3\nwhile time.time() < end: pass"])
    try:
        time.sleep(0.3)  # started
        assert _free_cores(_cpu_mark(), wait_s=1.0) <= max(1, os.cpu_count() - 1)
    finally:
        busy.kill()
        busy.wait()
