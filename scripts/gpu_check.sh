#!/usr/bin/env bash
# The checks that need a GPU, as one short run (a lent H100/H200 through the device tool,
# or any CUDA machine with torch, triton, peft and transformers): first the correctness of the
# Triton kernels and the CUDA paths against their torch references, then the timings.
#   bash scripts/gpu_check.sh            # results under $OUT (device tool) or test-artifacts/gpu
#   STEPS="gpu_tests bench_merge" MERGE_METHODS="ties dare_ties" bash scripts/gpu_check.sh   # a part
# Each step is bounded so that a slow one cannot eat the others' time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-test-artifacts/gpu}
mkdir -p "$OUT"
# adapter_kernels lives in kernels/; the project need not be installed there.
export PYTHONPATH="$PWD/kernels:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PY:-python3}

STEPS=${STEPS:-env gpu_tests bench_int4 bench_ternary bench_merge}
MERGE_METHODS=${MERGE_METHODS:-}

step() {  # step NAME SECONDS CMD...: run, keep the log, go on whatever happens
  local name=$1 limit=$2; shift 2
  [[ " $STEPS " == *" $name "* ]] || return 0
  echo "== $name"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
  echo "== $name: rc ${PIPESTATUS[0]} in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
}

step env 30 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; \
  $PY -c 'import torch, triton; print(\"torch\", torch.__version__, \"triton\", triton.__version__, torch.cuda.get_device_name())'"
# Correctness: every test behind the gpu marker (kernels vs references, CUDA decompress, CUDA merge).
# --noconftest: Django is not installed on the device; the model fixtures these tests need come
# from the Django-free plugin tests/model_fixtures.py.
step gpu_tests 120 "$PY" -m pytest -q -p no:cacheprovider --noconftest -p tests.model_fixtures -o addopts= -m gpu \
  tests/kernels tests/ops/test_compeft.py tests/ops/test_merge.py tests/ops/test_merge_library.py
# Timings.
step bench_int4 60 "$PY" benchmarks/bench_int4.py --batches 1 16 64
step bench_ternary 60 "$PY" -c "
import json, sys
sys.path.insert(0, 'benchmarks')
import bench_compeft
for dtype in ('bfloat16', 'float16', 'float32'):
    print(json.dumps(bench_compeft.bench_ternary_add_gpu(dtype=dtype)))
"
# About 20 s a method (two fresh processes each); all eleven fit in 280 s on an H200.
step bench_merge 280 "$PY" benchmarks/bench_merge.py --device cuda --threads 0 --min-time 2 \
  ${MERGE_METHODS:+--methods $MERGE_METHODS} --json "$OUT/bench_merge.json"
cat "$OUT/summary.txt"
