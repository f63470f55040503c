# Seed 000's claim on one model: μL2Q vs DoReFa vs a min-max uniform grid (straight-through) at 1, 2, 4
# weight bits, float activations, the same epoch budget for every row. Usage:
#   bash benchmarks/qat_weight_quantizers.sh MODEL EPOCHS OUT.json [extra benchmarks/qat.py flags]
# Resumable: finished rows in OUT.json are skipped, an interrupted row resumes from runs/.
set -e
cd "$(dirname "$0")/.."
model=$1; epochs=$2; out=$3; shift 3
for q in ul2q dorefa uniform; do for b in 1 2 4; do
  grid=midtread; [ $b = 1 ] && grid=midrise
  est=mse; [ $q = uniform ] && est=minmax
  python benchmarks/qat.py --data-dir ../shared/data --models-dir ../shared/models --model "$model" --recipes w2a32-ul2q \
    --edit weights.bits=$b --edit weights.grid=$grid --edit weights.quantizer=$q --edit weights.estimator=$est \
    --epochs "$epochs" --set val_samples=5000 --tag "$q-w$b" --threads 1 --runs runs --out "$out" "$@"
done; done
