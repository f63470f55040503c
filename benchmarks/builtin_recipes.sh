#!/usr/bin/env bash
# The built-in recipes on the pretrained ResNet-20, full CIFAR-10 test split (README's main
# job and the "other built-ins" line). Usage: bash benchmarks/builtin_recipes.sh [DATA_DIR] [MODELS_DIR]
set -euo pipefail
DATA=${1:-../shared/data}
MODELS=${2:-../shared/models}
cd "$(dirname "$0")/.."
lowbit quantize --data-dir "$DATA" --models-dir "$MODELS" --no-progress --json benchmarks/results/main_job.json
lowbit quantize --recipe w3a3,w4a4,w2a4,w4a4-usp --data-dir "$DATA" --models-dir "$MODELS" --no-progress \
  --json benchmarks/results/more_recipes.json
