#!/usr/bin/env bash
# Every GPU measurement the docs still wait for, in one command on a machine with one NVIDIA GPU, the most
# needed first. Each step has a time limit of its own (SIGINT: the benchmarks print what they finished), so a
# short lease still gets the first ones; 9 minutes at most, so the whole script fits a 10-minute command.
#
#   pip install -e '.[bench]' && benchmarks/gpu_checks.sh [OUT_DIR]    # logs and JSON in OUT_DIR (gpu_checks/)
#   benchmarks/gpu_checks.sh --list                                    # the steps, without running them
#
#  1. packing_exact   packed (attention by sequence) against padded micro-batches, fp32: each pair's log-probs agree
#                     to 1e-5 relative, or the step exits 1 (benchmarks/varlen_step.py)
#  2. packing_bf16    the same step in bf16 autocast on a 1B-class model: time, real tokens/s and peak memory of
#                     padded, length-grouped and packed layouts
#  3. vs_trl          benchmarks/gpu.sh: mdpo-ray against TRL on fixed-length pairs, a 0.47B Llama in bf16
#  4. vs_trl_varlen   the same on the long-tailed variable-length pairs, padded and packed
#  5. memory          benchmarks/memory.py --device cuda: the memory planner's figures against the GPU's
#
# Each step's exit status is printed after it ("== <step>: exit N"; 124 or 130: stopped at its limit), and the
# script exits 1 if packing_exact did not pass.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
list=false
[[ "${1:-}" == "--list" ]] && { list=true; shift; }
out=${1:-gpu_checks}
STEPS=(
    "packing_exact 90 $PYTHON benchmarks/varlen_step.py --device cuda --hidden 1024 --layers 8 --batch 16 --micro-batch 4 --rounds 2"
    "packing_bf16 120 $PYTHON benchmarks/varlen_step.py --device cuda --bf16 --hidden 2048 --layers 16 --batch 32 --micro-batch 8 --rounds 3"
    "vs_trl 120 benchmarks/gpu.sh --configs trl minor_dpo --windows 3 --json $out/vs_trl_gpu.json"
    "vs_trl_varlen 120 benchmarks/gpu.sh --varlen --micro-batch 4 --configs trl minor_dpo minor_dpo_packed --windows 3 --json $out/vs_trl_gpu_varlen.json"
    "memory 90 $PYTHON benchmarks/memory.py --device cuda --no-examples --configs s512 s1024 s1024_padded s1024_ckpt s1024_selective s512_lora l512"
)
if $list; then
    printf '%s\n' "${STEPS[@]}"
    exit 0
fi
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt"
"$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$out/gpu.txt"
exact=1
for step in "${STEPS[@]}"; do
    read -r name limit command <<<"$step"
    echo "== $name (at most $limit s): $command" | tee "$out/$name.log"
    # shellcheck disable=SC2086  # the command's words, split as written above
    PYTHONUNBUFFERED=1 timeout -s INT -k 20 "$limit" $command 2>&1 | tee -a "$out/$name.log"
    status=${PIPESTATUS[0]}
    echo "== $name: exit $status" | tee -a "$out/$name.log"
    [[ $name == packing_exact ]] && exact=$status
done
exit $(( exact != 0 ))
