# Seed 001's binary / ternary / codebook / power-of-two / half-wave-Gaussian families on one model, the same
# QAT budget for every trained row (PTQ rows, k-means without fine-tuning, train nothing).
#   bash benchmarks/qat_families.sh MODEL EPOCHS OUT.json [extra benchmarks/qat.py flags]
# Built-in recipes (lowbit/recipes/builtin), first/last layer 8-bit as in all of them. Resumable: finished
# rows in OUT.json are skipped, an interrupted row resumes from runs/.
set -e
cd "$(dirname "$0")/.."
model=$1; epochs=$2; out=$3; shift 3
run() {  # recipe tag [recipe edits key=value | set:qat_param=value]...
  recipe=$1; tag=$2; shift 2
  extra=()
  for e in "$@"; do case $e in set:*) extra+=(--set "${e#set:}");; *) extra+=(--edit "$e");; esac; done
  python benchmarks/qat.py --data-dir ../shared/data --models-dir ../shared/models --model "$model" --recipes "$recipe" \
    --epochs "$epochs" --set val_samples=5000 --set lr=0.002 --set quantizer_lr=0 ${tag:+--tag "$tag"} "${extra[@]}" \
    --threads 1 --runs runs --out "$out" "${EXTRA[@]}"
}
EXTRA=("$@")
# the calibrated start these rows were measured from (TWN, TTQ, XNOR and BinaryConnect now ship the GPTQ start:
# benchmarks/qat_families_gptq.sh)
CAL='steps=[calibrate, {qat: {epochs: 30, lr: 0.002, weight_decay: 5.0e-5, batch_size: 128}}]'
# w2a2-lqnet's calibrated start and qat step as they were when its rows ran (it now starts from float-target GPTQ)
LQ_CAL='steps=[calibrate, {qat: {epochs: 30, lr: 0.0005, quantizer_lr: 1.0e-5, weight_decay: 5.0e-5, batch_size: 128, kd: {temperature: 4.0, weight: 0.5}}}]'
run w3a32-kmeans ""
run w3a32-kmeans-hessian ""
run w1a32-binaryconnect "" "$CAL"
run w1a32-binaryconnect stochastic "weights.quantizer_options={stochastic: true}" "$CAL"
run w1a32-binaryconnect lr2e-4 set:lr=0.0002 "$CAL"  # at 0.002 ResNet-20's latent weights diverge (NaN loss)
run w1a32-irnet "" "$CAL"  # IR-Net (Libra-PB + EDE) from the same calibrated start as BinaryConnect's rows
run w1a32-xnor "" "$CAL"
run w2a32-twn "" "$CAL"
run w2a32-ttq "" set:quantizer_lr=1e-5 "$CAL"  # TTQ's scale gradient sums a whole layer: at the weights' rate it collapses
run w3a32-kmeans-ft "" set:quantizer_lr=1e-5  # centroid gradients sum their cluster: same reason
run w5a32-inq ""
run w1a2-hwgq ""
run w1a2-hwgq twn-w2a2 weights.bits=2 weights.grid=midtread weights.quantizer=twn
run w2a2-lqnet "" "$LQ_CAL"  # LQ-Nets weights and activations
run w2a2-lqnet lsq-acts activations.quantizer=lsq+ "$LQ_CAL"  # LQ-Nets weights, LSQ+ activations
run w1a1-bnn ""  # sign weights and activations; every ReLU becomes hardtanh
run w1a1-xnor ""  # XNOR-Net: alpha*sign weights, sign inputs, outputs scaled by K
run w1a1-bireal ""  # Bi-Real Net: a real-valued shortcut around every conv, ApproxSign gradient
run w1a1-irnet ""  # IR-Net: Libra-PB weights, EDE on weights and activations, Bi-Real shortcuts
# the rest of the issue's table: INQ at 3 bits, LQ-Nets W3A3, k-means at 2 and 4 bits, Hessian-weighted k-means fine-tuned
run w5a32-inq w3 weights.bits=3  # 5 levels {0, ±2^n}
run w3a3-lqnet ""
run w3a32-kmeans w2 weights.bits=2
run w3a32-kmeans-hessian w2 weights.bits=2
run w3a32-kmeans w4 weights.bits=4
run w3a32-kmeans-hessian w4 weights.bits=4
run w3a32-kmeans-ft w2 weights.bits=2 set:quantizer_lr=1e-5
run w3a32-kmeans-ft w4 weights.bits=4 set:quantizer_lr=1e-5
run w3a32-kmeans-ft hessian 'steps=[calibrate, {kmeans: {hessian: fisher}}, {qat: {}}]' set:quantizer_lr=1e-5
run w3a32-kmeans-ft hessian-w2 weights.bits=2 'steps=[calibrate, {kmeans: {hessian: fisher}}, {qat: {}}]' set:quantizer_lr=1e-5
run w3a32-kmeans-ft hessian-w4 weights.bits=4 'steps=[calibrate, {kmeans: {hessian: fisher}}, {qat: {}}]' set:quantizer_lr=1e-5
# at 2 bits the centroids of a whole layer's cluster move too far at 1e-5 (the LeNet-5 table's lesson)
run w3a32-kmeans-ft hessian-w2-clr1e-6 weights.bits=2 'steps=[calibrate, {kmeans: {hessian: fisher}}, {qat: {}}]' set:quantizer_lr=1e-6
run w3a32-kmeans-ft w2-clr1e-6 weights.bits=2 set:quantizer_lr=1e-6
