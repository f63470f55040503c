"""What every trainable quantizer offers on top of the uniform interface."""
from __future__ import annotations

from typing import Any

import torch

from lowbit.errors import RecipeError
from lowbit.quant.quantizer import UniformQuantizer
from lowbit.quant.spec import QuantSpec


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Forward value ``x`` exactly, gradient multiplied by ``scale`` (LSQ's step-size gradient scale).

    Written as x + (y − y.detach()), where y − y.detach() is exactly 0: the old (x − y).detach() + y
    rounded in float32 and gave a step up to an ulp off the one deployed (lowbit.qat.convert), so
    the trained model's eval forward and the deployed model rounded some values differently."""
    y = x * scale
    return x.detach() + (y - y.detach())


def weight_rows(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """The weight as [C, N] rows (one per output channel) or one [1, N] row: what per-channel
    or per-tensor statistics reduce over."""
    return w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)


def per_row(v: torch.Tensor, w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """A per-row statistic ([C] or [1]) shaped to broadcast against the weight ``w``."""
    return v.reshape([-1] + [1] * (w.dim() - 1)) if per_channel else v.reshape(())


MAX_MIDRISE_BITS = 7  # (q + ½)·s is step s/2 on the odd codes 2q + 1: int8 holds them up to 7 bits


def midrise_weight_spec(source: UniformQuantizer, kind: str) -> QuantSpec:
    """The mid-rise grid of ``source``'s width, for kinds whose levels exclude zero (μL2Q,
    DoReFa). Above 7 bits the doubled codes leave int8, so such a layer (the 8-bit first and
    last layers) is refused here and lowbit.qat.convert trains it with LSQ on its own grid."""
    if source.spec.bits > MAX_MIDRISE_BITS:
        raise RecipeError(f"{kind} puts weights on a mid-rise grid, which has no int8 codes at "
                          f"{source.spec.bits} bits ({source.name!r})")
    return source.spec.with_(grid="midrise", signed=True, symmetric=True)


class TrainableQuantizer(UniformQuantizer):
    """A uniform quantizer trained in its own parametrisation.

    Built from a calibrated :class:`UniformQuantizer` (so PTQ is the initialisation) with
    :meth:`from_uniform`; :meth:`deploy` returns the uniform quantizer that reproduces it
    exactly once training is over. ``role`` is "weights" or "activations".
    """

    kind = "trainable"
    roles: tuple[str, ...] = ("weights", "activations")
    # Quantizing a quantized weight gives it back (Q(Q(W)) = Q(W), and Q(W·f)/f for a per-channel
    # factor f ≠ 0 is a fixed point too), so latent weights may be set to their quantized values
    # without changing the forward: the QAT engine's ``snap_at_freeze`` does that for kinds that say so.
    idempotent_weights = False
    # Whether the forward rounds the latent weight it is given, so that one near a threshold can flip
    # between levels at every step (what lowbit.qat.dampen pulls it away from). k-means keeps a fixed
    # assignment and INQ freezes its quantized portion: neither does.
    rounds_latent_weights = True
    # Whether the forward reads the latent weight at all. k-means reads only its centroids (through a
    # fixed assignment): its latent weight gets no gradient, so QAT leaves it out of training, where
    # DDP would otherwise wait for a gradient that never comes (lowbit.qat.convert.to_training_form).
    reads_latent_weight = True
    # whether deploy() gives a codebook (float levels: the layer runs in float, its bias has no int32 grid,
    # in training as after deployment; QuantLayer.quantized_bias)
    deploys_to_codebook = False

    @property
    def integer_kernel(self) -> bool:
        """As the quantizer it deploys to: a kind that becomes a codebook has no integer kernel already
        while it trains (an LQ-Nets input keeps the next layer's bias float, as after deployment)."""
        return not self.deploys_to_codebook and super().integer_kernel

    def __init__(self, source: UniformQuantizer, role: str) -> None:
        need = getattr(self, "grid_required", None)  # binary/ternary kinds: one grid only
        if need is not None and (source.spec.bits, source.spec.grid) != need:
            # e.g. the 8-bit first layer of a binary recipe: lowbit.qat.convert gives it to LSQ
            raise RecipeError(f"{self.kind} needs a {need[0]}-bit {need[1]} grid; {source.name!r} is a "
                              f"{source.spec.bits}-bit {source.spec.grid} grid")
        super().__init__(source.spec, name=source.name)
        self.role = role
        self.signed = source.signed
        self.enabled = source.enabled
        self.calibrated = source.calibrated
        self.scale = source.scale.detach().clone()
        self.zero_point = source.zero_point.detach().clone()
        self.method = self.kind
        self.keep_abs_mean = source.keep_abs_mean
        self._step_factor: torch.Tensor | None = None  # |γ/σ| during quantize_folded only

    @classmethod
    def from_uniform(cls, source: UniformQuantizer, role: str, **options: Any) -> "TrainableQuantizer":
        return cls(source, role, **options)

    def weight_decay_groups(self) -> list[tuple[list[torch.nn.Parameter], float]]:
        """(parameters, weight decay) pairs the optimiser should use for this quantizer's
        own parameters; default: none of them decays."""
        own = [p for p in self.parameters(recurse=False) if p.requires_grad]
        return [(own, 0.0)] if own else []

    def on_epoch_start(self, epoch: int, epochs: int, layer: torch.nn.Module) -> None:
        """Called on the weight quantizer's layer before every epoch (0-based) of ``epochs``, and once
        with ``epoch == epochs`` after the last epoch's steps, before it is validated: a kind with a
        schedule (INQ's growing quantized portion) advances it here; default none."""

    def anneal(self, progress: float) -> None:
        """Called before every epoch with the fraction of training done (epoch / epochs, 0 at the
        start): a kind whose backward sharpens over training (IR-Net's EDE) sets it here; default none."""

    def project_(self, layer: torch.nn.Module) -> None:
        """Called on the weight quantizer's layer after every optimiser step: a kind that
        constrains its latent weights (BinaryConnect's clip) does it here; default none."""

    def follows_bn_factor(self) -> bool:
        """Whether, while its layer trains with BN (lowbit.qat.bn), this weight quantizer's
        step belongs to the weight *before* the BN factor f = γ/σ, the step applied to the
        folded weight W·f being s·|f|. A learned step must (LSQ): if it stayed the step of
        W·f, the quantized output's variance would not follow σ, and the running-variance
        update (which rescales σ until std(y0) = γ) has no fixed point; measured at ResNet-20
        W2A2, σ² grew geometrically to inf. A step recomputed from the weight every forward
        (μL2Q, DoReFa, min-max) follows W·f by itself and needs none of this."""
        return False

    def quantize_folded(self, weight: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        """Q(W·f) with the step s·|f| (only where :meth:`follows_bn_factor`)."""
        self._step_factor = factor.abs()
        try:
            return self(weight)
        finally:
            self._step_factor = None

    def folded_step(self, factor: torch.Tensor) -> torch.Tensor:
        """The step the folded weight W·f is quantized with: s·|f| (what its bias grid uses)."""
        return self.scale * factor.abs().reshape(self.scale.shape)

    def absorb_factor_(self, factor: torch.Tensor) -> None:
        """s ← s·|f| when the BN is folded into the weight for good (lowbit.qat.convert)."""
        with torch.no_grad():
            self.scale.copy_(self.folded_step(factor).abs())

    def deploy_params(self, x: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero_point) of the uniform grid this quantizer puts ``x`` on now."""
        return self.scale.detach().clone(), self.zero_point.detach().clone()

    def deployed_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The values the quantized weight takes (weights only): stored into the layer at
        deployment, so the uniform quantizer that follows reproduces them code for code."""
        with torch.no_grad():
            return self(weight)

    def deploy(self, weight: torch.Tensor | None = None) -> UniformQuantizer:
        """A plain uniform quantizer with this one's current grid."""
        q = UniformQuantizer(self.spec, name=self.name)
        q.signed, q.enabled = self.signed, self.enabled
        scale, zero_point = self.deploy_params(weight)
        q.set_params(scale, zero_point)
        q.calibrated = self.calibrated
        q.method = self.kind
        q.keep_abs_mean = self.keep_abs_mean
        return q

    def extra_repr(self) -> str:
        return f"{self.kind} ({self.role}): " + super().extra_repr()
