"""INQ (Zhou et al. 2017, seed 001's power-of-two family): incremental network quantization.

Weights become powers of two or zero, P = {±2^n1, …, ±2^n2, 0}, with n1 = floor(log2(4s/3)),
s = max|W| of the layer, and n2 = n1 + 1 − 2^(b−1)/2 (one of the b bits codes zero; INQ
eq. 2): 2^(b−1) + 1 levels. Each weight goes to its nearest level (INQ eq. 3: the
thresholds are the midpoints, 3β/2 between β and 2β, β/2 between 0 and the smallest β).

``top_level: mse`` (an option, not the paper's) lowers n1 to the power of two whose level set
has the least squared error on the tensor: with only two magnitudes at 3 bits, eq. 2's n1
(set by the one largest weight) sends 87% of ResNet-20's conv weights to zero (relative error
0.74); the least-squares n1, two powers lower in most layers, 43% (0.36), clipping the few
largest weights to 2^n1. At 5 bits the two choices agree on every ResNet-20 conv.

Not all at once: the weights are partitioned by magnitude, and at each stage the largest
of the still-float weights join the quantized set until the accumulated portions are 50%,
75%, 87.5% and 100% (the paper's schedule). Quantized weights are fixed (INQ eq. 4 masks their
update out): each keeps the level it had when frozen, held as an index into the level set (an
integer buffer, which a weight average copies rather than blends), so weight decay and momentum
moving its latent value cannot move it; the float rest retrains to make up for them. Stages start at evenly spaced epochs of the QAT
run; the last portion (100%) is quantized when training ends, after the last epoch's steps and
before that epoch is validated (so the score reported is the deployed model's). Deployed as a
codebook of the level set (lowbit.quant.codebook), b-bit indices.
"""
from __future__ import annotations

import math

import torch

from lowbit.errors import RecipeError
from lowbit.quant.codebook import CodebookQuantizer
from lowbit.quant.learned.base import TrainableQuantizer
from lowbit.quant.quantizer import UniformQuantizer

PORTIONS = (0.5, 0.75, 0.875)  # accumulated fractions quantized before training ends; then 100%
# At b bits INQ has 2^(b−1) + 1 levels, the smallest 2^(1 − 2^(b−2)) of the largest: at 8 bits 129 float levels
# down to 1e-19 of it (a codebook no integer kernel runs; relative MSE 0.039 on a normal weight, as at 5 bits,
# where int8's is 6e-5). The layers a recipe keeps at 8 bits (first/last) are refused here, and
# lowbit.qat.convert trains them with LSQ on their int8 grid, as it does for LQ-Nets (lqnet.MAX_WEIGHT_BITS).
MAX_WEIGHT_BITS = 7


TOP_LEVELS = ("max", "mse")
MSE_SEARCH = 12  # powers of two below eq. 2's n1 that ``top_level: mse`` tries


def _level_set(n1: int, bits: int, dev: torch.device) -> torch.Tensor:
    n2 = n1 + 1 - 2 ** (bits - 1) // 2
    pos = torch.tensor([2.0**n for n in range(n2, n1 + 1)], device=dev)
    return torch.cat([-pos.flip(0), torch.zeros(1, device=dev), pos])


