"""The built-in arithmetic preference task: problems, chosen/rejected chains, tokenizer, model config.

A problem is 2-3 steps of + / - on operands 0-99 with every intermediate result in 0-199:

    prompt    "Q: 97-53-5-33= A:"
    chosen    " 97-53=44; 44-5=39; 39-33=6. #### 6"      (<= 44 characters; data code appends EOS)

Rejected answers come in two kinds:
  near_miss    one digit of one non-final intermediate result is changed where the step states it, nothing
               else: the chain is inconsistent, the final answer is still right, the edit distance is 1
               (the "Smaug" failure case, where DPO lowers the chosen log-prob: arXiv:2402.13228);
  wrong_final  one digit of one step's result is changed and carried through the later steps, so the
               chain reads consistently from there on but the answer after #### is wrong;
  on_policy    sampled from the SFT model itself and judged wrong (builtin.py fills these in: they need
               the trained model), where preference learning should beat plain SFT if it does at all.

Pure Python apart from the tokenizer and model config; no training here (see sft.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, PreTrainedTokenizerFast

from mdpo_ray.config import BuiltinTaskConfig

MAX_OPERAND = 99
MAX_VALUE = 199  # every intermediate result stays in 0..MAX_VALUE
MAX_COMPLETION_CHARS = 44  # " 99+99=198; 198-10=188; 188-10=178. #### 178": 3-digit values everywhere
MAX_NEW_TOKENS = MAX_COMPLETION_CHARS + 1  # + EOS: enough for greedy decoding of any chosen answer

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
CHARACTERS = "0123456789+-=;.#:QA "  # every character a prompt or completion of this task uses


@dataclass(frozen=True)
class Problem:
    operands: tuple[int, ...]  # (n_steps + 1,)
    operators: tuple[str, ...]  # (n_steps,), each "+" or "-"

    def results(self) -> list[int]:
        """The running value after each step."""
        value, out = self.operands[0], []
        for op, operand in zip(self.operators, self.operands[1:]):
            value = _apply(value, op, operand)
            out.append(value)
        return out

    @property
    def answer(self) -> int:
        return self.results()[-1]

    @property
    def prompt(self) -> str:
        expression = str(self.operands[0]) + "".join(f"{op}{b}" for op, b in zip(self.operators, self.operands[1:]))
        return f"Q: {expression}= A:"

    def chain(self, results: list[int] | None = None, lefts: list[int] | None = None) -> str:
        """The worked completion; `results` / `lefts` override what each step states (for rejected answers)."""
        results = self.results() if results is None else results
        lefts = [self.operands[0], *results[:-1]] if lefts is None else lefts
        steps = [f"{a}{op}{b}={r}" for a, op, b, r in zip(lefts, self.operators, self.operands[1:], results)]
        return f" {'; '.join(steps)}. #### {results[-1]}"


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b


def sample_problem(rng: random.Random) -> Problem:
    n_steps = rng.choice((2, 3))
    value = rng.randint(0, MAX_OPERAND)
    operands, operators = [value], []
    for _ in range(n_steps):
        op = rng.choice("+-")
        # Draw the operand from the range that keeps the result in 0..MAX_VALUE (never empty: value <= 199).
        high = min(MAX_OPERAND, MAX_VALUE - value) if op == "+" else min(MAX_OPERAND, value)
        operand = rng.randint(0, high)
        value = _apply(value, op, operand)
        operands.append(operand)
        operators.append(op)
    return Problem(tuple(operands), tuple(operators))


def _one_digit_edits(value: int) -> list[int]:
    """Numbers that differ from `value` in exactly one printed digit, in range and without a leading zero."""
    text, out = str(value), []
    for pos, old in enumerate(text):
        for new in "0123456789":
            edited = text[:pos] + new + text[pos + 1 :]
            if new != old and not (pos == 0 and new == "0" and len(text) > 1) and int(edited) <= MAX_VALUE:
                out.append(int(edited))
    return out


def near_miss(problem: Problem, rng: random.Random) -> str:
    """Change one digit of one non-final result where its step states it; the next step still reads the true value."""
    results = problem.results()
    step = rng.randrange(len(results) - 1)  # 2-step problems: always the first step
    lefts = [problem.operands[0], *results[:-1]]  # the true values, so only one character changes
    corrupted = list(results)
    corrupted[step] = rng.choice(_one_digit_edits(results[step]))
    return problem.chain(corrupted, lefts)


def wrong_final(problem: Problem, rng: random.Random) -> str:
    """Change one digit of one step's result and redo the later steps from it, so the final answer is wrong."""
    results = problem.results()
    candidates = []
    for step in range(len(results)):
        for edited in _one_digit_edits(results[step]):
            propagated = [*results[:step], edited]
            for op, operand in zip(problem.operators[step + 1 :], problem.operands[step + 2 :]):
                propagated.append(_apply(propagated[-1], op, operand))
            if all(0 <= v <= MAX_VALUE for v in propagated):  # keep the wrong chain as plausible as the right one
                candidates.append(propagated)
    # Never empty: the last step alone has in-range one-digit edits and nothing to propagate.
    return problem.chain(rng.choice(candidates))


