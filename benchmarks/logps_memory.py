"""Peak memory of per-sequence log-probs: a full fp32 log-softmax vs mdpo_ray.training.logps (chunked fp32).

Each variant runs in a fresh subprocess that first allocates the (2B, T, V) logits in the model dtype
(which a causal LM forward produces either way), then computes the completion log-probs, as the
reference does (forward only), or as the policy does (forward and backward, ending with the logits'
gradient, the same size as the logits, which every variant must produce); the figure is the peak RSS
growth beyond the logits. Run:

    python benchmarks/logps_memory.py                    # vocab 32k and 128k, 2B=16, T=256, bf16 logits
    python benchmarks/logps_memory.py --vocab 32000 --seq 512 --dtype float32
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def _measure(variant: str, vocab: int, seq: int, rows: int, dtype: str, backward: bool) -> dict:
    import torch

    from mdpo_ray.training.logps import sequence_logps

    torch.manual_seed(0)
    logits = torch.randn(rows, seq, vocab, dtype=getattr(torch, dtype)).requires_grad_(backward)
    input_ids = torch.randint(0, vocab, (rows, seq))
    mask = torch.ones(rows, seq, dtype=torch.bool)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    if variant == "full_fp32_log_softmax":
        full = torch.log_softmax(logits.float(), dim=-1)  # the textbook way: a (2B, T, V) fp32 tensor
        out = (full[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1) * mask[:, 1:]).sum(-1)
    else:
        out = sequence_logps(logits, input_ids, mask)
    if backward:
        out.sum().backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": variant, "extra_peak_mib": (after - before) / 1024, "checksum": float(out.sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32_000, 128_000])
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rows", type=int, default=16, help="2B: chosen + rejected sequences")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--child", nargs=3, metavar=("VARIANT", "VOCAB", "PASS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        variant, vocab, passes = args.child
        print(json.dumps(_measure(variant, int(vocab), args.seq, args.rows, args.dtype, passes == "backward")))
        return
    print(f"(2B, T) = ({args.rows}, {args.seq}), logits in {args.dtype}; extra peak RSS beyond the logits")
    print(f"{'vocab':>8}  {'pass':>16}  {'logits MiB':>10}  {'full fp32 log-softmax':>22}  {'mdpo_ray.training.logps':>15}  "
          f"{'ratio':>6}")
    for vocab in args.vocab:
        for passes in ("forward", "backward"):
            results = {}
            for variant in ("full_fp32_log_softmax", "mdpo_ray_chunked"):
                proc = subprocess.run([sys.executable, __file__, "--seq", str(args.seq), "--rows", str(args.rows),
                                       "--dtype", args.dtype, "--child", variant, str(vocab), passes],
                                      capture_output=True, text=True, check=True)
                results[variant] = json.loads(proc.stdout)
            full, ours = results["full_fp32_log_softmax"], results["mdpo_ray_chunked"]
            assert abs(full["checksum"] - ours["checksum"]) <= 1e-3 * abs(full["checksum"]), (full, ours)
            logits_mib = args.rows * args.seq * vocab * (2 if args.dtype == "bfloat16" else 4) / 2**20
            label = "forward" if passes == "forward" else "forward+backward"
            print(f"{vocab:>8}  {label:>16}  {logits_mib:>10.0f}  {full['extra_peak_mib']:>18.0f} MiB  "
                  f"{ours['extra_peak_mib']:>11.0f} MiB  "
                  f"{full['extra_peak_mib'] / max(ours['extra_peak_mib'], 1):>5.1f}x")


if __name__ == "__main__":
    main()
