"""Binary weights (seed 001's binary family): BinaryConnect and XNOR-Net.

Both put each weight on one of two levels ±a and are deployed on the 1-bit mid-rise grid
(codes −1, 0 → levels ∓step/2, so step = 2a). They differ in where a comes from and in
what the latent float weights may do:

- **BinaryConnect** (Courbariaux et al. 2015): w_b = sign(w) deterministically, or +1 with
  probability σ_hard(w) = clip((w + 1)/2, 0, 1) (the stochastic variant, training only);
  the gradient passes straight through; after every update the latent weights are clipped
  to [−1, 1]. BinaryConnect's ±1 relies on a BN to rescale; lowbit folds BN into the
  weights, so here the unit is the layer's calibrated binary level a (the MSE-optimal ±a of
  the pretrained weights, per channel), fixed during training: the method runs on w/a.
- **BNN activations** (Hubara/Courbariaux et al. 2016): a_b = sign(a), gradient through
  the straight-through estimator 1_{|a| ≤ 1} (hardtanh's). As for BinaryConnect the unit is
  the calibrated binary level (±a, the MSE-optimal pair for the tensor, fixed): in units of
  a the method is exactly the paper's. The tensor must be signed: the sign of a post-ReLU
  tensor is constant, so binary-activation recipes set ``relu: hardtanh``.
- **XNOR-Net activations** (sec. 3.2): sign(I) with the same STE, and the conv output
  multiplied by K = A ∗ k, A = mean_c |I| at every position and k the conv's box filter
  of 1/(w·h) (same stride and padding): the quantizer keeps A, QuantLayer applies K.
  K carries no gradient here (the paper gives none for it).
- Either activation takes ``ede: true``: IR-Net's annealed tanh gradient (see IRNetWeightQuantizer), t from
  0.1 to 10 over the epochs.
- Either activation takes ``approx_sign: true``: Bi-Real Net's piecewise-quadratic gradient
  2 − 2|a| in place of the box (its eq. (8)); with ``shortcut: bireal`` this is Bi-Real Net.
- **XNOR-Net weights** (Rastegari et al. 2016, sec. 3.1): W ≈ α·sign(W) with α = mean|W|
  per output channel, recomputed from the current weights at every step; the gradient is
  XNOR-Net's: through sign with the window 1_{|W| ≤ 1} and through α's dependence on W.
- **IR-Net weights** (Qin et al. 2020): BinaryConnect's fixed level on the sign of each channel
  balanced and standardized (Libra-PB), with the annealed tanh gradient (EDE); see the class.
"""
from __future__ import annotations

import math

import torch

from lowbit.errors import RecipeError
from lowbit.quant.functional import fill_dead_steps
from lowbit.quant.learned.base import TrainableQuantizer, per_row, weight_rows
from lowbit.quant.quantizer import UniformQuantizer


def approx_sign(x: torch.Tensor) -> torch.Tensor:
    """±1 forward; backward Bi-Real Net's ApproxSign (Liu et al. 2018, eq. (7)-(8)): the
    gradient of F(x) = 2x + x² on [−1, 0), 2x − x² on [0, 1), ±1 outside, i.e. 2 − 2|x|
    inside [−1, 1] and 0 outside: closer to sign's true (impulse) derivative than the box."""
    inner = x.clamp(-1.0, 1.0)
    surrogate = 2 * inner - inner * inner.abs()
    return torch.where(x >= 0, 1.0, -1.0) + (surrogate - surrogate.detach())  # ±1 exactly


def sign_ste(x: torch.Tensor, limit: torch.Tensor | float = 1.0) -> torch.Tensor:
    """±1 (0 maps to +1: the mid-rise grid has no zero), gradient 1 where |x| ≤ limit."""
    inside = torch.where(x.abs() <= limit, x, x.detach())  # gradient 1 on [−limit, limit], ends included
    # ±1 exactly: the STE as sign + (v − v.detach()), whose second term is exactly 0 (v + (sign − v) rounds)
    return torch.where(x >= 0, 1.0, -1.0) + (inside - inside.detach())


