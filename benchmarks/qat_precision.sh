# Does bf16 training (qat precision bf16 + channels_last) train as well as fp32? The same built-in
# recipe, the same epochs and data, once per arithmetic, one lane, so the pair shares the machine's
# state; the test top-1 of each row and its wall time go to OUT.json (resumable: finished rows are skipped).
#   bash benchmarks/qat_precision.sh RECIPE EPOCHS OUT.json [extra benchmarks/qat.py flags]
set -e
cd "$(dirname "$0")/.."
recipe=$1; epochs=$2; out=$3; shift 3
PY=${PYTHON:-python}
for arithmetic in fp32 bf16; do
  flags=(--set precision=$arithmetic)
  [ $arithmetic = bf16 ] && flags+=(--set channels_last=true)
  $PY benchmarks/qat.py --data-dir ../shared/data --models-dir ../shared/models --recipes "$recipe" --epochs "$epochs" \
    --set val_samples=5000 "${flags[@]}" --tag "$arithmetic" --threads 1 --runs runs --out "$out" "$@"
done
