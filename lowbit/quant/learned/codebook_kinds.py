"""Trainable codebook kinds: Deep Compression's centroid fine-tuning and TTQ.

- **kmeans** (Han et al. 2016, sec. 3.3): after k-means weight sharing (the ``kmeans`` PTQ
  step) the assignment of every weight to its centroid is fixed and the centroids train:
  the gradient of centroid k is the sum of the gradients of the weights assigned to it,
  which is what autograd gives for ``centroids[assignment]``.
- **ttq** (Zhu et al. 2017): ternary weights with two learned scales per layer,
  w_t = +Wp where w̃ > t, −Wn where w̃ < −t, 0 between, w̃ = w / max|w| and t = 0.05
  (sec. 3, eq. 6); gradients (eq. 7-8): ∂L/∂Wp = Σ_{I_p} ∂L/∂w_t, ∂L/∂Wn = Σ_{I_n} −∂L/∂w_t,
  and the latent weights get ∂L/∂w_t scaled by Wp on I_p, by 1 on I_z and by Wn on I_n.
  Wp and Wn are in the units of w̃ (as in the paper); here they start at the mean |w̃|
  of their sets, since training starts from the pretrained weights.

Both deploy as a :class:`~lowbit.quant.codebook.CodebookQuantizer` (TTQ: 3 entries,
{−Wn, 0, Wp}·max|w|, 2-bit indices), not as a uniform grid: Wp ≠ Wn has no integer grid.
"""
from __future__ import annotations

import torch
from torch import nn

from lowbit.errors import RecipeError
from lowbit.quant.codebook import CodebookQuantizer
from lowbit.quant.learned.base import TrainableQuantizer
from lowbit.quant.quantizer import UniformQuantizer


class KMeansFineTuneQuantizer(TrainableQuantizer):
    kind = "kmeans"
    deploys_to_codebook = True
    roles = ("weights",)
    rounds_latent_weights = False  # the forward reads its fixed assignment, not the latent weight
    reads_latent_weight = False    # ... nor anything else of it: only the centroids train
    needs_weight = True

    def __init__(self, source: UniformQuantizer, role: str, weight: torch.Tensor) -> None:
        if not isinstance(source, CodebookQuantizer):
            raise RecipeError(f"weights.quantizer kmeans fine-tunes k-means centroids: {source.name!r} has none; "
                              "put the `kmeans` step before `qat`")
        super().__init__(source, role)
        self.spec = source.spec
        self.centroids = nn.Parameter(source.centroids.detach().clone())
        self.register_buffer("assignment", source.codes(weight))

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape != self.assignment.shape:
            raise RecipeError(f"{self.name!r}: weight of shape {list(x.shape)} does not match its fixed assignment "
                              f"{list(self.assignment.shape)}")
        return self.centroids[self.assignment]  # per-cluster summed gradients (Deep Compression eq. 3)

    def deployed_weight(self, weight: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.centroids[self.assignment].clone()

    def deploy(self, weight: torch.Tensor | None = None) -> UniformQuantizer:
        return CodebookQuantizer(self.spec, self.centroids.detach(), name=self.name, method="kmeans")


class _TTQFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, wp, wn, m, t):  # noqa: ANN001, ANN205 - autograd signature
        pos, neg = x > t * m, x < -t * m
        ctx.save_for_backward(pos, neg, wp, wn, m)
        return m * (wp * pos - wn * neg)

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        pos, neg, wp, wn, m = ctx.saved_tensors
        zero = ~(pos | neg)
        grad_x = g * (wp * pos + zero + wn * neg)  # eq. 8, in the units of the raw weight
        grad_wp = (m * g * pos).sum()               # eq. 7 (w_t = m·Wp on I_p)
        grad_wn = -(m * g * neg).sum()
        return grad_x, grad_wp, grad_wn, None, None


class TTQQuantizer(TrainableQuantizer):
    kind = "ttq"
    deploys_to_codebook = True
    roles = ("weights",)
    needs_weight = True
    grid_required = (2, "midtread")
    per_tensor_only = True

    def __init__(self, source: UniformQuantizer, role: str, weight: torch.Tensor, threshold: float = 0.05) -> None:
        super().__init__(source, role)  # grid_required refuses the 8-bit first/last layer: LSQ takes it
        self.spec = source.spec.with_(signed=True, symmetric=True)
        self.threshold = float(threshold)
        w = weight.detach()
        wt = w / w.abs().max().clamp_min(1e-12)
        pos, neg = wt > self.threshold, wt < -self.threshold
        self.wp = nn.Parameter(wt[pos].mean() if pos.any() else torch.tensor(0.5, device=w.device))
        self.wn = nn.Parameter((-wt[neg]).mean() if neg.any() else torch.tensor(0.5, device=w.device))

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        m = x.detach().abs().max().clamp_min(1e-12)
        return _TTQFunction.apply(x, self.wp, self.wn, m, self.threshold)

    def deploy(self, weight: torch.Tensor | None = None) -> UniformQuantizer:
        if weight is None:
            raise RecipeError(f"{self.name!r}: TTQ deploys from its weight (its max sets the scale)")
        m = weight.detach().abs().max().clamp_min(1e-12)
        levels = torch.stack([-self.wn.detach() * m, torch.zeros((), device=m.device), self.wp.detach() * m])
        return CodebookQuantizer(self.spec, levels, name=self.name, method="ttq")
