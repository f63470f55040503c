#!/usr/bin/env bash
# The runs behind the README's post-training table, in priority order (each call skips
# what benchmarks/results/ptq_methods.json already holds, so this can be re-run to resume).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
ARGS=(--data-dir "${DATA_DIR:-../shared/data}" --models-dir "${MODELS_DIR:-../shared/models}")
B=benchmarks/ptq_methods.py
$PY $B "${ARGS[@]}" --models resnet20 --seeds 0 --configs w4a4,w2a4
$PY $B "${ARGS[@]}" --models resnet20 --seeds 0 --configs w4a8,w3a3
$PY $B "${ARGS[@]}" --models resnet20 --seeds 1,2 --configs w4a4,w2a4
$PY $B "${ARGS[@]}" --models resnet32 --seeds 0 --configs w4a4,w2a4
$PY $B "${ARGS[@]}" --models resnet20 --seeds 0 --configs w2a4 --methods "brecq (1000 it),qdrop (1000 it)"
$PY $B "${ARGS[@]}" --models resnet20 --seeds 1,2 --configs w4a8,w3a3
$PY $B "${ARGS[@]}" --models resnet32 --seeds 0 --configs w4a8,w3a3
$PY $B "${ARGS[@]}" --models resnet32 --seeds 1,2
