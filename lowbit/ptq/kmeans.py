"""k-means weight sharing as a post-training step (seed 001's codebook family).

Every quantized layer below 8 bits gets a codebook of 2^b centroids found by 1-D k-means on
its (BN-folded) weights (Gong et al. 2014; Deep Compression's clustering). Layers the
recipe keeps at 8 bits (the first and last) stay on their uniform int8 grid.

``hessian: fisher`` weights each weight's squared error by a diagonal-Hessian estimate
(Choi et al. 2017, "Towards the limit of network quantization", Hessian-weighted k-means):
the empirical Fisher, the mean squared gradient of the cross-entropy of the float network
on the calibration images, with its own predictions as labels (the calibration set has no
labels; at a trained minimum the Fisher approximates the Hessian's diagonal). ``joint``
clusters all layers of one bit width together, one codebook for the network, as Choi et al.
do (only meaningful with Hessian weighting, which makes errors of different layers
comparable). Activation ranges are re-fitted afterwards, since they were calibrated with the
uniform weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lowbit.errors import RecipeError
from lowbit.model.quant_model import QuantModel
from lowbit.quant.codebook import CodebookQuantizer, kmeans_1d

CLUSTER_BELOW_BITS = 8  # 8-bit layers keep the integer grid every runtime has


def fisher_diagonal(qm: QuantModel, batches: list[torch.Tensor], progress: bool = True) -> dict[str, torch.Tensor]:
    """Mean squared gradient of each clustered layer's folded weight (float network, own labels)."""
    layers = [r for r in qm.layers if r.layer.quantize_weight]
    weights = {r.name: r.layer.module.weight for r in layers}
    sums = {n: torch.zeros_like(w) for n, w in weights.items()}
    was = qm.training
    frozen = [w for w in weights.values() if not w.requires_grad]  # a model frozen by its owner has no gradients
    qm.eval()
    try:
        for w in frozen:
            w.requires_grad_(True)
        with qm.quantization(weights=False, activations=False):
            for x in tqdm(batches, desc="fisher", unit="batch", disable=not progress, leave=False):
                for n, w in weights.items():
                    w.grad = None
                logits = qm(x)
                labels = logits.detach().argmax(1)
                # per-sample gradients are too costly; the batch gradient squared, scaled by
                # the batch size, is the usual cheap estimate of the Fisher's diagonal
                loss = F.cross_entropy(logits, labels)
                grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
                for (n, _), g in zip(weights.items(), grads):
                    if g is not None:
                        sums[n] += (g.detach() ** 2) * x.shape[0]
    finally:
        for w in frozen:
            w.requires_grad_(False)
        qm.train(was)
    total = max(sum(b.shape[0] for b in batches), 1)
    return {n: s / total for n, s in sums.items()}


@torch.no_grad()
def cluster_weights(qm: QuantModel, batches: list[torch.Tensor], hessian: str = "none", joint: bool = False,
                    iterations: int = 100, progress: bool = True) -> dict[str, int]:
    """Swap every sub-8-bit weight quantizer (or those given w_quantizer kmeans) for a k-means
    codebook; returns {layer: K}."""
    if hessian not in ("none", "fisher"):
        raise RecipeError(f"kmeans.hessian must be 'none' or 'fisher', got {hessian!r}")
    if joint and hessian == "none":
        raise RecipeError("kmeans.joint clusters all layers into one codebook, which needs hessian: fisher to "
                          "compare errors across layers")
    # Layers given another kind of their own (an override or plan: ternary here, k-means
    # there) are not clustered; when some layer asks for kmeans, only those layers are.
    own = {r.name: r.w_quantizer for r in qm.layers if r.w_quantizer}
    asked = "kmeans" in own.values()
    # (a layer asked for by name is clustered at any width, e.g. an 8-bit first layer: its table said k-means)
    targets = [r for r in qm.layers if r.layer.quantize_weight
               and (own.get(r.name) == "kmeans" if asked else r.name not in own and r.w_bits < CLUSTER_BELOW_BITS)]
    if not targets:
        raise RecipeError(f"kmeans: no layer below {CLUSTER_BELOW_BITS} bits to cluster")
    if hessian == "fisher":
        with torch.enable_grad():
            importance = fisher_diagonal(qm, batches, progress)
    else:
        importance = {}
    groups: dict[int, list] = {}
    for r in targets:
        groups.setdefault(r.w_bits if joint else id(r), []).append(r)
    done = {}
    for rows in tqdm(list(groups.values()), desc="kmeans", unit="group", disable=not progress, leave=False):
        bits = rows[0].w_bits
        values = torch.cat([r.layer.weight.detach().reshape(-1) for r in rows])
        h = torch.cat([importance[r.name].reshape(-1) for r in rows]) if importance else None
        centroids = kmeans_1d(values, 2**bits, h, iterations)
        for r in rows:
            old = r.layer.weight_quantizer
            qm.replace_quantizer(old, CodebookQuantizer(old.spec, centroids, name=old.name))
            done[r.name] = int(centroids.numel())
    return done