REJECTERS = {"near_miss": near_miss, "wrong_final": wrong_final}


def generate_task(cfg: BuiltinTaskConfig) -> dict[str, list[dict]]:
    """Deterministic, disjoint splits from `cfg.seed`.

    Returns {"sft": [{prompt, chosen}], "pairs": [{prompt, chosen, rejected}],
    "eval_pairs": [{prompt, chosen, rejected}], "eval_problems": [{prompt, answer}]}.
    Problems are distinct by (operands, operators) across all splits. The held-out splits are drawn
    first, so changing n_sft_problems or n_pref_pairs leaves them unchanged. Rejected answers come from
    their own random stream, so every rejected kind poses the same problems (and one SFT model serves
    them all); for on_policy the pair rows carry no "rejected" yet.
    """
    rng = random.Random(cfg.seed)
    reject_rng = random.Random(f"{cfg.seed}:rejected")
    sizes = {
        "eval_problems": cfg.n_eval_problems,
        "eval_pairs": cfg.n_eval_pairs,
        "pairs": cfg.n_pref_pairs,
        "sft": cfg.n_sft_problems,
    }
    seen: set[Problem] = set()
    splits: dict[str, list[dict]] = {}
    reject = REJECTERS.get(cfg.rejected_kind)
    for name, size in sizes.items():
        rows: list[dict] = []
        while len(rows) < size:
            problem = sample_problem(rng)
            if problem in seen:
                continue
            seen.add(problem)
            if name == "eval_problems":
                rows.append({"prompt": problem.prompt, "answer": problem.answer})
            elif name == "sft" or reject is None:
                rows.append({"prompt": problem.prompt, "chosen": problem.chain()})
            else:
                rows.append({"prompt": problem.prompt, "chosen": problem.chain(), "rejected": reject(problem, reject_rng)})
        splits[name] = rows
    return {name: splits[name] for name in ("sft", "pairs", "eval_pairs", "eval_problems")}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level: one token per character of CHARACTERS, plus pad/bos/eos; built offline.

    Encoding with add_special_tokens=True prepends BOS (EOS is the data code's to append); decode()
    joins characters with nothing in between, so decode(encode(text)) == text.
    """
    vocab = {token: i for i, token in enumerate([PAD, BOS, EOS, *CHARACTERS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))  # an unknown character is an error
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # every character its own word
    backend.decoder = decoders.Fuse()  # no spaces between characters
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        model_max_length=128,
        clean_up_tokenization_spaces=False,
    )


def model_config(cfg: BuiltinTaskConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """A tiny Llama for the task (2 layers: ~0.5 M parameters), tied embeddings."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=128,  # prompt <= 18 + completion <= 44 + BOS/EOS: 64 tokens at most
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