def level_indices(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Each entry's nearest level's index in the sorted ``levels`` (INQ eq. 3: thresholds at the midpoints)."""
    return torch.bucketize(x.detach().contiguous(), (levels[1:] + levels[:-1]) / 2)


def nearest_levels(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Each entry's nearest level (INQ eq. 3)."""
    return levels[level_indices(x, levels)]


def power_of_two_levels(weight: torch.Tensor, bits: int, top_level: str = "max") -> torch.Tensor:
    """INQ's sorted level set {−2^n1 … −2^n2, 0, 2^n2 … 2^n1} for this weight tensor; n1 from
    max|W| (INQ eq. 2, ``top_level="max"``) or the n1 ≤ that one whose levels round the tensor with
    the least squared error (``"mse"``)."""
    if top_level not in TOP_LEVELS:
        raise RecipeError(f"inq top_level {top_level!r}: expected one of {list(TOP_LEVELS)}")
    w = weight.detach()
    s = float(w.abs().max())
    dev = weight.device
    if not math.isfinite(s):
        raise RecipeError("inq: the weight tensor holds inf or NaN; its power-of-two levels are undefined")
    if s <= 0:
        return torch.zeros(1, device=dev)
    n1 = math.floor(math.log2(4 * s / 3))
    if top_level == "max":
        return _level_set(n1, bits, dev)
    w = w.float()
    candidates = [_level_set(n1 - k, bits, dev) for k in range(MSE_SEARCH + 1)]
    errors = [float((nearest_levels(w, c) - w).square().sum()) for c in candidates]
    return candidates[min(range(len(errors)), key=errors.__getitem__)]  # ties: the higher n1


class INQQuantizer(TrainableQuantizer):
    kind = "inq"
    deploys_to_codebook = True
    roles = ("weights",)
    needs_weight = True
    per_tensor_only = True
    rounds_latent_weights = False  # quantized portions are frozen; the float portion is not rounded

    def __init__(self, source: UniformQuantizer, role: str, weight: torch.Tensor, top_level: str = "max") -> None:
        if source.spec.bits > MAX_WEIGHT_BITS:  # the 8-bit first/last layers keep LSQ's integer grid
            raise RecipeError(f"inq weights are for {MAX_WEIGHT_BITS} bits or fewer; {source.name!r} has "
                              f"{source.spec.bits}")
        super().__init__(source, role)
        if self.spec.bits < 2:
            raise RecipeError("inq needs at least 2 bits (one codes zero)")
        self.spec = source.spec.with_(signed=True, symmetric=True)
        dev = source.scale.device  # QAT builds its quantizers after the model moved to the training device
        self.register_buffer("levels", power_of_two_levels(weight, self.spec.bits, top_level).to(dev))
        self.register_buffer("frozen", torch.zeros(weight.shape, dtype=torch.bool, device=dev))
        # the level index each frozen weight took, taken on its first use after freezing (``captured``)
        self.register_buffer("frozen_codes", torch.zeros(weight.shape, dtype=torch.long, device=dev))
        self.register_buffer("captured", torch.zeros(weight.shape, dtype=torch.bool, device=dev))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001 - torch hook
        """A checkpoint written before the levels were held (only ``frozen``): they are taken again
        from the latent weights on the next use, which is what that version's forward read."""
        for name, like in (("frozen_codes", self.frozen_codes), ("captured", self.captured)):
            state_dict.setdefault(prefix + name, torch.zeros_like(like))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def portion_at(self, epoch: int, epochs: int) -> float:
        """Accumulated portion quantized during ``epoch`` (0-based) of ``epochs``; 1 from ``epochs`` on
        (the end of training: lowbit.qat.engine.finish_schedules)."""
        if epoch >= epochs:
            return 1.0
        stage = min(len(PORTIONS) - 1, epoch * len(PORTIONS) // max(epochs, 1))
        return PORTIONS[stage]

    @torch.no_grad()
    def on_epoch_start(self, epoch: int, epochs: int, layer: torch.nn.Module) -> None:
        self.freeze_portion(layer.weight.detach(), self.portion_at(epoch, epochs))

    @torch.no_grad()
    def freeze_portion(self, weight: torch.Tensor, portion: float) -> None:
        """Add the largest still-float weights to the quantized set until ``portion`` of all are in it."""
        target = round(portion * weight.numel())
        need = target - int(self.frozen.sum())
        if need <= 0:
            return
        magnitude = weight.abs().reshape(-1).masked_fill(self.frozen.reshape(-1), -1.0)
        chosen = torch.topk(magnitude, need).indices
        flat = self.frozen.reshape(-1).clone()
        flat[chosen] = True
        self.frozen.copy_(flat.reshape(self.frozen.shape))

    def level_index(self, x: torch.Tensor) -> torch.Tensor:
        """Each weight's nearest level's index in ``levels`` (INQ eq. 3: thresholds at the midpoints)."""
        return level_indices(x, self.levels)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Each weight's nearest level (INQ eq. 3)."""
        return nearest_levels(x, self.levels)

    @torch.no_grad()
    def held_levels(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen weights' levels; a weight frozen since the last call takes its nearest
        level of ``x`` now (on_epoch_start freezes on the same weight the next forward reads)."""
        pending = self.frozen & ~self.captured
        if bool(pending.any()):
            self.frozen_codes.copy_(torch.where(pending, self.level_index(x), self.frozen_codes))
            self.captured.copy_(self.frozen)
        return self.levels[self.frozen_codes]

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        held = self.held_levels(x).to(x.dtype)
        return torch.where(self.frozen, held, x)  # fixed where quantized, training elsewhere

    def deployed_weight(self, weight: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # the last portion (100%): the still-float weights take their nearest level
            return torch.where(self.frozen, self.held_levels(weight).to(weight.dtype), self.project(weight))

    def deploy(self, weight: torch.Tensor | None = None) -> UniformQuantizer:
        return CodebookQuantizer(self.spec, self.levels, name=self.name, method="inq")
