#!/usr/bin/env bash
# Score a finished QAT run's *last* epoch on the test split (whatever epoch its held-out rule kept).
#
#   bash benchmarks/last_epoch_eval.sh CHECKPOINT_FOLDER OUT_JSON -- <the benchmarks/qat.py arguments of the run,
#                                                                    without --runs and --out>
#
# The folder is copied to a scratch place without best.safetensors, and the run's own command is
# rerun on the copy: it rebuilds the post-training start, finds every epoch done and no kept model,
# so it scores the last epoch's state (the run itself is left untouched). Runs checkpointed before
# the `select` option existed must be given `--set select=best` (added here when their state says none).
set -euo pipefail
folder=$1; out=$2; shift 2
[ "${1:-}" = "--" ] && shift
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
cp -r "$folder" "$scratch/"
rm -f "$scratch/$(basename "$folder")/best.safetensors"
extra=()
grep -q '"select"' "$folder/state.json" || extra=(--set select=best)
"${PYTHON:-python}" benchmarks/qat.py "$@" "${extra[@]}" --runs "$scratch" --out "$out"
