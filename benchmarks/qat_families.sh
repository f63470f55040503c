# Seed 001's binary / ternary / half-wave-Gaussian families on one model, the same QAT budget for every row.
#   bash benchmarks/qat_families.sh MODEL EPOCHS OUT.json [extra benchmarks/qat.py flags]
# Weights-only rows start from w2a32-ul2q (float activations), A2 rows from w2a2-lsq; first/last layer 8-bit
# (LSQ) as in both. Resumable: finished rows in OUT.json are skipped, an interrupted row resumes from runs/.
set -e
cd "$(dirname "$0")/.."
model=$1; epochs=$2; out=$3; shift 3
run() {  # tag base-recipe edits...
  tag=$1; base=$2; shift 2
  edits=()
  for e in "$@"; do edits+=(--edit "$e"); done
  python benchmarks/qat.py --data-dir ../shared/data --models-dir ../shared/models --model "$model" --recipes "$base" \
    "${edits[@]}" --epochs "$epochs" --set val_samples=5000 --set lr=0.002 --set quantizer_lr=0 --tag "$tag" \
    --threads 1 --runs runs --out "$out" "${EXTRA[@]}"
}
EXTRA=("$@")
W1=(weights.bits=1 weights.grid=midrise)
W2=(weights.bits=2 weights.grid=midtread)
run binaryconnect-w1a32 w2a32-ul2q "${W1[@]}" weights.quantizer=binaryconnect
run binaryconnect-stoch-w1a32 w2a32-ul2q "${W1[@]}" weights.quantizer=binaryconnect "weights.quantizer_options={stochastic: true}"
run xnor-w1a32 w2a32-ul2q "${W1[@]}" weights.quantizer=xnor
run twn-w2a32 w2a32-ul2q "${W2[@]}" weights.quantizer=twn
run hwgq-xnor-w1a2 w2a2-lsq "${W1[@]}" weights.quantizer=xnor activations.quantizer=hwgq
run hwgq-twn-w2a2 w2a2-lsq "${W2[@]}" weights.quantizer=twn activations.quantizer=hwgq
