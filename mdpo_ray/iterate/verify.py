"""Verify sampled completions and pair them: the Iterative RPO recipe's labelling step (Pang et al. 2024,
arXiv 2404.19733, §2: a verifier splits each prompt's samples into winners and losers; a pair is one of each).

Pure functions of the samples and the config: no model, no Ray. A verifier is any function(prompt, completion,
row) -> float or bool; a completion counts as correct when its score is at least CORRECT_AT (True is 1).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mdpo_ray.config import IterateConfig, import_function
from mdpo_ray.data.formats import Prompt
from mdpo_ray.task.generation import extract_answer

Verifier = Callable[[Prompt, str, dict], "float | bool"]  # (the row's prompt: a text or messages, completion, row)
CORRECT_AT = 0.5


def final_answer_check(prompt: Prompt, completion: str, row: dict) -> bool:
    """The built-in task's exact check: the integer after the completion's last `####` equals the row's
    `answer` (an int, or text ending in `#### N`), or, without one, the integer after `####` in its `chosen`
    answer (conversational rows: its last message). A completion without a final answer is wrong; a row
    without a true answer is an error."""
    truth, chosen = row.get("answer"), row.get("chosen")
    if isinstance(chosen, list) and chosen and isinstance(chosen[-1], dict):
        chosen = chosen[-1].get("content")
    if isinstance(truth, str):
        truth = extract_answer(truth if "####" in truth else f"#### {truth}")
    elif truth is None and isinstance(chosen, str):
        truth = extract_answer(chosen)
    if not isinstance(truth, int):  # bad data, as DataError and the config say it: a ValueError
        raise ValueError(  # noqa: TRY004
            f"the built-in final-answer check needs each row's `answer` or a chosen answer ending in "
            f"'#### N'; this row has neither (prompt {prompt!r}): set iterate.verifier to your own check")
    return extract_answer(completion) == truth


def load_verifier(cfg: IterateConfig) -> Verifier:
    """iterate.verifier's function, or the built-in final-answer check when it is null."""
    return final_answer_check if cfg.verifier is None else import_function(cfg.verifier)


def score(verifier: Verifier, prompt: str, completion: str, row: dict) -> bool:
    """Whether `completion` is correct: the verifier's result read as a number, at least CORRECT_AT."""
    result = verifier(prompt, completion, row)
    if isinstance(result, bool):
        return result
    try:
        value = float(result)
    except (TypeError, ValueError):
        value = math.nan
    if math.isnan(value):
        name = getattr(verifier, "__qualname__", repr(verifier))
        raise ValueError(f"iterate.verifier {name} returned {result!r} for prompt {prompt!r}: it must return a bool "
                         "or a number (correct when >= 0.5)")
    return value >= CORRECT_AT


@dataclass(frozen=True)
class Pairing:
    """One round's pairs and how the prompts split.

    pairs:               [{prompt, chosen, rejected}], at most one per prompt, in prompt order.
    prompts_all_correct: prompts whose every (non-empty) sample was correct: nothing to reject.
    prompts_all_wrong:   prompts with no correct sample: nothing to choose.
    samples, correct:    completions sampled, and how many were correct (sample accuracy = correct / samples;
                         an empty completion counts as wrong).
    """

    pairs: list[dict]
    prompts_all_correct: int
    prompts_all_wrong: int
    samples: int
    correct: int

    def metrics(self) -> dict[str, float]:
        return {"iterate/pairs": float(len(self.pairs)),
                "iterate/prompts_all_correct": float(self.prompts_all_correct),
                "iterate/prompts_all_wrong": float(self.prompts_all_wrong),
                "iterate/sample_accuracy": self.correct / self.samples if self.samples else 0.0}


def make_pairs(rows: Sequence[dict], completions: Sequence[Sequence[str]], verifier: Verifier, *,
               seed: int) -> Pairing:
    """From each prompt's sampled completions, a (correct, incorrect) pair, each drawn at random among the
    distinct completions of its kind; prompts with no correct or no incorrect completion are counted and skipped.

    rows[i] is the training row of prompt i (its `prompt` is what was sampled from), completions[i] its samples.
    Empty (whitespace-only) completions are neither chosen nor rejected: the data check would drop such a pair.
    Deterministic: the draw for prompt i depends only on (seed, i) and its samples, not on the other prompts.
    """
    if len(rows) != len(completions):
        raise ValueError(f"{len(rows)} rows but {len(completions)} lists of completions")
    pairs: list[dict] = []
    all_correct = all_wrong = n_samples = n_correct = 0
    for index, (row, samples) in enumerate(zip(rows, completions, strict=True)):
        prompt = row["prompt"]
        # Each distinct non-empty text scored once, in sampled order; duplicates still count in the accuracy.
        verdicts = {text: score(verifier, prompt, text, row) for text in dict.fromkeys(samples) if text.strip()}
        right = [text for text, ok in verdicts.items() if ok]
        wrong = [text for text, ok in verdicts.items() if not ok]
        n_samples += len(samples)
        n_correct += sum(verdicts.get(text, False) for text in samples)
        if not right:
            all_wrong += 1
        elif not wrong:
            all_correct += 1
        else:
            rng = random.Random(f"{seed}:{index}")
            pairs.append({"prompt": prompt, "chosen": _answer(prompt, rng.choice(right)),
                          "rejected": _answer(prompt, rng.choice(wrong))})
    return Pairing(pairs, all_correct, all_wrong, n_samples, n_correct)


def _answer(prompt: Prompt, completion: str) -> str | list[dict]:
    """A sampled completion as a pair's answer: text after a text prompt, the assistant's turn after messages
    (so the round's pairs are conversational data, rendered by the chat template the prompt was sampled with)."""
    return completion if isinstance(prompt, str) else [{"role": "assistant", "content": completion}]
