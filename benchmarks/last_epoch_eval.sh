#!/usr/bin/env bash
# Score a finished QAT run's *last* epoch on the test split (whatever epoch its held-out rule kept).
#
#   bash benchmarks/last_epoch_eval.sh CHECKPOINT_FOLDER OUT_JSON -- <the benchmarks/qat.py arguments of the run,
#                                                                    without --runs and --out>
#
# The folder is copied to a scratch place without best.safetensors and with no epoch kept in its
# state.json, and the run's own command is rerun on the copy: it rebuilds the post-training start,
# finds every epoch done and no kept model, so it scores the last epoch's state (the run itself is
# left untouched; its reported best_epoch is 0). Runs checkpointed before
# the `select` option existed must be given `--set select=best` (added here when their state says none).
set -euo pipefail
folder=$1; out=$2; shift 2
[ "${1:-}" = "--" ] && shift
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
cp -r "$folder" "$scratch/"
rm -f "$scratch/$(basename "$folder")/best.safetensors"
# and no epoch kept in its state (a kept epoch whose file is missing is refused as a damaged checkpoint)
"${PYTHON:-python}" - "$scratch/$(basename "$folder")/state.json" <<'PY'
import json, os, sys
path = sys.argv[1]
side = json.load(open(path))
side["best_epoch"], side["best_val"] = 0, -1.0
open(path + ".tmp", "w").write(json.dumps(side, indent=1, sort_keys=True))
os.replace(path + ".tmp", path)
PY
extra=()
grep -q '"select"' "$folder/state.json" || extra=(--set select=best)
"${PYTHON:-python}" benchmarks/qat.py "$@" "${extra[@]}" --runs "$scratch" --out "$out"
