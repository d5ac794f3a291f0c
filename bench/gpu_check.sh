#!/usr/bin/env bash
# The GPU checks of the speed paths in one go, for a session that has a CUDA device (~4 of its minutes on one
# H200; CI never runs this): the CUDA mixed-precision tests, then bench/step_time.py in bf16 at adapter dropout
# 0 and 0.1, seq 64 and 128, with peak CUDA memory.
#
#   bash bench/gpu_check.sh [OUT_DIR]      # OUT_DIR default bench/results: step_time_cuda_bf16.{md,json}, gpu_tests.txt
#
# Each step has its own time limit so that the whole stays under 5 minutes of GPU time; a step that fails or runs
# out of time is reported and the next one still runs (exit status 1 at the end).
set -u
cd "$(dirname "$0")/.."
OUT=${1:-bench/results}
mkdir -p "$OUT"
status=0
python - <<'PY' || exit 2
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: no CUDA device (torch {torch.__version__}, built for CUDA {torch.version.cuda})")
print(f"gpu_check: torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
PY
# 1. CUDA AMP tests: every method, bf16 and fp16, through the real Trainer (tests/test_gpu.py)
timeout 100 python -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.txt" | tail -5
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "gpu_check: the GPU tests failed"; status=1; }
# 2. step time and memory, bf16, both dropout settings (5 rounds of 5 steps: GPU steps are milliseconds)
timeout 180 python bench/step_time.py --device cuda --precision bf16 --adapter-dropout 0,0.1 --seqs 64,128 \
    --rounds 5 --steps 5 --warmup 3 --out "$OUT/step_time_cuda_bf16.md" 2>"$OUT/step_time_cuda_bf16.log" \
    | tail -40 || { echo "gpu_check: step_time failed (log: $OUT/step_time_cuda_bf16.log)"; status=1; }
exit $status
