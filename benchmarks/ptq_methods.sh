#!/usr/bin/env bash
# The runs behind the README's post-training tables, in priority order, as two lanes of
# one thread each (small convolutions use two threads poorly, so two single-thread runs
# side by side finish more rows per hour on the 2 cores here). Each call skips what its
# JSON file already holds: re-run this to resume.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
ARGS=(--data-dir "${DATA_DIR:-../shared/data}" --models-dir "${MODELS_DIR:-../shared/models}" --threads 1)
B=benchmarks/ptq_methods.py
R32=benchmarks/results/ptq_methods_resnet32.json
lane_a() {
  $PY $B "${ARGS[@]}" --models resnet20 --seeds 0 --configs w4a4,w2a4
  $PY $B "${ARGS[@]}" --models resnet20 --seeds 1,2 --configs w4a4
  $PY $B "${ARGS[@]}" --models resnet20 --seeds 0 --configs w4a8,w3a3
  $PY $B "${ARGS[@]}" --models resnet20 --seeds 1,2 --configs w2a4,w4a8,w3a3
}
lane_b() {
  $PY $B "${ARGS[@]}" --out $R32 --models resnet32 --seeds 0 --configs w4a4,w2a4
  $PY $B "${ARGS[@]}" --out benchmarks/results/ptq_methods_long.json --models resnet20 --seeds 0 --configs w2a4 \
      --methods "brecq (1000 it),qdrop (1000 it)"
  $PY $B "${ARGS[@]}" --out benchmarks/results/ptq_methods_long.json --models resnet20 --seeds 0 --configs w4a4 \
      --methods "seed002 bn+cosine+teacher-student (1000 it),qdrop (1000 it)"
  $PY $B "${ARGS[@]}" --out $R32 --models resnet32 --seeds 0 --configs w4a8,w3a3
  $PY $B "${ARGS[@]}" --out $R32 --models resnet32 --seeds 1,2
}
lane_a &
lane_b &
wait