class _BinaryWeights(TrainableQuantizer):
    roles = ("weights",)
    idempotent_weights = True  # ±a (BinaryConnect's fixed level, XNOR's mean |W|) signs back to itself
    grid_required = (1, "midrise")

    def __init__(self, source: UniformQuantizer, role: str) -> None:
        super().__init__(source, role)
        self.spec = source.spec.with_(signed=True, symmetric=True)
        self.signed = True

    def _deploy_step(self, level: torch.Tensor) -> torch.Tensor:
        return (2 * level).reshape(-1 if self.spec.per_channel else ()).detach().clone()


class BinaryConnectQuantizer(_BinaryWeights):
    kind = "binaryconnect"

    def __init__(self, source: UniformQuantizer, role: str, stochastic: bool = False) -> None:
        super().__init__(source, role)
        # The level comes from the calibrated 1-bit grid: its step is 2a.
        self.register_buffer("level", (source.scale.detach() / 2).clamp_min(1e-12).clone())
        self.stochastic = bool(stochastic)
        # Where the stochastic sign draws from: the QAT engine sets a generator it seeds per step, the
        # same on every process (None: the global generator).
        self.draws: torch.Generator | None = None
        self.scale = self._deploy_step(self.level)

    def follows_bn_factor(self) -> bool:
        # The level is calibrated once, not recomputed from the weight: like LSQ's step it must
        # belong to the weight before the BN factor, or BN's running variance has no fixed
        # point (TrainableQuantizer.follows_bn_factor; ResNet-20 at lr 0.002 went to NaN).
        return self.spec.per_channel and self.spec.ch_axis == 0

    def _level(self, x: torch.Tensor) -> torch.Tensor:
        a = per_row(self.level, x, self.spec.per_channel)
        if self._step_factor is not None:  # quantizing W·f: the level of W·f is a·|f|
            a = a * per_row(self._step_factor, x, True)
        return a

    def absorb_factor_(self, factor: torch.Tensor) -> None:
        with torch.no_grad():
            self.level.mul_(factor.abs().reshape(self.level.shape))
            self.scale = self._deploy_step(self.level)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        a = self._level(x)
        u = x / a                                               # BinaryConnect's units: ±1 are the levels
        if self.stochastic and self.training:
            p = torch.clamp((u.detach() + 1) / 2, 0, 1)          # σ_hard(w)
            b = torch.where(torch.rand(p.shape, generator=self.draws, device=p.device, dtype=p.dtype) < p, 1.0, -1.0)
        else:
            b = torch.where(u >= 0, 1.0, -1.0)
        wb = b + (u - u.detach())  # straight through, ±1 exactly (u + (b − u) rounds): ±a as deployed
        return wb * a

    def deployed_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The deterministic sign, whatever mode the model is in (a deployed model does not sample)."""
        with torch.no_grad():
            a = per_row(self.level, weight, self.spec.per_channel)
            return torch.where(weight >= 0, a, -a)

    def project_(self, layer: torch.nn.Module) -> None:
        """Clip the latent weights to [−1, 1] in units of a (BinaryConnect, after each update)."""
        w = layer.module.weight
        bound = per_row(self.level, w, self.spec.per_channel)
        if getattr(layer, "bn", None) is not None and not self.follows_bn_factor():
            # the quantizer sees W·γ/σ on a level of its own: bound W accordingly (a level that
            # follows the factor is W's own, so W is clipped to ±a as it is)
            f = layer.bn.weight_factor().detach().abs().clamp_min(1e-12)
            bound = bound / f.reshape([-1] + [1] * (w.dim() - 1))
        with torch.no_grad():
            w.copy_(torch.maximum(torch.minimum(w, bound), -bound))

    def deploy_params(self, x: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        step = self._deploy_step(self.level)
        return step, torch.zeros_like(step)


EDE_T_MIN, EDE_T_MAX = 0.1, 10.0  # IR-Net's T_min = 10^-1, T_max = 10^1 (sec. 4)


def ede_factors(t_min: float, t_max: float, progress: float) -> tuple[float, float]:
    """IR-Net's error decay estimator schedule (Qin et al. 2020, eq. 11): t = T_min·10^(p·log10(T_max/T_min))
    at the fraction p of training done, k = max(1/t, 1): g(x) = k·tanh(t·x) is ≈ the identity's slope at
    the start and close to sign at the end."""
    t = t_min * 10 ** (progress * math.log10(t_max / t_min))
    return t, max(1.0 / t, 1.0)


class IRNetWeightQuantizer(BinaryConnectQuantizer):
    """IR-Net's binary weights (Qin et al., CVPR 2020):

    - **Libra-PB** (sec. 3.1, eq. 6–9): each output channel is balanced and standardized before
      its sign, Ŵ = (W − mean W)/std W, so half its weights go to +1 (the binary weights carry
      the most information) whatever the channel's offset; the gradient flows through the
      mean and the std as well. The paper scales sign(Ŵ) by 2^round(log2 mean|Ŵ|) and lets a
      BN restore the magnitude; lowbit folds BN, so the level is BinaryConnect's calibrated
      per-channel a (fixed), and the layer deploys as ±a on the 1-bit mid-rise grid.
    - **EDE** (sec. 3.2, eq. 10–11): the backward of sign is g'(x) = k·t·(1 − tanh²(t·x)), with t
      raised from T_min to T_max over training (the QAT engine calls ``anneal`` before every
      epoch with the fraction done, as the paper's per-epoch schedule) and k = max(1/t, 1).
    - No latent clipping (IR-Net has none: standardization makes the forward scale-free).
    """

    kind = "irnet"

    def __init__(self, source: UniformQuantizer, role: str, balance: bool = True, ede: bool = True,
                 t_min: float = EDE_T_MIN, t_max: float = EDE_T_MAX) -> None:
        super().__init__(source, role)
        if not 0 < t_min <= t_max:
            raise RecipeError(f"irnet: need 0 < t_min <= t_max, got t_min={t_min}, t_max={t_max}")
        self.balance, self.ede = bool(balance), bool(ede)
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.t, self.k = ede_factors(self.t_min, self.t_max, 0.0)

    def anneal(self, progress: float) -> None:
        self.t, self.k = ede_factors(self.t_min, self.t_max, progress)

    def standardized(self, x: torch.Tensor) -> torch.Tensor:
        """Ŵ = (W − mean)/std per output channel (eq. 8); a constant channel stays 0 (sign +1)."""
        if not self.balance:
            return x / self._level(x)  # BinaryConnect's units, for the ablation
        rows = weight_rows(x, self.spec.per_channel)
        centred = rows - rows.mean(1, keepdim=True)
        std = centred.pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-12)
        return (centred / std).reshape(x.shape)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        u = self.standardized(x)
        b = torch.where(u >= 0, 1.0, -1.0)
        if self.ede:
            surrogate = self.k * torch.tanh(self.t * u)  # eq. 10: its slope k·t·(1 − tanh²(t·u)) is the backward
            wb = b + (surrogate - surrogate.detach())
        else:
            wb = sign_ste(u, 1.0)
        return wb * self._level(x)

    def deployed_weight(self, weight: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            a = per_row(self.level, weight, self.spec.per_channel)
            return torch.where(self.standardized(weight) >= 0, a, -a) if self.balance else super().deployed_weight(weight)

    project_ = TrainableQuantizer.project_  # no clip: IR-Net leaves the latent weights free (weight decay bounds them)


class XNORWeightQuantizer(_BinaryWeights):
    kind = "xnor"
    roles = ("weights", "activations")  # activations: XNORActivationQuantizer

    @classmethod
    def from_uniform(cls, source: UniformQuantizer, role: str, **options):
        if role == "activations":
            return XNORActivationQuantizer(source, role, **options)
        return cls(source, role, **options)

    def alpha(self, w: torch.Tensor) -> torch.Tensor:
        """α = mean|W| per output channel (per tensor if the recipe says so), with its gradient."""
        alpha = weight_rows(w, self.spec.per_channel).abs().mean(1)
        # an all-zero channel: a tiny step (mid-rise has no 0 level), not 1e-12, which its bias cannot be stored at
        return per_row(fill_dead_steps(alpha, alpha > 0), w, self.spec.per_channel)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        a = self.alpha(x)
        with torch.no_grad():
            self.scale = self._deploy_step(a)
        return a * sign_ste(x, 1.0)

    def deploy_params(self, x: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if x is None:
            return self.scale.detach().clone(), self.zero_point.detach().clone()
        step = self._deploy_step(self.alpha(x.detach()))
        return step, torch.zeros_like(step)


class BNNActivationQuantizer(TrainableQuantizer):
    kind = "bnn"
    roles = ("activations",)
    grid_required = (1, "midrise")

    def __init__(self, source: UniformQuantizer, role: str, approx_sign: bool = False, ede: bool = False) -> None:
        super().__init__(source, role)
        if approx_sign and ede:
            raise RecipeError(f"{self.kind} activations: approx_sign and ede are two backwards for sign; pick one")
        self.spec = source.spec.with_(signed=True, symmetric=True)
        self.signed = True
        self.register_buffer("level", (source.scale.detach() / 2).clamp_min(1e-12).clone())
        self._checked = False
        self.approx_sign, self.ede = bool(approx_sign), bool(ede)
        self.t, self.k = ede_factors(EDE_T_MIN, EDE_T_MAX, 0.0)

    def anneal(self, progress: float) -> None:
        if self.ede:
            self.t, self.k = ede_factors(EDE_T_MIN, EDE_T_MAX, progress)

    def sign(self, x: torch.Tensor) -> torch.Tensor:
        """sign(x) for x in units of the level, with the box STE, Bi-Real's ApproxSign or IR-Net's EDE."""
        if self.ede:  # IR-Net eq. 10-11 on activations: backward k·t·(1 − tanh²(t·x)), t annealed
            surrogate = self.k * torch.tanh(self.t * x)
            return torch.where(x >= 0, 1.0, -1.0) + (surrogate - surrogate.detach())
        return approx_sign(x) if self.approx_sign else sign_ste(x, 1.0)

    def check_signed(self, x: torch.Tensor) -> None:
        if not self._checked:  # once: a constant sign is a layout mistake, not a result
            if bool((x.detach() >= 0).all()):
                raise RecipeError(f"{self.kind} activations: {self.name!r} is never negative (a ReLU output?), so "
                                  "its sign is constant; set `relu: hardtanh` in the recipe so binary layers see "
                                  "signed inputs")
            self._checked = True

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        self.check_signed(x)
        return self.level * self.sign(x / self.level)  # BNN: sign forward, 1_{|a| ≤ 1} backward

    def deploy_params(self, x: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        step = (2 * self.level).reshape(()).detach().clone()
        return step, torch.zeros_like(step)


class XNORActivationQuantizer(BNNActivationQuantizer):
    """sign(I) in {−1, +1} (step 2, levels ±1); the magnitude comes from K, which the
    layer computes from the A this quantizer keeps (``keep_abs_mean``)."""

    kind = "xnor"

    def __init__(self, source: UniformQuantizer, role: str, approx_sign: bool = False, ede: bool = False) -> None:
        super().__init__(source, role, approx_sign, ede)
        # the STE's window: the calibrated binary level (a buffer, so it moves with the model; not saved:
        # it is rebuilt from the calibrated source, as the level is)
        self.register_buffer("window", self.level.clone(), persistent=False)
        self.level = torch.ones_like(self.level)  # output ±1: K scales the layer's output
        self.keep_abs_mean = True

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        self.check_signed(x)
        return self.sign(x / self.window)  # sign(I); gradient as hardtanh(I / a) (or ApproxSign)
