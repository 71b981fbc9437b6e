#!/usr/bin/env bash
# The GPU measurements still open in issues 15 and 17, as one detached job that later calls follow:
#
#   OUT=/some/folder benchmarks/run_pending_gpu.sh              # on the GPU host, from a checkout with .device/
#   STEPS="router scale" OUT=... benchmarks/run_pending_gpu.sh  # a subset, in that order
#
# Steps (each writes $RES/STEP/ and $RES/STEP/DONE when complete; a finished step is skipped on a later call):
#   router  benchmarks/router_cost.py --shapes 8x1024,1x1024: +MemDec (router) against +MemDec (fast), paired
#           (issue 17's cost goal, <= 1.02x), both models compiled and graphed
#   scale   benchmarks/scale_rehearsal.py on the general corpus (.device/corpora/general/train.jsonl.gz):
#           datastore, sampled exact targets, training, projected to 103 M and 1 B tokens (issue 15, goal 6)
#   ivfpq   benchmarks/bench_pipeline.py --ivfpq 1e7x768 with faiss-cpu on the host's cores (.device/faiss/*.whl,
#           installed into /tmp/site): the IVF-PQ table at 10 M x 768 (issue 15, goal 5)
# The job runs detached (setsid) in RES (default /tmp/memdec_pending); this script follows it for at most WAIT
# seconds (default 540), then copies every finished step (and the logs so far) to $OUT and exits 0 when all
# steps are done, 3 when the job is still running (call again: it follows the same job), 1 if a step failed.
# SMALL=1 runs each step at its smallest (a CPU check of this script: DEVICE=cpu SMALL=1).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/pending_gpu}"
RES="${RES:-/tmp/memdec_pending}"
WAIT="${WAIT:-540}"
STEPS="${STEPS:-router scale ivfpq}"
DEVICE="${DEVICE:-cuda}"
SMALL="${SMALL:-}"
mkdir -p "$OUT" "$RES"
start=$SECONDS
for s in $STEPS; do
  case "$s" in router|scale|ivfpq) ;; *) echo "run_pending_gpu.sh: error: unknown step '$s' (router, scale, ivfpq)" >&2; exit 2;; esac
done

if [ -d .device/faiss ] && ! python3 -c "import faiss" 2>/dev/null && [ ! -d /tmp/site/faiss ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .device/faiss/*.whl \
    || echo "run_pending_gpu.sh: installing .device/faiss failed" >&2
fi
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$RES/gpu.txt" 2>/dev/null || true

step_cmd() {  # the command of one step, writing into $RES/$1
  local d="$RES/$1"
  case "$1" in
    router)
      if [ -n "$SMALL" ]; then echo "python3 benchmarks/router_cost.py --out $d --device $DEVICE --small --shapes 1x64 --rounds 3"
      else echo "python3 benchmarks/router_cost.py --out $d --device $DEVICE --shapes 8x1024,1x1024"; fi ;;
    scale)
      if [ -n "$SMALL" ]; then echo "python3 benchmarks/scale_rehearsal.py --small --corpus memdec/data/general.jsonl --device $DEVICE --work $RES/scale-work --out $d"
      else echo "python3 benchmarks/scale_rehearsal.py --device $DEVICE --corpus .device/corpora/general/train.jsonl.gz --query-sample 500000 --train-steps 400 --work $RES/scale-work --out $d"; fi ;;
    ivfpq)
      if [ -n "$SMALL" ]; then echo "python3 benchmarks/bench_pipeline.py --device $DEVICE --small --skip datastore targets train --ivfpq 4000x16 --ivfpq-nlist 8 --ivfpq-m 4 --ivfpq-nprobe 2,8 --k 8 --ivfpq-queries 64 --ivfpq-train-rows 4000 --out $d"
      else echo "python3 benchmarks/bench_pipeline.py --device $DEVICE --skip datastore targets train --ivfpq 1e7x768 --ivfpq-nprobe 8,32,128 --ivfpq-rerank 1,4 --out $d"; fi ;;
  esac
}

running() { [ -f "$RES/job.pid" ] && kill -0 "$(cat "$RES/job.pid")" 2>/dev/null; }
if running; then
  echo "run_pending_gpu.sh: following the job already going (pid $(cat "$RES/job.pid"))"
else
  {
    echo 'set -uo pipefail'
    for s in $STEPS; do
      echo "if [ ! -f $RES/$s/DONE ]; then mkdir -p $RES/$s; echo \"[\$(date -u +%H:%M:%S)] $s: started\";"
      echo "  ( time $(step_cmd "$s") ) > $RES/$s/log.txt 2>&1 && touch $RES/$s/DONE || echo failed > $RES/$s/FAILED;"
      echo "  echo \"[\$(date -u +%H:%M:%S)] $s: \$([ -f $RES/$s/DONE ] && echo done || echo FAILED)\"; fi"
    done
  } > "$RES/job.sh"
  rm -f "$RES"/*/FAILED
  setsid nohup bash "$RES/job.sh" >> "$RES/job.log" 2>&1 < /dev/null &
  echo $! > "$RES/job.pid"
  echo "run_pending_gpu.sh: started steps: $STEPS (pid $(cat "$RES/job.pid")), log $RES/job.log"
fi
while running && [ $((SECONDS - start)) -lt "$WAIT" ]; do sleep 5; done

rc=0
for s in $STEPS; do
  [ -d "$RES/$s" ] || continue
  mkdir -p "$OUT/$s"
  find "$RES/$s" -maxdepth 1 -type f -size -16M -exec cp -f {} "$OUT/$s/" \;
  [ -f "$RES/$s/FAILED" ] && rc=1
done
cp -f "$RES/gpu.txt" "$RES/job.log" "$OUT/" 2>/dev/null
running && { echo "run_pending_gpu.sh: still running after $((SECONDS - start)) s (call again to follow)"; rc=3; }
cat "$RES/job.log" 2>/dev/null | tail -n 20
exit $rc
