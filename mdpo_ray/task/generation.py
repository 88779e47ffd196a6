"""Greedy answer accuracy: decode each prompt greedily, read the integer after the last ####, compare.

Used by the SFT warm-up of the built-in task and by the training loop's generation eval, so it knows
nothing of either: a model, a tokenizer and a list of {prompt, answer} dicts.
"""

from __future__ import annotations

import re

import torch

from mdpo_ray.data.pairs import prompt_ids

# GSM8K convention: the final answer follows "####"; allow a sign, thousands commas and a zero fraction.
_ANSWER = re.compile(r"\s*([-+]?\d[\d,]*)(?:\.(\d+))?")


def extract_answer(text: str) -> int | None:
    """The integer after the last `####` in `text`; None if there is none or it is not an integer."""
    _, marker, tail = text.rpartition("####")
    match = _ANSWER.match(tail) if marker else None
    if match is None or (match.group(2) and match.group(2).strip("0")):  # no number, or e.g. "#### 6.5"
        return None
    return int(match.group(1).replace(",", ""))


def _true_answer(answer: int | str) -> int:
    """An int, an integer string, or a GSM8K-style solution ending in "#### N"."""
    if isinstance(answer, int):
        return answer
    parsed = extract_answer(answer) if "####" in answer else extract_answer(f"#### {answer}")
    if parsed is None:
        raise ValueError(f"generation eval answer {answer!r} is not an integer (or a solution ending in '#### N')")
    return parsed


def _left_padded(token_lists: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) input ids and attention mask, padded on the left so every prompt ends where generation starts."""
    width = max(len(ids) for ids in token_lists)
    input_ids = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(token_lists), width), dtype=torch.long)
    for row, ids in enumerate(token_lists):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask


def _stop_ids(model, tokenizer) -> list[int]:
    """Stop on the tokenizer's EOS and on any EOS the model's generation config names (chat models have several)."""
    configured = model.generation_config.eos_token_id
    configured = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
    own = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    return list(dict.fromkeys(own + configured))


def greedy_answer_accuracy(
    model,
    tokenizer,
    problems: list[dict],
    *,
    max_new_tokens: int,
    batch_size: int,
    synced_gpus: bool = False,
) -> tuple[int, int]:
    """(n_correct, n_total) of greedy answers over `problems`, each {"prompt": str, "answer": int | str | None}.

    Prompts are encoded with the tokenizer's special tokens (BOS), left-padded with an attention mask,
    decoded greedily in batches of `batch_size`, and the text after the prompt is scored with
    `extract_answer`. Runs in eval mode under no_grad and restores the model's previous mode.

    Distributed use (FSDP2, synced_gpus=True): `generate` then runs collectives every decoding step, so
    every rank must make the same number of `generate` calls, i.e. hold the same number of problems.
    Pad a short shard with rows whose "answer" is None: they are decoded, keeping the ranks in step,
    but not counted. An empty shard makes no calls and would hang the others.
    """
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token before evaluating")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop_ids = _stop_ids(model, tokenizer)
    was_training = model.training
    model.eval()
    n_correct = n_total = 0
    try:
        with torch.no_grad():
            for start in range(0, len(problems), batch_size):
                batch = problems[start : start + batch_size]
                token_lists = tokenizer([p["prompt"] for p in batch], add_special_tokens=True)["input_ids"]
                input_ids, attention_mask = _left_padded(token_lists, pad_id)
                generated = model.generate(
                    input_ids=input_ids.to(model.device),
                    attention_mask=attention_mask.to(model.device),
                    do_sample=False,
                    max_new_tokens=max_new_tokens,
                    synced_gpus=synced_gpus,
                    pad_token_id=pad_id,
                    eos_token_id=stop_ids,
                )
                completions = tokenizer.batch_decode(generated[:, input_ids.shape[1] :], skip_special_tokens=True)
                for problem, completion in zip(batch, completions):
                    if problem["answer"] is None:  # a padding row (see above)
                        continue
                    n_total += 1
                    n_correct += int(extract_answer(completion) == _true_answer(problem["answer"]))
    finally:
        model.train(was_training)
    return n_correct, n_total


def sample_completions(
    model, tokenizer, prompts: list[str], *, n: int, temperature: float, max_new_tokens: int, batch_size: int,
    seed: int,
) -> list[list[str]]:
    """`n` completions per prompt, sampled at `temperature` from the full distribution (no top-k / top-p).

    Prompts are tokenized as training tokenizes a pair's prompt (data.pairs.prompt_ids: BOS added unless the
    text starts with it, as a rendered chat template often does). Seeded without touching the caller's RNG;
    runs in eval mode under no_grad. Returns, per prompt, its `n` decoded completions (special tokens dropped).
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    out: list[list[str]] = []
    try:
        # manual_seed seeds every device: fork the RNG of the one the model samples on too, not the CPU's alone
        on_gpu = [model.device.index or torch.cuda.current_device()] if model.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=on_gpu):
            torch.manual_seed(seed)
            for start in range(0, len(prompts), batch_size):
                batch = prompts[start : start + batch_size]
                input_ids, attention_mask = _left_padded(prompt_ids(tokenizer, batch), pad_id)
                generated = model.generate(
                    input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
                    do_sample=True, temperature=temperature, top_k=0, top_p=1.0, num_return_sequences=n,
                    max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=_stop_ids(model, tokenizer),
                )
                texts = tokenizer.batch_decode(generated[:, input_ids.shape[1] :], skip_special_tokens=True)
                out += [texts[i : i + n] for i in range(0, len(texts), n)]  # generate keeps each prompt's n together
    finally:
        model.train(was_training)
    return out
