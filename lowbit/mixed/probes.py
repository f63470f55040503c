"""MSQ's per-layer task predictors (seed 003 §3.2): pyramid pooling + weight imprinting.

After every quantized layer a probe predicts the class from that layer's output alone,
without training: templates are confidence-weighted class means of pooled calibration
features (eq. 10), and a validation image goes to the class whose templates it matches
best, the per-scale scores fused by their softmax entropies (eqs. 11-15). The accuracy of
each probe says how much task information the network has built up by that layer.

Choices the seed leaves open, and why:
- Features and templates are L2-normalised before the inner product of eq. 8/12: weight
  imprinting relies on "the symmetry between normalised inputs and weights" (§3.2), and
  without it the layer with the largest activations would dominate the scores.
- Conf(x) of eq. 10 is the network's softmax probability of the sample's own class: the
  confidence of a correct prediction, and a small weight for a sample it gets wrong.
- Eq. 11 upsamples every pooled map to the largest size (bilinear) before concatenation,
  so each scale's block of the fused feature has the same length as its template.
- Eq. 15 weights each scale by its entropy H (not 1/H), as the seed writes it.

Where the probe reads (``probe_at``): "output" is the layer's own output, as the seed
says. In a residual network the second conv of a block outputs only the residual branch,
which the network never uses on its own; "next_input" reads instead the tensor the next
layer in the table consumes (for a chain of blocks: the block output after the add and
ReLU), and the last layer's own output. It is our variant, not the seed's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.model.quant_layer import QuantLayer
from lowbit.model.quant_model import QuantModel

DEFAULT_POOL_SIZES = (1, 2, 4)


def _as_map(out: torch.Tensor) -> torch.Tensor:
    """Any layer output as an NCHW map: Linear [N, C] -> [N, C, 1, 1], Conv1d [N, C, L] -> [N, C, L, 1]."""
    if out.dim() == 2:
        return out[:, :, None, None]
    if out.dim() == 3:
        return out[:, :, :, None]
    if out.dim() == 4:
        return out
    raise LowbitError(f"MSQ probes handle 2-D, 3-D and 4-D layer outputs, got shape {tuple(out.shape)}")


def pyramid_features(out: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Eqs. (9) and (11): adaptive average pooling at each size d, bilinear upsampling to
    the largest size, concatenation. Returns [N, n_scales, C * D * D], each scale's block
    L2-normalised (see the module note)."""
    fmap = _as_map(out.float())
    top = max(sizes)
    blocks = []
    for d in sizes:
        e = F.adaptive_avg_pool2d(fmap, d)                                       # eq. (9)
        if d != top:
            e = F.interpolate(e, size=(top, top), mode="bilinear", align_corners=False)
        blocks.append(F.normalize(e.flatten(1), dim=1))
    return torch.stack(blocks, dim=1)                                            # eq. (11)


@dataclass
class ProbeResult:
    """Per-layer probe accuracy on the validation set, in layer-table order."""
    layers: list[str]
    accuracy: list[float]
    network_accuracy: float

    def gains(self) -> list[float]:
        """Algorithm 1 step 3: Diff_i = |Acc_i - Acc_{i-1}| for i >= 2 (index i-1 here)."""
        return [abs(a - b) for a, b in zip(self.accuracy[1:], self.accuracy[:-1])]


PROBE_POINTS = ("output", "next_input")


class _Capture:
    """Forward hooks that keep, per quantized layer, the tensor its probe reads."""

    def __init__(self, layers: list[tuple[str, QuantLayer]], at: str = "output") -> None:
        if at not in PROBE_POINTS:
            raise LowbitError(f"unknown probe point {at!r}; known: {list(PROBE_POINTS)}")
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = []
        for i, (name, layer) in enumerate(layers):
            if at == "next_input" and i + 1 < len(layers):
                self.handles.append(layers[i + 1][1].register_forward_pre_hook(self._pre_hook(name)))
            else:
                self.handles.append(layer.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def keep(_module, _inputs, output):
            self.outputs[name] = output.detach()
        return keep

    def _pre_hook(self, name: str):
        def keep(_module, inputs):
            self.outputs[name] = inputs[0].detach()
        return keep

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def probe_accuracy(
    qm: QuantModel, calib: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
    pool_sizes: Sequence[int] = DEFAULT_POOL_SIZES, batch_size: int = 256, probe_at: str = "output",
) -> ProbeResult:
    """Imprint templates from ``calib`` (x, y) through the quantized network, then score
    every layer's probe on ``val`` (x, y). Both sets must come from the training split."""
    if not pool_sizes or any((not isinstance(d, int)) or d < 1 for d in pool_sizes):
        raise LowbitError(f"pool_sizes must be positive integers, got {list(pool_sizes)}")
    (cx, cy), (vx, vy) = calib, val
    if cx.shape[0] != cy.shape[0] or vx.shape[0] != vy.shape[0]:
        raise LowbitError("probe data: inputs and labels differ in length")
    n_classes = int(max(cy.max(), vy.max())) + 1
    names = [r.name for r in qm.layers]
    capture = _Capture([(r.name, r.layer) for r in qm.layers], probe_at)
    was_training = qm.training
    qm.eval()
    try:
        # Eq. (10): W_i^d[:, c] = sum_j Conf(x_j) e_ij^d / sum_j Conf(x_j) over class-c samples.
        sums: dict[str, torch.Tensor] = {}
        weight = torch.zeros(n_classes)
        for s in range(0, cx.shape[0], batch_size):
            x, y = cx[s:s + batch_size], cy[s:s + batch_size]
            logits = qm(x)
            conf = torch.softmax(logits.float(), dim=1).gather(1, y[:, None]).squeeze(1)
            onehot = F.one_hot(y, n_classes).float() * conf[:, None]            # [N, K]
            weight += onehot.sum(0)
            for name in names:
                e = pyramid_features(capture.outputs[name], pool_sizes)         # [N, S, D]
                contrib = torch.einsum("nk,nsd->ksd", onehot, e)
                sums[name] = contrib if name not in sums else sums[name] + contrib
        if (weight <= 0).any():
            missing = torch.nonzero(weight <= 0).flatten().tolist()
            raise LowbitError(f"MSQ probes: no calibration sample of class(es) {missing}; "
                              "use a larger or class-balanced calibration set")
        templates = {n: F.normalize(t / weight[:, None, None], dim=2) for n, t in sums.items()}

        correct = torch.zeros(len(names))
        net_correct = 0
        for s in range(0, vx.shape[0], batch_size):
            x, y = vx[s:s + batch_size], vy[s:s + batch_size]
            net_correct += int((qm(x).argmax(1) == y).sum())
            for i, name in enumerate(names):
                e = pyramid_features(capture.outputs[name], pool_sizes)         # [N, S, D]
                scores = torch.einsum("nsd,ksd->nsk", e, templates[name])       # eq. (12)
                p = torch.softmax(scores, dim=2)                                 # eq. (13)
                h = -(p * torch.log(p.clamp_min(1e-12))).sum(dim=2)              # eq. (14)
                fused = (h[:, :, None] * scores).sum(1) / h.sum(1, keepdim=True).clamp_min(1e-12)  # eq. (15)
                correct[i] += (fused.argmax(1) == y).sum()
    finally:
        capture.close()
        qm.train(was_training)
    n = vx.shape[0]
    return ProbeResult(names, (correct / n).tolist(), net_correct / n)
