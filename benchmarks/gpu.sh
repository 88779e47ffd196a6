#!/usr/bin/env bash
# The TRL comparison (benchmarks/vs_trl.py) on one GPU: bf16 mixed precision on both sides (fp32
# master weights), a randomly initialised ~0.47B Llama (hidden 1024, 24 layers, 16 heads, MLP 4096,
# vocab 32k; nothing is downloaded), 6-shot prompts (~370 tokens a sequence), 16 pairs a step.
# It prints tokens/s, peak max_memory_allocated and model FLOPs utilisation, (6N + 2N with a resident
# reference) x tokens/s over the GPU's measured bf16 8192x8192 matmul rate, and writes them to
# vs_trl_gpu.json. Extra options go to vs_trl.py ($PYTHON, default python3, runs it), e.g.:
#
#   pip install -e '.[bench]' && benchmarks/gpu.sh
#   benchmarks/gpu.sh --configs trl minor_dpo --windows 3
#   benchmarks/gpu.sh --check-args          # print the resolved options and exit (works without a GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" benchmarks/vs_trl.py --device cuda --hidden 1024 --layers 24 --heads 16 --intermediate 4096 \
    --vocab 32000 --shots 6 --batch 16 --pairs 256 --max-length 1024 --window 5 --windows 5 \
    --json vs_trl_gpu.json "$@"
