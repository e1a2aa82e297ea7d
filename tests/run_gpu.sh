#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (about 15 minutes in all, at most 10 per command): check that
# CUDA is visible, build against the machine's own torch, run the CUDA and Triton tests of the ops and the model
# patch, run only the benchmark arms that answer the GPU goals, and print a one-screen table last. Exits with
# the tests' status; without a GPU it exits 2 within seconds, saying so.
#
#   bash tests/run_gpu.sh [OUT_DIR]          (default: $OUT, else benchmarks/results/gpu-run)
#
# Time budget on one H200 (16 cores), each step under its own timeout: check 5 s; build 3 .cu files in parallel
# about 2 min (timeout 240 s); tests about 2 min (timeout 180 s: Triton compiles each kernel variant once);
# benchmarks about 2 min (timeout 150 s: no torch.compile arms, one size per op, inputs drawn on the GPU);
# table 5 s. About 6-7 minutes, under 8 at the timeouts' worst (240 + 180 + 150 = 9.5 min is the hard cap).
# Everything is written to OUT_DIR as it happens (logs, junit.xml, bench-rows.jsonl), so a cut-off run keeps
# what it measured.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-benchmarks/results/gpu-run}}"
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
started=$(date +%s)
step() { echo; echo "=== $1 ($(($(date +%s) - started)) s) ==="; }

step "CUDA visible?"
if ! timeout 60 "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "run_gpu.sh: no CUDA device is visible to torch here; this script is for a GPU machine" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
  | tee -a "$OUT/gpu.txt"

step "build"
# --no-deps: the machine has no network; its own torch is what the extension is built against.
if ! FASTDISTIL_WITH_CUDA=1 timeout 240 "$PY" -m pip install --no-deps --no-build-isolation -e . > "$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"
  echo "BUILD FAILED (full log: $OUT/build.log)"
  exit 1
fi
"$PY" -m fastdistil.info | tee "$OUT/info.txt"

step "CUDA and Triton tests (ops, model patch)"
# No -x: every failure is reported; the junit file and the log grow as the tests run.
timeout 180 "$PY" -m pytest tests/ops tests/test_patch.py -q -p no:cacheprovider -rfEs \
  -k "cuda or triton or patch" --junitxml="$OUT/junit.xml" -o junit_logging=all > "$OUT/tests.log" 2>&1
tests_status=$?
tail -30 "$OUT/tests.log"
[ "$tests_status" -eq 124 ] && echo "TESTS TIMED OUT after 180 s (log: $OUT/tests.log)"

step "benchmarks (GPU goals only)"
rm -f "$OUT/bench-rows.jsonl"
FASTDISTIL_BENCH_QUICK=1 FASTDISTIL_BENCH_ROWS="$OUT/bench-rows.jsonl" timeout 150 \
  "$PY" -m benchmarks.run attention kd_loss cosine_loss distill_head relation_kl train_step --out cuda-quick.json \
  > "$OUT/bench.log" 2>&1
bench_status=$?
tail -5 "$OUT/bench.log"
cp benchmarks/results/cuda-quick.json "$OUT/" 2>/dev/null

step "table"
"$PY" - "$OUT/bench-rows.jsonl" <<'PYEOF'
import json, sys
from collections import defaultdict
rows = [json.loads(line) for line in open(sys.argv[1])] if __import__("os").path.exists(sys.argv[1]) else []
groups = defaultdict(dict)
for r in rows:
    groups[(r["op"], json.dumps(r["case"], sort_keys=True))][r["arm"]] = r
print(f"{'op':12} {'case':44} {'arm':18} {'ms':>9} {'vs eager':>9} {'GB/s':>8} {'peak MB':>8}")
for (op, case), arms in groups.items():
    eager = arms.get("eager")
    for arm, r in arms.items():
        ratio = f"{eager['median_ms'] / r['median_ms']:.2f}x" if eager else "-"
        print(f"{op:12} {case[:44]:44} {arm:18} {r['median_ms']:9.3f} {ratio:>9} {r['gbs']:8.1f} "
              f"{r['peak_delta_bytes'] / 2**20:8.1f}")
print(f"{len(rows)} rows measured")
PYEOF
echo
echo "tests: exit $tests_status; benchmarks: exit $bench_status; $(($(date +%s) - started)) s in all; files in $OUT"
exit "$tests_status"
