"""Padded, length-grouped and packed batches on variable-length pairs: one training step's compute each.

    python benchmarks/varlen_step.py                         # vs_trl.py's model, 8 pairs a step, ~5 min on 2 cores
    python benchmarks/varlen_step.py --micro-batch 2 --rounds 5

Each round runs every layout once on the same global batch of benchmarks/varlen_pairs.py's pairs (the
step's micro-batches as the training loop cuts them, mdpo_ray.training.schedule.micro_batches):
per micro-batch the policy's forward and backward and a resident reference's forward, through
mdpo_ray.training.logps.concatenated_logps as the loop calls it. Layouts alternate within a round, so
a shared machine's drift hits them alike; the median round is reported, as wall seconds and as CPU
seconds of this process (steadier than wall time when other work shares the cores), with real tokens
(padding not counted) per second of each. It checks that the layouts' losses agree.

vs_trl.py --varlen measures whole runs against TRL; this isolates the step, quickly.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import varlen_pairs  # benchmarks/, this script's own folder
from transformers import LlamaConfig, LlamaForCausalLM

from mdpo_ray.data.pairs import collate_pairs, real_tokens
from mdpo_ray.training.logps import concatenated_logps, device_batch
from mdpo_ray.training.losses import LOSSES
from mdpo_ray.training.schedule import micro_batches

LAYOUTS = {"padded": (False, False), "grouped": (True, False), "packed": (False, True),
           "grouped+packed": (True, True)}  # name: (group_by_length, padding_free)


def step(policy, reference, rows, micros, packed: bool) -> tuple[float, int]:
    """(loss, real tokens) of one step: forward and backward of each micro-batch, gradients summed."""
    total, tokens, cpu = 0.0, 0, torch.device("cpu")
    for micro in micros:
        host = collate_pairs([rows[i] for i in micro], 0, padding_free=packed)
        tokens += real_tokens(host)
        batch = device_batch(host, cpu)
        chosen, rejected = concatenated_logps(policy, batch)
        with torch.no_grad():
            ref_chosen, ref_rejected = concatenated_logps(reference, batch)
        loss = LOSSES["minor_dpo"](chosen, rejected, ref_chosen, ref_rejected, beta=0.1, reject_threshold=0.0,
                                   reject_weight=1.0, dpop_lambda=50.0, label_smoothing=0.0).losses.sum()
        loss.backward()
        total += float(loss.detach())
    policy.zero_grad(set_to_none=True)
    return total / sum(map(len, micros)), tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32_000)
    p.add_argument("--batch", type=int, default=8, help="pairs a step")
    p.add_argument("--micro-batch", type=int, default=None, help="pairs a forward (default: the whole batch)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    micro_size = args.micro_batch or args.batch
    if micro_size == args.batch:  # grouping a single forward changes nothing
        args.layouts = [name for name in args.layouts if not LAYOUTS[name][0]]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=args.hidden // 64, intermediate_size=int(args.hidden * 2.6875),
                         max_position_embeddings=args.max_length, tie_word_embeddings=False)
    policy, reference = LlamaForCausalLM(config), LlamaForCausalLM(config).requires_grad_(False)
    lengths = varlen_pairs.pair_lengths(args.batch * 4, max_length=args.max_length)
    gen = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, args.vocab, (n,), generator=gen).tolist()
    rows = [{"prompt_input_ids": ids(pr), "chosen_input_ids": ids(c), "rejected_input_ids": ids(r)}
            for pr, c, r in lengths]
    longer = [pr + max(c, r) for pr, c, r in lengths]
    print(f"random Llama, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; {args.threads} threads; "
          f"a step of {args.batch} pairs in forwards of {micro_size}: "
          + varlen_pairs.summary(lengths[: args.batch]), flush=True)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in args.layouts}
    losses, tokens = {}, 0
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for name in args.layouts:
            grouped, packed = LAYOUTS[name]
            micros = micro_batches(1, n=args.batch, batch_size=args.batch, micro_batch_size=micro_size, seed=0,
                                   rank=0, world=1, lengths=longer if grouped else None)
            wall, cpu = time.perf_counter(), time.process_time()
            losses[name], tokens = step(policy, reference, rows, micros, packed)
            if round_:
                times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    base_wall = statistics.median(w for w, _ in times[args.layouts[0]])
    base_cpu = statistics.median(c for _, c in times[args.layouts[0]])
    for name in args.layouts:
        wall, cpu = statistics.median(w for w, _ in times[name]), statistics.median(c for _, c in times[name])
        print(f"{name:15s} {wall:6.2f} s wall ({tokens / wall:6.0f} real tokens/s, {base_wall / wall:.2f}x), "
              f"{cpu:6.2f} CPU s ({tokens / cpu:6.0f} real tokens per CPU s, {base_cpu / cpu:.2f}x); "
              f"loss {losses[name]:.6f}")
    spread = max(losses.values()) - min(losses.values())
    print(f"losses agree to {spread:.1e}" + ("" if spread < 1e-4 else "  <-- NOT EXACT"))


if __name__ == "__main__":
    main()
