# k-means weight sharing on ResNet-20 (post-training, float activations): 2/3/4-bit codebooks per layer,
# plain and Hessian-weighted (diagonal Fisher), beside the per-channel uniform grid of the same bits
# (the "calibration only" column). Resumable; rows in benchmarks/results/kmeans_resnet20.json.
set -e
cd "$(dirname "$0")/.."
for b in 2 3 4; do for r in w3a32-kmeans w3a32-kmeans-hessian; do
  python benchmarks/qat.py --data-dir ../shared/data --models-dir ../shared/models --model resnet20 --recipes $r \
    --edit weights.bits=$b --tag "w$b" --threads 1 --out benchmarks/results/kmeans_resnet20.json "$@"
done; done
