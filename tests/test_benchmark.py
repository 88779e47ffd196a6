"""The benchmark (benchmarks/vs_trl.py) still runs against the code it measures: its in-process path
calls the training loop, and its head-on-every-position config reaches into mdpo_ray.training.logps, so a
change there can break it with nothing else failing (as a change of the hook's signature once did).
TRL is only in the `bench` extra, so TRL's configs are not run here."""

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mdpo_ray import cluster

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--hidden", "32", "--layers", "1", "--heads", "2", "--intermediate", "64", "--vocab", "500", "--pairs", "16",
        "--batch", "4", "--shots", "0", "--window", "1", "--warmup", "1", "--windows", "2", "--matmul-size", "256"]


@pytest.mark.slow
def test_the_benchmark_runs_the_in_process_step_with_the_head_on_every_position_and_checkpointed(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "vs_trl.py"), "--configs", "minor_dpo_full_logits",
                           "minor_dpo_checkpointing",
                           *TINY, "--workdir", str(tmp_path / "work"), "--json", str(out)],
                          capture_output=True, text=True, timeout=300, check=False,
                          env={k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"} | {"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    written = json.loads(out.read_text())
    # Both sides run with the allocator settings mdpo-ray's CPU-only local instance gives its workers.
    assert written["GLIBC_TUNABLES"] == cluster.CPU_ALLOCATOR_ENV["GLIBC_TUNABLES"]
    results = written["results"]  # a config that fails is left out of the table, not fatal
    for name in ("minor_dpo_full_logits", "minor_dpo_checkpointing"):
        assert name in results, (proc.stdout + proc.stderr)[-3000:]
        result = results[name]
        assert len(result["windows"]) == 2 and all(w > 0 for w in result["windows"]), result


@pytest.mark.slow
def test_the_step_bound_profile_splits_the_step_by_part_and_its_hfu_into_matmul_share_and_rate(tmp_path):
    """benchmarks/step_bound.py on a tiny model: the parts of the profiled step add up to it, the matmuls are one
    of them with FLOPs counted, and HFU is printed as their share times their rate."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_bound.py"), "--hidden", "32", "--layers", "1",
                           "--heads", "2", "--intermediate", "64", "--vocab", "500", "--batch", "4", "--shots", "0",
                           "--warmup-steps", "3", "--steps", "2", "--matmul-size", "256"],
                          capture_output=True, text=True, timeout=300, check=False,
                          env=os.environ | {"PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)})
    out = proc.stdout
    assert proc.returncode == 0, (out + proc.stderr)[-3000:]
    table = out.split("part of the profiled steps", 1)[1].split("all ops", 1)[0]
    shares = {line[:52].strip(): float(line.split()[-1].rstrip("%")) for line in table.splitlines()[1:] if line.strip()}
    assert "matmul" in shares and abs(sum(shares.values()) - 100) <= len(shares), shares  # each share rounded
    flops = float(re.search(r"matmul FLOPs per step: ([\d.]+) GFLOP", out).group(1))
    share, inside = re.search(r"= matmul share of the step (\d+)% x matmul rate inside the step ([\d.]+)", out).groups()
    assert flops > 0 and abs(int(share) - shares["matmul"]) <= 1 and float(inside) > 0, out


def test_the_variable_length_pairs_have_the_stated_long_tailed_lengths_and_tokenize_to_them(tmp_path, monkeypatch):
    """benchmarks/varlen_pairs.py: clipped log-normal lengths (prompt median 150 in [20, 1500], completion
    median 250 in [10, 1000], each pair fitting max_length), which mdpo-ray's tokenization reproduces exactly,
    so the benchmark's tokens per pair are the ones trained on."""
    import statistics

    from mdpo_ray.data.pairs import load_pairs
    from mdpo_ray.task.arith import build_tokenizer

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import varlen_pairs

    lengths = varlen_pairs.pair_lengths(2000, max_length=1024)
    prompts = [p for p, _, _ in lengths]
    completions = [c for _, c, _ in lengths] + [r for _, _, r in lengths]
    assert 20 <= min(prompts) and max(prompts) <= 1014 and 130 <= statistics.median(prompts) <= 170
    assert 10 <= min(completions) and 220 <= statistics.median(completions) <= 280
    assert max(p + max(c, r) for p, c, r in lengths) <= 1024  # nothing to truncate
    assert sum(p > 800 for p in prompts) > 20  # a long tail, not a bell
    assert statistics.median(max(c, r) / min(c, r) for _, c, r in lengths) > 1.5  # chosen, rejected independent

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in varlen_pairs.pairs(40, seed=3, max_length=1024)))
    pairs, stats = load_pairs(str(path), split="train", tokenizer=build_tokenizer(), max_length=1024)
    assert stats.n_kept == 40 and stats.n_truncated == 0
    tokenized = [(len(p), len(c), len(r)) for p, c, r in
                 zip(pairs["prompt_input_ids"], pairs["chosen_input_ids"], pairs["rejected_input_ids"], strict=True)]
    assert tokenized == varlen_pairs.pair_lengths(40, seed=3, max_length=1024)
    # The benchmark's layout figures: a padded forward of 8 pairs is mostly padding, a packed one is not.
    figures = varlen_pairs.layouts(lengths[:64], batch_size=8, micro_batch_size=8, steps=8)
    assert figures["padded"][0] < 0.6 and figures["packed"][0] > 0.85 and figures["packed"][1] < 0.6


