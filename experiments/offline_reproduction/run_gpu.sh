#!/usr/bin/env bash
# The offline reproduction on the GPU host, in one call (issue 8). Run from a checkout whose .device/ holds
# the wheels (lm-eval, datasets, bm25s, ...) and the corpora (stage_inputs.sh):
#
#   OUT=/some/folder experiments/offline_reproduction/run_gpu.sh
#
# Starts run.py detached (setsid) in RUN (default /tmp/memdec_offline_reproduction, kept while the machine
# stays warm), follows it for at most WAIT seconds (default 530), then writes the small result files
# (results.tar.gz, report.md/.csv/_size.png, results.md, times.json, logs.tar.gz) to $OUT. If the run
# is not finished by then, call this script again: it follows the same run (or resumes a killed one:
# every finished stage is skipped) and hands back the report of what is finished so far.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-runs/offline_reproduction}"
RUN="${RUN:-/tmp/memdec_offline_reproduction}"
WAIT="${WAIT:-530}"
ARGS="${ARGS:-}"   # extra run.py options, e.g. ARGS=--small for a quick check
mkdir -p "$OUT" "$RUN"
start=$SECONDS

if ! python3 -c "import lm_eval, bm25s" 2>/dev/null; then
  if [ ! -d /tmp/site/lm_eval ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .device/wheels/*.whl || echo "run_gpu.sh: installing .device/wheels failed" >&2
  fi
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$RUN/gpu.txt" 2>/dev/null || true

running() { [ -f "$RUN/run.pid" ] && kill -0 "$(cat "$RUN/run.pid")" 2>/dev/null; }
if running; then
  echo "run_gpu.sh: following the run already going (pid $(cat "$RUN/run.pid"))"
else
  rm -f "$RUN/run.pid"  # run.py writes its own pid there
  setsid nohup python3 experiments/offline_reproduction/run.py --config experiments/offline_reproduction/config.yaml \
    --run "$RUN" --out "$RUN/out" $ARGS >> "$RUN/run.log" 2>&1 < /dev/null &
  for _ in $(seq 60); do [ -f "$RUN/run.pid" ] && break; sleep 1; done
  echo "run_gpu.sh: started run.py (pid $(cat "$RUN/run.pid" 2>/dev/null)), log $RUN/run.log"
fi
while running && [ $((SECONDS - start)) -lt "$WAIT" ]; do sleep 5; done

if running; then
  echo "run_gpu.sh: still running after $((SECONDS - start)) s; handing back what is finished (call again to follow)"
  python3 experiments/offline_reproduction/run.py --config experiments/offline_reproduction/config.yaml --run "$RUN" \
    --out "$OUT" --report-only $ARGS > "$RUN/report-only.log" 2>&1 || tail -n 5 "$RUN/report-only.log"
  rc=3
else
  cp -f "$RUN"/out/* "$OUT"/ 2>/dev/null
  grep -q "FAILED" <(tail -n 3 "$RUN/run.log") && rc=1 || rc=0
fi
cp -f "$RUN/gpu.txt" "$OUT/" 2>/dev/null
grep -v "it/s\]\|s/it\]" "$RUN/run.log" | tail -n 40
ls -la "$OUT"
exit $rc
