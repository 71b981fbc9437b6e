#!/usr/bin/env bash
# Issue 16's GPU measurements in one detached job: gpu_smoke, `memdec bench` (kNN rows skipped), eval_e2e
# (memdec-eval wall times) and its compile-reuse phase. Results in $RES (default /tmp/memdec_i16), then
# packed into $RES/all.tgz. Usage: WHEELS=dir RES=dir benchmarks/run_issue16.sh
set -uo pipefail
cd "$(dirname "$0")/.."
RES="${RES:-/tmp/memdec_i16}"
mkdir -p "$RES"
if ! python3 -c "import lm_eval" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=/tmp/memdec_e2e/inductor
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$RES/gpu.txt" 2>&1
[ -n "${SKIP_SMOKE:-}" ] || { time python3 benchmarks/gpu_smoke.py cuda; } > "$RES/smoke.log" 2>&1
OUT="$RES/bench" benchmarks/run_gpu_bench.sh --skip-knn --budget "${BUDGET:-260}" > "$RES/bench_run.log" 2>&1
python3 benchmarks/eval_e2e.py --work /tmp/memdec_e2e --out "$RES/e2e" --rounds "${ROUNDS:-3}" > "$RES/e2e_main.log" 2>&1
python3 benchmarks/eval_e2e.py --work /tmp/memdec_e2e --out "$RES/e2e" --phase reuse > "$RES/e2e_reuse.log" 2>&1
tar czf /tmp/all.tgz -C "$RES" . && mv /tmp/all.tgz "$RES/all.tgz"
echo finished > "$RES/DONE"
