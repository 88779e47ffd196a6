"""Padded, length-grouped and packed batches on variable-length pairs: one training step's compute each.

    python benchmarks/varlen_step.py                         # vs_trl.py's model, 8 pairs a step, ~5 min on 2 cores
    python benchmarks/varlen_step.py --micro-batch 2 --rounds 5
    python benchmarks/varlen_step.py --device cuda --hidden 2048 --layers 16 --batch 32 --micro-batch 8 --bf16

Each round runs every layout once on the same global batch of benchmarks/varlen_pairs.py's pairs (the
step's micro-batches as the training loop cuts them, mdpo_ray.training.schedule.micro_batches):
per micro-batch the policy's forward and backward and a resident reference's forward, through
mdpo_ray.training.logps.concatenated_logps as the loop calls it. The packed layouts run as a packed run
does: the models go through mdpo_ray.training.logps.prepare_packing (an sdpa model then attends sequence by
sequence, mdpo_ray.training.attention) and a forward's sequences are one row; the padded layouts run on
copies left as loaded. Layouts alternate within a round, so a shared machine's drift hits them alike; the
median round is reported, as wall seconds and as CPU seconds of this process (steadier than wall time when
other work shares the cores; on a GPU, the host's), with real tokens (padding not counted) per second of
each, and on a GPU each layout's peak allocated memory (which holds both copies of the models: compare the
layouts' differences, not the figures with a run's). It exits 1 unless every layout gives each pair the
padded layout's log-probs (relative; fp32: to 1e-5, --bf16 autocast: to 1e-2).

vs_trl.py --varlen measures whole runs against TRL; this isolates the step, quickly.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time

import torch
import varlen_pairs  # benchmarks/, this script's own folder
from transformers import LlamaConfig, LlamaForCausalLM

from mdpo_ray.data.pairs import collate_pairs, real_tokens
from mdpo_ray.training.attention import by_sequence
from mdpo_ray.training.logps import concatenated_logps, device_batch, prepare_packing
from mdpo_ray.training.losses import LOSSES
from mdpo_ray.training.schedule import micro_batches

LAYOUTS = {"padded": (False, False), "grouped": (True, False), "packed": (False, True),
           "grouped+packed": (True, True)}  # name: (group_by_length, padding_free)


def step(policy, reference, rows, micros, packed: bool, device: torch.device, bf16: bool
         ) -> tuple[float, int, torch.Tensor]:
    """(loss, real tokens, each pair's policy log-probs (n, 2): chosen, rejected) of one step: forward and backward
    of each micro-batch, gradients summed."""
    total, tokens, pair_logps = 0.0, 0, torch.zeros(len(rows), 2, dtype=torch.float64)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    for micro in micros:
        host = collate_pairs([rows[i] for i in micro], 0, padding_free=packed,
                             one_row=packed and by_sequence(policy))  # as the training loop collates
        tokens += real_tokens(host)
        batch = device_batch(host, device)
        with autocast:
            chosen, rejected = concatenated_logps(policy, batch)
            with torch.no_grad():
                ref_chosen, ref_rejected = concatenated_logps(reference, batch)
        loss = LOSSES["minor_dpo"](chosen.float(), rejected.float(), ref_chosen.float(), ref_rejected.float(),
                                   beta=0.1, reject_threshold=0.0, reject_weight=1.0, dpop_lambda=50.0,
                                   label_smoothing=0.0).losses.sum()
        loss.backward()
        total += float(loss.detach())
        pair_logps[micro] = torch.stack([chosen, rejected], 1).detach().double().cpu()
    policy.zero_grad(set_to_none=True)
    return total / sum(map(len, micros)), tokens, pair_logps


def _parser() -> argparse.ArgumentParser:
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
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 weights), as scaling.mixed_precision=bf16")
    return p


def main() -> None:
    args = _parser().parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    micro_size = args.micro_batch or args.batch
    if micro_size == args.batch:  # grouping a single forward changes nothing
        args.layouts = [name for name in args.layouts if not LAYOUTS[name][0]]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=args.hidden // 64, intermediate_size=int(args.hidden * 2.6875),
                         max_position_embeddings=args.max_length, tie_word_embeddings=False)
    policy, reference = LlamaForCausalLM(config).to(device), LlamaForCausalLM(config).requires_grad_(False).to(device)
    models = {False: (policy, reference), True: (copy.deepcopy(policy), copy.deepcopy(reference))}
    for model in models[True]:  # the packed layouts' copies, made ready as a packed run makes them
        if (problem := prepare_packing(model, device)) is not None:
            raise SystemExit(f"this model cannot run packed rows: {problem}")
    lengths = varlen_pairs.pair_lengths(args.batch * 4, max_length=args.max_length)
    gen = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, args.vocab, (n,), generator=gen).tolist()
    rows = [{"prompt_input_ids": ids(pr), "chosen_input_ids": ids(c), "rejected_input_ids": ids(r)}
            for pr, c, r in lengths]
    longer = [pr + max(c, r) for pr, c, r in lengths]
    print(f"random Llama, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; {args.device}"
          f"{' bf16 autocast' if args.bf16 else ' fp32'}; {args.threads} threads; packed rows attend "
          f"{'sequence by sequence' if by_sequence(models[True][0]) else 'under a block-diagonal mask'}; "
          f"a step of {args.batch} pairs in forwards of {micro_size}: "
          + varlen_pairs.summary(lengths[: args.batch]), flush=True)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in args.layouts}
    losses, tokens, peaks, pair_logps = {}, 0, {}, {}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for name in args.layouts:
            grouped, packed = LAYOUTS[name]
            micros = micro_batches(1, n=args.batch, batch_size=args.batch, micro_batch_size=micro_size, seed=0,
                                   rank=0, world=1, lengths=longer if grouped else None)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            wall, cpu = time.perf_counter(), time.process_time()
            losses[name], tokens, pair_logps[name] = step(*models[packed], rows[: args.batch], micros, packed, device,
                                                          args.bf16)
            if device.type == "cuda":
                torch.cuda.synchronize()  # float(loss) waited for the forwards, not for the last backward
                peaks[name] = torch.cuda.max_memory_allocated()
            if round_:
                times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    base_wall = statistics.median(w for w, _ in times[args.layouts[0]])
    base_cpu = statistics.median(c for _, c in times[args.layouts[0]])
    for name in args.layouts:
        wall, cpu = statistics.median(w for w, _ in times[name]), statistics.median(c for _, c in times[name])
        print(f"{name:15s} {wall:6.2f} s wall ({tokens / wall:6.0f} real tokens/s, {base_wall / wall:.2f}x), "
              f"{cpu:6.2f} CPU s ({tokens / cpu:6.0f} real tokens per CPU s, {base_cpu / cpu:.2f}x); "
              + (f"peak {peaks[name] / 2**30:.2f} GiB; " if name in peaks else "") + f"loss {losses[name]:.6f}")
    # Each pair's log-probs against the padded layout's, relative: a sum over up to 2,048 tokens carries the
    # float rounding of its many terms (different kernels and shapes round differently on a GPU), while a sequence
    # that saw its neighbours' tokens would be off by far more than these tolerances.
    padded = pair_logps[args.layouts[0]]
    error = max(float(((logps - padded).abs() / padded.abs()).max()) for logps in pair_logps.values())
    tolerance = 1e-2 if args.bf16 else 1e-5
    print(f"per-pair log-probs agree with {args.layouts[0]}'s to {error:.1e} relative; losses to "
          f"{max(losses.values()) - min(losses.values()):.1e}"
          + ("" if error < tolerance else f"  <-- NOT EXACT (more than {tolerance:g})"))
    if error >= tolerance:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
