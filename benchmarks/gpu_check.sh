#!/usr/bin/env bash
# The GPU checks, in <= 8 minutes on one GPU (from the project root, venv active):
#   1. training: the gpt1 preset (vocab 40478), bf16 autocast, compiled and eager, dgpt vs transformers vs
#      nanoGPT, MFU against a bf16 matmul peak measured in the same run      (benchmarks/train_throughput.py)
#   2. generation: gpt1 shape, batch 1 and 8, bf16 and fp32, vs transformers  (benchmarks/generation.py)
#   3. DUPT where DiLoCo reports parity: the small preset, 4 oracles (pretrain_large's Gutenberg and Linux docs,
#      WikiText-2, Topical-Chat), 64 windows x 256 tokens = 16k tokens per oracle step, H = 50: central vs
#      H=50 vs H=50 FedExP with int8; the report gives the epochs each oracle made     (benchmarks/dupt.py)
# Results go to $GPU_CHECK_OUT (default benchmarks/results/gpu). `--smoke`: the same three steps at tiny sizes
# on the CPU into a temporary folder, end to end in about a minute (tests/test_gpu_check.py runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
if [[ "${1:-}" == "--smoke" ]]; then
    out=$(mktemp -d)
    trap 'rm -rf "$out"' EXIT
    export DGPT_SETTLE_S=0  # no idle wait before each report's load reading: nobody reads a smoke run's load
    "$PY" benchmarks/train_throughput.py --quick --device cpu --preset tiny --vocab 512 --batch 2 --dtype bf16 \
        --dropout 0 --threads 1 --out "$out"
    "$PY" benchmarks/generation.py --quick --device cpu --preset tiny --batch 1 --dtype fp32 --new-tokens 4 \
        --threads 1 --out "$out"
    "$PY" benchmarks/dupt.py --quick --device cpu --steps 50 --batch 2 --jobs 1 --arms "central,H=50,H=50 fedexp int8" \
        --stem dupt_gpu --runs "$out/runs" --out "$out"
    ls "$out"/train_throughput.md "$out"/generation.md "$out"/dupt_gpu.md
    echo "gpu_check --smoke: ok"
    exit 0
fi
out=${GPU_CHECK_OUT:-benchmarks/results/gpu}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
"$PY" benchmarks/train_throughput.py --device cuda --preset gpt1 --vocab 40478 --batch 16 --dtype bf16 \
    --modes compile,eager --dropout 0.1 --threads 0 --repeats 3 --steps 5 --no-profile --out "$out"
"$PY" benchmarks/generation.py --device cuda --preset gpt1 --batch 1,8 --dtype bf16,fp32 --new-tokens 100 \
    --threads 0 --out "$out"
"$PY" benchmarks/dupt.py --device cuda --dtype bfloat16 --preset small --data large --batch 64 --steps 600 \
    --jobs 1 --arms "central,H=50,H=50 fedexp int8" --stem dupt_gpu --runs /tmp/dgpt_gpu_check_runs --out "$out"
