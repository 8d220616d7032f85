#!/usr/bin/env bash
# One device-machine call: GPU tests and benchmarks, logs and JSON under $OUT, short tables printed last.
#   bash scripts/gpu_run.sh [warm|tests|slowtests|bench|calib|gptq|e2e|all] ...  (ModelOpt wheels in .anchor/ are installed if present;
#   on a fresh machine ModelOpt compiles its CUDA extension at first use, ~60-80 s)
#   slowtests: only the two slowest GPU tests (2.4e9-element expert stack, picks vs ModelOpt)
#   warm: fp4cal.search.warmup's seconds on the Triton cache the run starts with (empty on a fresh machine, or
#   TRITON_CACHE_DIR pointing at an empty folder), then again warm
set -uo pipefail
OUT=${OUT:-/tmp/fp4cal-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .anchor ] && ls .anchor/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/anchor .anchor/*.whl \
    && export PYTHONPATH=/tmp/anchor:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:$PWD/tests:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.used --format=csv | tee "$OUT/gpu.txt"
git rev-parse --short HEAD 2>/dev/null | tee "$OUT/commit.txt"
for what in "${@:-all}"; do
  case "$what" in
    warm)
      timeout ${WARM_TIMEOUT:-150} python3 -c "
import torch, fp4cal.search as s
cold = s.warmup(['mse', 'local_hessian'], torch.bfloat16, 'cuda').wait()
warm = s.warmup(['mse', 'local_hessian'], torch.bfloat16, 'cuda').wait()
print(f'WARMUP cold cache {cold:.1f} s, warm cache {warm:.3f} s')" 2>&1 | tee "$OUT/warmup.log" ;;
    tests|all)
      timeout ${TESTS_TIMEOUT:-400} python3 -m pytest -q -s -rs ${TESTS:-tests/test_kernels.py tests/test_kernels_gpu.py tests/test_numerics.py} ${TESTS_K:+-k "$TESTS_K"} 2>&1 \
        | tee "$OUT/gpu_tests.log" | grep -E "PARITY|passed|failed|Error|error" | tail -60 ;;&
    slowtests)
      timeout 400 python3 -m pytest -q -s -rs tests/test_kernels_gpu.py -k "beyond_int32 or modelopt" 2>&1 \
        | tee "$OUT/gpu_slowtests.log" | grep -E "PARITY|passed|failed|Error|error" | tail -20 ;;&
    bench|all)
      timeout ${BENCH_TIMEOUT:-400} python3 bench/bench_search.py --json "$OUT/bench_search.json" ${BENCH_ARGS:-} 2>&1 \
        | tee "$OUT/bench_search.log" ;;&
    gptq)
      timeout ${GPTQ_TIMEOUT:-300} python3 bench/bench_gptq.py --json "$OUT/bench_gptq.json" ${GPTQ_ARGS:-} 2>&1 \
        | tee "$OUT/bench_gptq.log" ;;
    e2e)  # needs .anchor/assets (tokenizer + texts); writes a checkpoint of ~16 GB under /tmp
      # E2E_NAME names the logs (a second invocation with another name keeps the first's); the caches are shared
      n=${E2E_NAME:-bench_e2e}
      timeout ${E2E_TIMEOUT:-540} python3 bench/bench_e2e.py --assets .anchor/assets --work /tmp/fp4cal-$n \
        --caches /tmp/fp4cal-e2e-caches --json "$OUT/$n.json" --logs "$OUT/${n}_logs" ${E2E_ARGS:-} 2>&1 \
        | tee "$OUT/$n.log" ;;
    calib|all)
      if [ -f bench/bench_calibrate.py ]; then
        timeout ${CALIB_TIMEOUT:-400} python3 bench/bench_calibrate.py --json "$OUT/bench_calibrate.json" ${CALIB_ARGS:-} 2>&1 \
          | tee "$OUT/bench_calibrate.log"
      fi ;;
  esac
done
