"""A quantized network as a float model of its own architecture: the start of progressive
quantization, where a network trained at b bits becomes the pretrained model of a run at fewer
bits (Zhuang et al. 2018 train 4 → 2 bits this way; lowbit measures W3A3 → W2A2).

Each quantized layer of the copy holds the QuantModel's dequantized weight and its float bias;
where the original folded a BatchNorm into the layer, that BN becomes the identity carrying the
bias (γ = 1, μ = 0, σ = 1, β = b), so quantizing the copy folds it back to exactly the same
layer and QAT can still train a BN there. Activation quantizers are dropped:
the copy computes the QuantModel's function with float activations.

``weights="latent"`` takes the float weights under the quantizers instead (of a model in its QAT
training form: the latent weights with the trained BN folded in, ``QuantLayer.weight``). Those are
what a progressive run should start from: a deployed 3-bit weight sits *exactly* on its grid,
and exact zeros all land on +½ step of a mid-rise grid (floor(0) = 0), a bias in every layer that
left ResNet-20 at chance when its W3A3-trained weights were re-quantized at 2 or 3 bits (measured).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from lowbit.errors import LowbitError, UnsupportedModelError
from lowbit.model import graph as G
from lowbit.model.fold_bn import foldable_batchnorms
from lowbit.model.quant_layer import QUANTIZABLE
from lowbit.model.quant_model import QuantModel


def _batchnorm_after(model: nn.Module) -> dict[str, str]:
    """Layer name → the BN that quantization folds into it (the same rule as fold_batchnorms)."""
    gm = G.trace(copy.deepcopy(model))  # the tracer QuantModel uses: Conv/Linear subclasses stay one call
    return {str(layer.target): str(bn.target) for layer, bn in foldable_batchnorms(gm, QUANTIZABLE)}


def _set_identity(bn: nn.Module, bias: torch.Tensor) -> None:
    """BN(z) = z + bias in eval mode; folding it gives W' = W, b' = bias."""
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0 - bn.eps)  # σ = sqrt(var + eps) = 1
    if bn.weight is not None:
        bn.weight.fill_(1.0)
    if bn.bias is None:
        raise UnsupportedModelError(f"{type(bn).__name__} without an affine bias cannot carry the layer's bias")
    bn.bias.copy_(bias)


@torch.no_grad()
def as_float_model(qm: QuantModel, like: nn.Module, weights: str = "quantized", rewritten: bool = False) -> nn.Module:
    """A copy of ``like`` (the float model ``qm`` was made from, or one of its architecture)
    holding ``qm``'s quantized weights (``weights="latent"``: the float weights under its
    quantizers) and its layers' biases, with float activations. A layer that trains its BN
    contributes that BN with its running statistics folded in, as in ``qm.eval()``.

    Why: to quantize a trained low-bit network again at fewer bits, e.g.
    ``lowbit.quantize(as_float_model(qm_w3a3, model), "w2a2-lsq", calib, train=..., teacher=model)``.

    ``rewritten=True`` accepts a QuantModel whose recipe rewrote the graph (``relu: hardtanh``,
    ``shortcut: bireal``): the copy then holds the weights of the rewritten network's layers but
    computes ``like``'s function, so it is only a start for a recipe that rewrites the graph the
    same way (two-stage binary training: sign activations first, then binary weights).
    """
    if not isinstance(qm, QuantModel):
        raise LowbitError(f"as_float_model takes a QuantModel, got {type(qm).__name__}")
    if qm.float_model is not None and not rewritten:
        raise UnsupportedModelError("this QuantModel's recipe rewrote the network's graph (relu: hardtanh or "
                                    "shortcut: bireal), which the float architecture cannot hold; pass "
                                    "rewritten=True to take its weights as the start of a recipe that rewrites it "
                                    "the same way")
    if weights not in ("quantized", "latent"):
        raise LowbitError(f"weights must be 'quantized' or 'latent', got {weights!r}")
    out = copy.deepcopy(like).eval()
    # what quantization left as it was or trained outside the layers (an unfolded BN, ...)
    own = out.state_dict()
    out.load_state_dict({k: v for k, v in qm.net.state_dict().items()
                         if k in own and own[k].shape == v.shape}, strict=False)
    modules = dict(out.named_modules())
    folded_into = _batchnorm_after(out) if qm.fold_bn and qm.mode == "graph" else {}
    layers = set(qm.layers.names())
    for r in qm.layers:
        target = modules.get(r.name)
        if not isinstance(target, QUANTIZABLE):
            raise UnsupportedModelError(f"layer {r.name!r} of the QuantModel is not a Conv/Linear layer of "
                                        f"{type(like).__name__}: pass the float model it was quantized from")
        weight = r.layer.quantized_weight() if weights == "quantized" else r.layer.weight
        # its bias is float: its int32 grid belongs to quantized inputs, which the copy drops
        bn_name = folded_into.get(r.name)
        _place(target, r.name, weight, r.layer.bias, modules[bn_name] if bn_name else None, like)
    # A keep_float layer whose BN quantization folded: the state dict loaded its folded weight (same key),
    # so its BN, still live in the copy, would apply a second time; it carries the folded bias instead.
    for name, bn_name in folded_into.items():
        if name in layers:
            continue
        try:
            src = qm.net.get_submodule(name)
        except AttributeError:
            raise UnsupportedModelError(f"layer {name!r} is not in the QuantModel: pass the float model it was "
                                        "quantized from") from None
        _place(modules[name], name, src.weight, src.bias, modules[bn_name], like)
    return out


def _place(target: nn.Module, name: str, weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.Module | None,
           like: nn.Module) -> None:
    """``target`` (a layer of the copy) computes ``weight``·x + ``bias``: through ``bn`` made the identity
    carrying the bias where quantization folded that BN into the layer, else through its own bias."""
    weight = weight.detach()
    if tuple(weight.shape) != tuple(target.weight.shape):
        raise UnsupportedModelError(f"layer {name!r}: the QuantModel's weight is {tuple(weight.shape)}, "
                                    f"{type(like).__name__}'s {tuple(target.weight.shape)}: pass the float model "
                                    "it was quantized from (widened, for a widening recipe)")
    target.weight.copy_(weight.to(target.weight))
    bias = torch.zeros(weight.shape[0]) if bias is None else bias.detach()
    if bn is not None:
        _set_identity(bn, bias.to(target.weight))
        if target.bias is not None:
            target.bias.zero_()
    elif target.bias is not None:
        target.bias.copy_(bias.to(target.bias))
    elif bool(bias.ne(0).any()):
        target.bias = nn.Parameter(bias.to(target.weight).clone())
