"""Between the deployable QuantModel and the form QAT trains, both ways.

``to_training_form`` swaps every enabled quantizer for the recipe's trainable kind (built
from its calibrated grid, so PTQ is the initialisation) and gives BN-folded layers their
BatchNorm back (lowbit.qat.bn). ``to_deployed_form`` undoes both: BN folded into the
weights, each weight replaced by its quantized value, each quantizer by the uniform one
that reproduces it code for code. What comes out is an ordinary QuantModel: artifacts,
ONNX export and the layer table read it as they read a PTQ result.
"""
from __future__ import annotations

from typing import Any

import torch

from lowbit.errors import RecipeError
from lowbit.model.quant_layer import check_xnor_groups
from lowbit.model.quant_model import QuantModel
from lowbit.qat.bn import FoldedBatchNorm
from lowbit.quant.learned.base import TrainableQuantizer
from lowbit.quant.quantizer import UniformQuantizer
from lowbit.quant.registry import check_codebook_source, make_trainable

FALLBACK_KIND = "lsq+"  # for tensors a kind cannot take (PACT/DoReFa on a signed input)
WEIGHT_FALLBACK_KIND = "lsq"  # for layers at other bits than a binary/ternary kind (first/last at 8)


def _swap(qm: QuantModel, q: UniformQuantizer, kind: str, role: str, options: dict[str, Any],
          fallbacks: dict[str, str], weight: torch.Tensor | None = None) -> None:
    # Before any fallback: a codebook (the `kmeans` step's) given to another kind would be read as the
    # uniform grid it is not (its scale field is 1) and silently lost; only kmeans fine-tunes it.
    check_codebook_source(q, kind, role)
    try:
        new = make_trainable(q, kind, role, weight=weight, **options)
    except RecipeError:
        # A kind that cannot take this tensor (PACT on a signed input, a binary kind on the
        # 8-bit first layer) leaves it to LSQ(+), and the run says so.
        fallback = FALLBACK_KIND if role == "activations" else WEIGHT_FALLBACK_KIND
        if kind == fallback:
            raise
        new = make_trainable(q, fallback, role)
        fallbacks[q.name] = fallback
    # where the model already is (train_qat moves it before building these): a kind that makes a
    # tensor of its own elsewhere would otherwise fail, or run on the CPU, at its first step
    qm.replace_quantizer(q, new.to(q.scale.device))


@torch.no_grad()
def attach_batchnorms(qm: QuantModel, batches: list[torch.Tensor], momentum: float = 0.1) -> int:
    """Give every layer a folded BN came from its BN back, with running statistics measured
    on ``batches`` (the quantized model's own pre-BN outputs); returns how many."""
    targets = [r.layer for r in qm.layers if r.name in qm.layer_bn and r.layer.bn is None]
    if not targets:
        return 0
    sums: dict[int, list[torch.Tensor]] = {}

    def hook(layer, _inp, out):  # noqa: ANN001 - torch hook signature
        b = layer.quantized_bias()
        y0 = out if b is None else out - b.reshape([1, -1] + [1] * (out.dim() - 2))
        dims = [0] + list(range(2, y0.dim()))
        n = y0.numel() // y0.shape[1]
        # float64 sums: the variance is E[y²] − μ², which in float32 cancels to noise where |μ| >> σ
        zeros = [torch.zeros(y0.shape[1], dtype=torch.float64), torch.zeros(y0.shape[1], dtype=torch.float64)]
        acc = sums.setdefault(id(layer), [*zeros, torch.zeros((), dtype=torch.float64)])
        y64 = y0.double()
        acc[0] += y64.sum(dims).cpu()
        acc[1] += (y64**2).sum(dims).cpu()
        acc[2] += n

    handles = [layer.register_forward_hook(hook) for layer in targets]
    was_training = qm.training
    qm.eval()
    try:
        for x in batches:
            qm(x.to(next(qm.parameters()).device))
    finally:
        for h in handles:
            h.remove()
        qm.train(was_training)
    for layer in targets:
        s, sq, n = sums[id(layer)]
        mean = s / n
        var = (sq / n - mean**2).clamp_min(0).float()
        mean = mean.float()
        device = layer.module.weight.device
        bias = layer.module.bias.detach() if layer.module.bias is not None else torch.zeros_like(mean)
        layer.bn = FoldedBatchNorm(mean.to(device), var.to(device), bias.to(device), momentum=momentum)
        if layer.module.bias is not None:  # β carries it now; the slot comes back at deployment
            layer.module.bias.zero_()
            layer.module.bias.requires_grad_(False)
    return len(targets)


