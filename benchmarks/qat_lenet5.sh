# The LeNet-5 table of the README: μL2Q, DoReFa and a min-max uniform grid at 1, 2, 4 weight bits, A32,
# every layer quantized, per-tensor weight grids as in the paper, 1 epoch. Resumable: finished rows in benchmarks/results/qat_lenet5.json are skipped.
cd "$(dirname "$0")/.."
exec bash benchmarks/qat_weight_quantizers.sh lenet5 1 benchmarks/results/qat_lenet5.json --edit first_last_bits=null --edit weights.per_channel=false