def test_the_step_benchmark_packs_as_a_packed_run_does_and_stops_when_the_layouts_losses_differ(monkeypatch, capsys):
    """benchmarks/varlen_step.py (the step on variable-length pairs, the first GPU check of packing): its packed
    layouts run models switched to attention by sequence, one row a forward, and it exits 1 when a layout's
    per-pair log-probs are not the padded one's."""
    import torch

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import varlen_step

    argv = ["varlen_step.py", "--hidden", "64", "--layers", "2", "--vocab", "500", "--batch", "4", "--micro-batch",
            "2", "--rounds", "1", "--max-length", "256", "--threads", str(torch.get_num_threads())]
    monkeypatch.setattr(sys, "argv", argv)
    varlen_step.main()
    out = capsys.readouterr().out
    assert "cpu fp32" in out and "packed rows attend sequence by sequence" in out, out
    for name in varlen_step.LAYOUTS:
        assert re.search(rf"^{re.escape(name)} +[\d.]+ s wall", out, re.MULTILINE), (name, out)
    assert "per-pair log-probs agree with padded's to" in out and "NOT EXACT" not in out, out

    step = varlen_step.step

    def off_when_packed(*args):  # as a packed forward that let sequences see their neighbours would be
        loss, tokens, logps = step(*args)
        return loss, tokens, logps * (1 + 1e-3 * args[4])

    monkeypatch.setattr(varlen_step, "step", off_when_packed)
    with pytest.raises(SystemExit, match="1"):
        varlen_step.main()
    assert "NOT EXACT" in capsys.readouterr().out


@pytest.mark.slow
def test_the_gpu_checks_are_steps_whose_options_their_scripts_accept(monkeypatch):
    """benchmarks/gpu_checks.sh, what a machine with a GPU runs first: each step's command line parses as its
    script reads it (gpu.sh's through vs_trl.py's own --check-args, which needs no GPU)."""
    env = os.environ | {"PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    listed = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_checks.sh"), "--list"], capture_output=True,
                            text=True, timeout=30, check=True, env=env).stdout.splitlines()
    assert [line.split()[0] for line in listed] == ["packing_exact", "packing_bf16", "vs_trl", "vs_trl_varlen", "memory"]
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    for line in listed:
        name, limit, *command = line.split()
        assert 60 <= int(limit) <= 150, name
        if command[0].endswith("gpu.sh"):
            checked = subprocess.run(["bash", str(ROOT / command[0]), *command[1:], "--check-args"],
                                     capture_output=True, text=True, timeout=120, check=False, env=env)
            assert checked.returncode == 0, (name, checked.stdout[-2000:] + checked.stderr[-2000:])
            assert json.loads(checked.stdout)["device"] == "cuda", name
        else:
            assert command[0] == sys.executable and "--device" in command, name
            script = importlib.import_module(Path(command[1]).stem)
            assert script._parser().parse_args(command[2:]).device == "cuda", name
