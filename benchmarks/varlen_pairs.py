"""Variable-length preference pairs for throughput benchmarks, long-tailed like UltraFeedback's.

    python benchmarks/varlen_pairs.py out.jsonl --pairs 512   # standard-format JSONL, its lengths, and what
                                                              # padded, grouped and packed batches compute

Real preference sets are long-tailed: in UltraFeedback and HH, prompts run from a few tokens to over a
thousand, and a pair's two answers often differ in length several times over. The fixed-length
benchmark pairs (about 206 tokens a sequence) hide what padding costs on such data. Lengths here, in
tokens of the built-in character tokenizer (mdpo_ray.task.arith.build_tokenizer: one token a
character, plus BOS before the prompt and EOS after each completion):

    prompt     ~ LogNormal(mu = ln 150, sigma = 1.0), rounded, clipped to [20, 1500]   (median 150)
    completion ~ LogNormal(mu = ln 250, sigma = 0.8), rounded, clipped to [10, 1000]   (median 250)

drawn independently for the chosen and the rejected answer. A completion is further cut so that prompt
+ completion fits `--max-length` (2048 by default; at most 1500 + 1000 = 2500 before the cut; below
1510 the prompt is cut too, to leave 10), so that neither mdpo-ray nor TRL truncates anything and both
train on the same tokens. The texts are random
characters of the tokenizer's alphabet: only the lengths matter to a randomly initialised model.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
from pathlib import Path

PROMPT = (math.log(150), 1.0, 20, 1500)  # (mu, sigma, low, high) of the token count
COMPLETION = (math.log(250), 0.8, 10, 1000)
ALPHABET = "0123456789+-=;.#:QA"  # the character tokenizer's, less the space (no blank completion)


def _draw(rng: random.Random, spec: tuple[float, float, int, int]) -> int:
    mu, sigma, low, high = spec
    return min(high, max(low, round(rng.lognormvariate(mu, sigma))))


def pair_lengths(n: int, *, seed: int = 0, max_length: int = 2048) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) token counts of n pairs: prompt with its BOS, completions with their EOS."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = min(_draw(rng, PROMPT), max_length - COMPLETION[2])  # room for the shortest completion
        room = max_length - prompt
        out.append((prompt, min(_draw(rng, COMPLETION), room), min(_draw(rng, COMPLETION), room)))
    return out


def pairs(n: int, *, seed: int = 0, max_length: int = 2048) -> list[dict[str, str]]:
    """n standard-format rows {prompt, chosen, rejected} whose token counts are pair_lengths(n, ...)."""
    rng = random.Random(seed + 1)
    text = lambda tokens: "".join(rng.choices(ALPHABET, k=tokens - 1))  # BOS / EOS are the tokenizer's
    return [{"prompt": text(p), "chosen": text(c), "rejected": text(r)}
            for p, c, r in pair_lengths(n, seed=seed, max_length=max_length)]


def summary(lengths: list[tuple[int, int, int]]) -> str:
    def spread(values: list[int]) -> str:
        q = statistics.quantiles(values, n=20, method="inclusive")
        median = statistics.median(values)
        return f"min {min(values)}, p5 {q[0]:.0f}, median {median:.0f}, p95 {q[-1]:.0f}, max {max(values)}"

    prompts = [p for p, _, _ in lengths]
    completions = [c for _, c, _ in lengths] + [r for _, _, r in lengths]
    sequences = [p + c for p, c, _ in lengths] + [p + r for p, _, r in lengths]
    ratio = statistics.median(max(c, r) / min(c, r) for _, c, r in lengths)
    return (f"{len(lengths)} pairs; tokens of a prompt: {spread(prompts)}; of a completion: {spread(completions)}; "
            f"of a sequence: {spread(sequences)}, mean {statistics.mean(sequences):.0f}; longer/shorter answer of a "
            f"pair: median {ratio:.2f}x")


def layouts(lengths: list[tuple[int, int, int]], *, batch_size: int, micro_batch_size: int,
            steps: int) -> dict[str, tuple[float, float]]:
    """What each batch layout computes over the first `steps` steps of the seeded order, one worker:
    {layout: (real tokens / token positions computed, sum of rows x width^2 relative to padded's)}.
    The second is what sdpa and eager attention cost, dense over a row whatever its mask."""
    from mdpo_ray.data.pairs import collate_pairs, real_tokens
    from mdpo_ray.training.schedule import micro_batches

    rows = [{"prompt_input_ids": [1] * p, "chosen_input_ids": [2] * c, "rejected_input_ids": [3] * r}
            for p, c, r in lengths]
    longer = [p + max(c, r) for p, c, r in lengths]
    out = {}
    for name, grouped, packed in (("padded", False, False), ("grouped", True, False), ("packed", False, True),
                                  ("grouped+packed", True, True)):
        real = computed = attention = 0
        for step in range(1, steps + 1):
            for micro in micro_batches(step, n=len(rows), batch_size=batch_size, micro_batch_size=micro_batch_size,
                                       seed=0, rank=0, world=1, lengths=longer if grouped else None):
                batch = collate_pairs([rows[i] for i in micro], 0, padding_free=packed)
                n_rows, width = batch["input_ids"].shape
                real, computed, attention = real + real_tokens(batch), computed + n_rows * width, \
                    attention + n_rows * width**2
        out[name] = (real / computed, attention)
    return {name: (share, attention / out["padded"][1]) for name, (share, attention) in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="the JSONL file to write")
    p.add_argument("--pairs", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-length", type=int, default=2048, help="prompt + completion tokens, as data.max_length")
    p.add_argument("--batch", type=int, default=8, help="pairs a step, for the layout figures")
    p.add_argument("--micro-batch", type=int, nargs="+", default=[2, 8], help="pairs a forward, for the layout figures")
    args = p.parse_args()
    rows = pairs(args.pairs, seed=args.seed, max_length=args.max_length)
    args.out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    lengths = pair_lengths(args.pairs, seed=args.seed, max_length=args.max_length)
    print(f"{args.out}: " + summary(lengths))
    steps = max(1, args.pairs // args.batch)  # one epoch
    for micro in args.micro_batch:
        figures = layouts(lengths, batch_size=args.batch, micro_batch_size=micro, steps=steps)
        print(f"batch {args.batch}, micro-batch {micro}, {steps} steps: real tokens / positions computed (attention "
              "cost, rows x width^2, against padded): " + "; ".join(
                  f"{name} {share:.1%} ({attention:.2f}x)" for name, (share, attention) in figures.items()))


if __name__ == "__main__":
    main()
