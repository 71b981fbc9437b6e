#!/usr/bin/env bash
# Issue 7's GPU benchmark in one call: random-weight Qwen2.5-1.5B (base) + Qwen2.5-0.5B (memory), bf16.
#
#   OUT=/some/folder benchmarks/run_gpu_bench.sh [extra `memdec bench` options]
#
# Needs torch (CUDA) and transformers; accelerate/matplotlib are optional, lm-eval/faiss/datasets are not
# used. Runs from a plain checkout (no install). Writes bench.json, bench.md, bench.png, bench.log and
# stderr.txt to $OUT (default runs/bench-gpu) and prints the markdown table last. About 4-6 minutes on
# one H100 (most of it compiling the decode steps).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/bench-gpu}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>/dev/null || true
python3 -m memdec.cli bench --device cuda --out "$OUT" "$@" > "$OUT/bench.log" 2> "$OUT/stderr.txt"
rc=$?
tail -n 30 "$OUT/stderr.txt" >&2
grep -v '^|' "$OUT/bench.log" | head -n 60
if [ -f "$OUT/bench.md" ]; then
  echo
  cat "$OUT/bench.md"
else
  echo "memdec bench failed (exit $rc); see $OUT/stderr.txt" >&2
fi
exit $rc
