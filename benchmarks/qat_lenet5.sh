# The LeNet-5 table of the README: μL2Q, DoReFa and a min-max uniform grid at 1, 2, 4 weight bits, A32, 1 epoch.
# Resumable: finished rows in benchmarks/results/qat_lenet5.json are skipped.
set -e
cd "$(dirname "$0")/.."
for q in ul2q dorefa uniform; do for b in 1 2 4; do
  grid=midtread; [ $b = 1 ] && grid=midrise
  est=mse; [ $q = uniform ] && est=minmax
  python benchmarks/qat.py --data-dir ../shared/data --models-dir ../shared/models --model lenet5 --recipes w2a32-ul2q \
    --edit weights.bits=$b --edit weights.grid=$grid --edit weights.quantizer=$q --edit weights.estimator=$est --edit first_last_bits=null \
    --epochs 1 --set val_samples=5000 --tag "$q-w$b" --threads 1 --runs runs --out benchmarks/results/qat_lenet5.json
done; done
