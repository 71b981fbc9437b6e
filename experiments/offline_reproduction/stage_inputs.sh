#!/usr/bin/env bash
# Copy the offline corpora that run_gpu.sh needs into .device/corpora/ (run on this machine, before the GPU call).
#
#   experiments/offline_reproduction/stage_inputs.sh [SOURCE]
#
# SOURCE default, relative to the checkout: shared/corpora inside it, else ../shared/corpora beside it.
#
# Copies {general,bio,finance,law}/{train,valid,test}.jsonl.gz (about 24 MB; the GPU host takes 64 MiB
# of inputs in all, with .device/wheels about 14 MB) and prints the total size of .device/.
set -euo pipefail
cd "$(dirname "$0")/../.."
SRC="${1:-}"
if [ -z "$SRC" ]; then
  for cand in shared/corpora ../shared/corpora; do
    if [ -d "$cand" ]; then SRC="$cand"; break; fi
  done
fi
if [ -z "$SRC" ] || [ ! -d "$SRC" ]; then
  echo "stage_inputs.sh: error: no corpora folder ${SRC:-(neither shared/corpora nor ../shared/corpora in $(pwd))}; pass it as SOURCE" >&2
  exit 2
fi
DEST=.device/corpora
for name in general bio finance law; do
  mkdir -p "$DEST/$name"
  for split in train valid test; do
    cp -f "$SRC/$name/$split.jsonl.gz" "$DEST/$name/$split.jsonl.gz"
  done
done
du -sh "$DEST" .device
