# The trained rows of qat_families.sh started from float-target GPTQ instead of the plain calibrated
# grid: `calibrate -> gptq {target: float, regrid: true} -> qat`. GPTQ rounds onto the same grid the family's
# quantizer then recomputes (TWN's {-a, 0, a}, XNOR's {-a, a}), so its result is that quantizer's
# fixed point and training starts where post-training quantization ends (ResNet-20 TWN post-training: 11% calibrated, 77% float-target GPTQ, 89% with regrid).
# From that start the training is a distilled fine-tune, as w4a4-gptq-lsq: lr 0.0005, distillation only
# (KD weight 1, T 4). The first row measured here (TWN, plain float target, no regrid, lr 0.002, no KD)
# is kept in the output as `w2a32-twn-gptq-e1`.
#   bash benchmarks/qat_families_gptq.sh MODEL EPOCHS OUT.json [extra benchmarks/qat.py flags]
# Resumable like qat_families.sh (finished rows in OUT.json are skipped; checkpoints in runs/).
set -e
cd "$(dirname "$0")/.."
model=$1; epochs=$2; out=$3; shift 3
PY=${PYTHON:-python}
run() {  # recipe tag [recipe edits key=value | set:qat_param=value]...
  recipe=$1; tag=$2; shift 2
  extra=()
  for e in "$@"; do case $e in set:*) extra+=(--set "${e#set:}");; *) extra+=(--edit "$e");; esac; done
  $PY benchmarks/qat.py --data-dir ../shared/data --models-dir ../shared/models --model "$model" --recipes "$recipe" \
    --epochs "$epochs" --set val_samples=5000 --set lr=0.0005 --set quantizer_lr=0 \
    --set 'kd={temperature: 4.0, weight: 1.0}' --tag "gptq-regrid-kd1${tag:+-$tag}" \
    --edit 'steps=[calibrate, {gptq: {target: float, regrid: true}}, {qat: {}}]' "${extra[@]}" \
    --threads 1 --runs runs --out "$out" "${EXTRA[@]}"
}
EXTRA=("$@")
run w2a32-twn ""
run w1a32-xnor ""
run w2a32-ttq "" set:quantizer_lr=1e-5  # diverged (NaN at step 14): with distillation's larger gradients
run w2a32-ttq clip1 set:quantizer_lr=1e-5 set:clip_grad_norm=1.0  # zero weights sit 0.05·max from +-max
run w1a32-binaryconnect ""
run w1a2-hwgq ""
run w1a2-hwgq twn-w2a2 weights.bits=2 weights.grid=midtread weights.quantizer=twn
run w2a2-lqnet lsq-acts activations.quantizer=lsq+

run w1a32-xnor lr0.005 set:lr=0.005  # the XNOR gradient scales the latent update by alpha = mean|W| (0.03-0.3 here)
run w1a32-xnor lr0.02 set:lr=0.02
run w1a32-binaryconnect lr0.002 set:lr=0.002  # collapsed to chance in its epoch
run w2a32-twn lr0.002 set:lr=0.002
run w2a32-twn lr0.005 set:lr=0.005
run w1a2-hwgq twn-w2a2-lr0.002 weights.bits=2 weights.grid=midtread weights.quantizer=twn set:lr=0.002
