#!/usr/bin/env bash
# One prepared script for a GPU machine: build against its torch, run the CUDA and Triton tests, run the
# benchmarks, print a short table last. Usage: bash tests/run_gpu.sh [OUT_DIR]
# (A lent GPU gives minutes, not hours: everything here is sized to finish in about ten.)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-benchmarks/results}}"
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

# Build with the machine's own torch (no dependency resolution: it has no network).
FASTDISTIL_WITH_CUDA=1 python -m pip install --no-deps --no-build-isolation -e . > "$OUT/build.log" 2>&1 \
  || { tail -50 "$OUT/build.log"; echo "BUILD FAILED"; exit 1; }
python -m fastdistil.info | tee "$OUT/info.txt"

# Tests: everything, on the GPU (CUDA C++ and Triton kernels run for real).
timeout 300 python -m pytest tests -q -x -p no:cacheprovider 2>&1 | tail -40 | tee "$OUT/tests.txt"

# Benchmarks on CUDA tensors (arms: eager, compiled, ours with each CUDA implementation); pytest-benchmark
# when the machine has it, else the same cases through benchmarks/run.py.
# Attention first (its own record, cuda-attention.json): ours vs SDPA with / without the padding mask vs eager.
if python -c "import pytest_benchmark" 2>/dev/null; then
  FASTDISTIL_BENCH_OUT=cuda-attention.json timeout 150 python -m pytest benchmarks/bench_attention.py --benchmark-only \
    -q -p no:cacheprovider --benchmark-columns=median,rounds 2>&1 | tee "$OUT/bench-attention.txt" \
    | sed -n '/fastdistil benchmark report/,$p'
  FASTDISTIL_BENCH_OUT=cuda.json timeout 300 python -m pytest benchmarks --ignore=benchmarks/bench_attention.py \
    --benchmark-only -q -p no:cacheprovider --benchmark-columns=median,rounds 2>&1 | tee "$OUT/bench.txt" \
    | sed -n '/fastdistil benchmark report/,$p'
else
  timeout 150 python -m benchmarks.run attention --out cuda-attention.json 2>&1 | tee "$OUT/bench-attention.txt"
  timeout 300 python -m benchmarks.run cosine_loss distill_head kd_loss train_step --out cuda.json 2>&1 | tee "$OUT/bench.txt"
fi
cp benchmarks/results/cuda.json benchmarks/results/cuda-attention.json "$OUT/" 2>/dev/null || true
