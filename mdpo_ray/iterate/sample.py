"""A round's samples: which training prompts, and the backend that samples completions from the current policy.

The backend is one method, `sample(prompts, n=, temperature=, seed=)`, so a vLLM engine can stand in for the
transformers one on GPUs; a Ray actor holding the policy calls `sample_round` with its own backend.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from mdpo_ray.config import IterateConfig
from mdpo_ray.data.formats import Prompt, render_prompt
from mdpo_ray.iterate.verify import Pairing, Verifier, make_pairs
from mdpo_ray.task.generation import sample_completions


class Generator(Protocol):
    def sample(self, prompts: list[Prompt], *, n: int, temperature: float, seed: int) -> list[list[str]]:
        """`n` completions per prompt (a text, or messages the backend renders with the chat template), in prompt
        order, reproducible from `seed`."""
        ...


@dataclass
class HFGenerator:
    """transformers `generate` on the policy in this process: batched, left-padded, seeded
    (mdpo_ray.task.generation.sample_completions); the caller's RNG is left as it was. Messages are rendered
    and tokenized as the round's pairs will be (data.formats.render_prompt, data.pairs.prompt_ids), so the
    policy samples from exactly the tokens it is then trained on."""

    model: Any
    tokenizer: Any
    max_new_tokens: int
    batch_size: int

    def sample(self, prompts: list[Prompt], *, n: int, temperature: float, seed: int) -> list[list[str]]:
        texts = [render_prompt(self.tokenizer, prompt) for prompt in prompts]
        return sample_completions(self.model, self.tokenizer, texts, n=n, temperature=temperature,
                                  max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, seed=seed)


def round_seed(seed: int, round_index: int) -> int:
    """The seed of round `round_index`'s prompt draw, sampling and pairing: a function of (seed, round), so a
    restarted round draws what the first attempt drew."""
    return seed * 1_000_003 + round_index


def round_rows(rows: Sequence[dict], cfg: IterateConfig, *, seed: int, round_index: int) -> list[dict]:
    """The training rows whose prompts round `round_index` samples (`rows` as data.formats.prompt_rows gives
    them, each with its prompt, a text or messages): one row per distinct prompt (its first),
    then `iterate.prompts_per_round` of them drawn without replacement, a new draw each round, in data order."""
    firsts: dict[str, dict] = {}
    for row in rows:  # messages are told apart by their JSON, which keeps their order
        prompt = row["prompt"]
        firsts.setdefault(prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True), row)
    distinct = list(firsts.values())
    k = cfg.prompts_per_round
    if k is None or k >= len(distinct):
        return distinct
    picked = random.Random(round_seed(seed, round_index)).sample(range(len(distinct)), k)
    return [distinct[i] for i in sorted(picked)]


def sample_round(generator: Generator, rows: Sequence[dict], cfg: IterateConfig, verifier: Verifier, *, seed: int,
                 round_index: int) -> Pairing:
    """Round `round_index`'s pairs: draw its prompts, sample `iterate.samples_per_prompt` completions of each at
    `iterate.temperature`, verify them, pair a correct with an incorrect one per prompt."""
    chosen_rows = round_rows(rows, cfg, seed=seed, round_index=round_index)
    this_round = round_seed(seed, round_index)
    completions = generator.sample([row["prompt"] for row in chosen_rows], n=cfg.samples_per_prompt,
                                   temperature=cfg.temperature, seed=this_round)
    return make_pairs(chosen_rows, completions, verifier, seed=this_round)