def to_training_form(qm: QuantModel, weight_kind: str, act_kind: str, weight_options: dict[str, Any] | None = None,
                     act_options: dict[str, Any] | None = None, batches: list[torch.Tensor] | None = None,
                     train_bn: bool = True, bn_momentum: float = 0.1) -> dict[str, Any]:
    """Swap quantizers to trainable kinds (and BN back in); returns what was done."""
    if not qm.calibrated:
        raise RecipeError("QAT starts from a calibrated model: put `calibrate` (or another PTQ step) before `qat`")
    fallbacks: dict[str, str] = {}
    for r in qm.layers:
        if r.layer.quantize_weight:
            own = r.layer.weight_kind  # a per-layer kind (override or plan) wins over the recipe's
            kind, options = (own, r.layer.weight_kind_options) if own else (weight_kind, weight_options or {})
            _swap(qm, r.layer.weight_quantizer, kind, "weights", options, fallbacks, r.layer.weight.detach())
            if not getattr(r.layer.weight_quantizer, "reads_latent_weight", True):  # (k-means: its centroids train)
                r.layer.module.weight.requires_grad_(False)  # no gradient reaches it: out of the optimizer and DDP
    for q in qm.act_quantizers().values():
        if q.enabled:
            _swap(qm, q, act_kind, "activations", act_options or {}, fallbacks)
    for r in qm.layers:  # refused before training rather than at its first step
        q = r.layer.input_ref[0] if r.layer.input_ref else None
        if q is not None and q.enabled and getattr(q, "method", None) == "xnor":
            check_xnor_groups(r.layer)
    attached = attach_batchnorms(qm, batches, bn_momentum) if (train_bn and batches and qm.fold_bn) else 0
    return {"weights": weight_kind, "activations": act_kind, "fallbacks": fallbacks, "batchnorms": attached}


def freeze_batchnorms(qm: QuantModel) -> None:
    """Stop updating BN statistics: from now on the training forward is the folded layer."""
    for r in qm.layers:
        if r.layer.bn is not None:
            r.layer.bn.frozen = True


@torch.no_grad()
def snap_latent_weights(qm: QuantModel) -> list[str]:
    """Set each layer's latent weights to their (deterministic) quantized values, W := Q(W·f)/f
    with f the BN factor γ/σ (1 without a BN), where the weight quantizer is idempotent
    (binary, ternary): the forward is unchanged, and no latent weight is left at a threshold.

    Why: after many epochs such latents gather at their thresholds and flip at every step
    (QAT's weight oscillation); batch statistics re-normalise each channel after the flips,
    frozen ones do not, and a frozen ternary ResNet-20 collapsed within two steps at lr 3.3e-4
    (benchmarks/bn_freeze_probe.py). Returns the layers snapped."""
    snapped = []
    for r in qm.layers:
        layer, q = r.layer, r.layer.weight_quantizer
        if not (layer.quantize_weight and getattr(q, "idempotent_weights", False)):
            continue
        was = q.training
        q.eval()  # the deterministic weight (stochastic BinaryConnect samples in training)
        wq = layer.quantized_weight()
        q.train(was)
        w = layer.module.weight
        if layer.bn is not None:
            f = layer.bn.weight_factor().reshape([-1] + [1] * (w.dim() - 1))
            live = f.abs() > 1e-12  # a channel with γ = 0 keeps its latents (its output is β)
            wq = torch.where(live, wq / torch.where(live, f, torch.ones_like(f)), w)
        w.copy_(wq)
        snapped.append(r.name)
    return snapped


@torch.no_grad()
def to_deployed_form(qm: QuantModel) -> None:
    """Fold BNs, bake quantized weights, and put uniform quantizers back (in place)."""
    for r in qm.layers:
        layer = r.layer
        if layer.bn is not None:
            if layer.bn_factor_follows():  # the step of W becomes the step of W·γ/σ
                layer.weight_quantizer.absorb_factor_(layer.bn.weight_factor())
            w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
            layer.bn = None
            layer.module.weight.copy_(w)
            if layer.module.bias is None:
                layer.module.bias = torch.nn.Parameter(b)
            else:
                layer.module.bias.copy_(b)
                layer.module.bias.requires_grad_(True)
    for r in qm.layers:
        q = r.layer.weight_quantizer
        if isinstance(q, TrainableQuantizer):
            w = r.layer.module.weight
            deployed = q.deploy(w)           # grid first: it is read from the float weight
            w.copy_(q.deployed_weight(w))    # then the weight takes its quantized values
            if not q.reads_latent_weight:    # (to_training_form took it out of training)
                w.requires_grad_(True)
            qm.replace_quantizer(q, deployed.to(q.scale.device))
    for q in list(qm.act_quantizers().values()):
        if isinstance(q, TrainableQuantizer):
            qm.replace_quantizer(q, q.deploy().to(q.scale.device))
