"""BatchNorm brought back for training a BN-folded layer, folded again at the end.

lowbit folds BN into the preceding conv when it builds a QuantModel, because that folded
layer is what an integer runtime runs. Training the folded layer directly loses what BN
gives training (batch-statistics normalisation); merging a BN trained separately after QAT
changes the quantized weights and costs other toolkits 5-7 points. Here (Jacob et al. 2018,
section 3.2; Krishnamoorthi 2018, "BN folding" in training) the layer keeps its weight W and
a BN (γ, β, running μ, σ²) over its pre-BN output z = conv(x, W), and always quantizes the
*folded* weight W·γ/σ — the deployed one:

  y0 = conv(x_q, Q(W·γ/σ))                     (one convolution; no float copy)
  BN training:  y = (y0 − mean(y0))·σ/σ_B + β   (= γ(z − μ_B)/σ_B + β with z = y0·σ/γ)
  BN frozen:    y = y0 + (β − γμ/σ)             (exactly the folded layer)

so after ``freeze`` the training forward *is* the integer model. The BN is initialised
from the folded layer and its real output statistics, which keeps the folded layer's
function unchanged (W·γ/σ = W_folded, β − γμ/σ = b_folded).
"""
from __future__ import annotations

import torch
from torch import nn


class FoldedBatchNorm(nn.Module):
    """Per-output-channel BN state of one layer, trained with it and folded into it."""

    def __init__(self, mean: torch.Tensor, var: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5,
                 momentum: float = 0.1) -> None:
        super().__init__()
        var = var.clamp_min(0)
        self.eps, self.momentum = float(eps), float(momentum)
        self.register_buffer("running_mean", mean.detach().clone())
        self.register_buffer("running_var", var.detach().clone())
        # γ = σ and β = b + μ reproduce the folded layer exactly (see the module docstring).
        self.gamma = nn.Parameter(torch.sqrt(var + eps).detach().clone())
        self.beta = nn.Parameter((bias + mean).detach().clone())
        self.frozen = False

    def sigma(self) -> torch.Tensor:
        return torch.sqrt(self.running_var + self.eps)

    def weight_factor(self) -> torch.Tensor:
        """γ/σ: multiplies each output channel of the layer's weight."""
        return self.gamma / self.sigma()

    def folded_bias(self) -> torch.Tensor:
        return self.beta - self.gamma * self.running_mean / self.sigma()

    def normalise(self, y0: torch.Tensor) -> torch.Tensor:
        """Training-mode BN on the output of the folded-weight convolution (no bias)."""
        from lowbit.qat.distributed import active

        if not active():
            return self._normalise_native(y0)
        return self._normalise_global(y0)

    def _normalise_native(self, y0: torch.Tensor) -> torch.Tensor:
        """The same function through torch's fused batch_norm: z = y0·σ/γ is the pre-BN
        output, and BN(z) = γ(z − μ_B)/√(σ_B² + ε) + β is term for term the expression of
        :meth:`_normalise_global` (one fused kernel each way instead of five elementwise
        passes; the W4A4 LSQ step −4%, benchmarks/results/qat_step_time_bn.json). A channel with γ = 0 outputs β either way;
        its z is taken at γ = 1 and its running statistics are kept, as there."""
        g = self.gamma
        live = g.detach().abs() > 1e-12
        safe = torch.where(live, g, torch.ones_like(g))
        z = y0 * (self.sigma() / safe).reshape([1, -1] + [1] * (y0.dim() - 2))
        # batch_norm updates copies (its backward keeps them, so they must not change after it)
        mean, var = self.running_mean.clone(), self.running_var.clone()
        out = torch.nn.functional.batch_norm(z, mean, var, g, self.beta, True, self.momentum, self.eps)
        with torch.no_grad():  # (no host sync: a where over C values, not a test of live.all())
            self.running_mean.copy_(torch.where(live, mean, self.running_mean))
            self.running_var.copy_(torch.where(live, var, self.running_var))
        return out

    def _normalise_global(self, y0: torch.Tensor) -> torch.Tensor:
        """Statistics of the global batch, summed over processes under DDP (like SyncBN)."""
        from lowbit.qat.distributed import all_reduce_sum

        dims = [0] + list(range(2, y0.dim()))
        # Statistics of the global batch (summed over processes under DDP, like SyncBN).
        count = all_reduce_sum(torch.tensor(float(y0.numel() // y0.shape[1]), device=y0.device))
        mean0 = all_reduce_sum(y0.sum(dims)) / count
        shape = [1, -1] + [1] * (y0.dim() - 2)
        centred = y0 - mean0.reshape(shape)
        # Two passes, not E[y²] − mean², which cancels badly when |mean| >> std.
        var0 = all_reduce_sum((centred * centred).sum(dims)) / count
        ratio = self.gamma.abs() / torch.sqrt(var0 + self.eps * (self.gamma / self.sigma()) ** 2)  # σ/σ_B
        with torch.no_grad():
            n = float(count)
            g = self.gamma.detach()
            live = g.abs() > 1e-12  # a channel with γ = 0 outputs β whatever its statistics
            scale = self.sigma() / torch.where(live, g, torch.ones_like(g))  # z = y0·σ/γ
            batch_mean = mean0.detach() * scale
            batch_var = var0.detach() * scale**2 * (n / max(n - 1, 1))
            m = self.momentum
            self.running_mean.copy_(torch.where(live, (1 - m) * self.running_mean + m * batch_mean, self.running_mean))
            self.running_var.copy_(torch.where(live, (1 - m) * self.running_var + m * batch_var, self.running_var))
        return centred * ratio.reshape(shape) + self.beta.reshape(shape)
