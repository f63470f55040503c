"""The quantized layer: a float Conv/Linear whose weight passes through a quantizer."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import RecipeError
from lowbit.quant.codebook import CodebookQuantizer
from lowbit.quant.functional import round_ste
from lowbit.quant.quantizer import UniformQuantizer
from lowbit.quant.spec import QuantSpec, weight_spec_at

QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)


def custom_op(module: nn.Module) -> str | None:
    """What a Conv/Linear subclass overrides of its base class's op (``forward``, ``_conv_forward``), or None.

    A quantized layer runs the base class's op on the quantized weight, and BN folding scales the weight
    that op reads: a subclass computing something else (a weight-standardised conv) would silently lose
    its own computation, so only layers running their base class's op are quantized or folded into.
    """
    base = next((b for b in QUANTIZABLE if isinstance(module, b)), None)
    if base is None:
        return None
    for method in ("forward", "_conv_forward"):
        if getattr(type(module), method, None) is not getattr(base, method, None):
            return f"{base.__name__}.{method}"
    return None


def layer_kind(module: nn.Module) -> str:
    """Kind label for the layer table (depthwise/grouped convolutions named as such)."""
    name = type(module).__name__
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups > 1:
        depthwise = module.groups == module.in_channels == module.out_channels
        return f"{name}-{'dw' if depthwise else 'g' + str(module.groups)}"
    return name


def check_xnor_groups(layer: "QuantLayer") -> None:
    """XNOR-Net's input scale K averages |I| over the input channels a conv output reads: for a grouped
    (or depthwise) conv those are its group's, not all of them, which K = mean_c |I| does not do: refused."""
    groups = getattr(layer.module, "groups", 1)
    if groups != 1:
        raise RecipeError(f"layer {layer.name!r}: XNOR-Net activations scale a conv's output by the mean |input| "
                          f"over all input channels, and a grouped conv (groups={groups}) reads only its group's; "
                          "use activations.quantizer bnn for this model")


class QuantLayer(nn.Module):
    """Runs the wrapped layer's own op with a fake-quantized weight.

    The float weight stays the master copy (algorithms such as AdaRound or QAT update it
    or the quantizer); ``input_quantizer`` is used only in the hook fallback, where no
    graph exists to place activation quantizers on tensors.
    """

    def __init__(self, module: nn.Module, weight_spec: QuantSpec, name: str) -> None:
        super().__init__()
        if not isinstance(module, QUANTIZABLE) or custom_op(module) is not None:
            raise TypeError(f"cannot wrap {type(module).__name__}: only Conv1d, Conv2d and Linear running their own op")
        self.module = module
        self.name = name
        self.kind = layer_kind(module)
        # Output channels are dim 0 of Conv and Linear weights alike.
        self.weight_quantizer = UniformQuantizer(weight_spec.with_(ch_axis=0), name=f"{name}.weight")
        # The recipe's weight grid: bit changes derive from it (1 bit -> binary, see weight_spec_at).
        self.base_weight_spec = self.weight_quantizer.spec
        self.input_quantizer: UniformQuantizer | None = None
        # The quantizer of this layer's input (a plain tuple, so it is not registered as a
        # submodule twice): its scale fixes the int32 bias grid.
        self.input_ref: tuple[UniformQuantizer, ...] = ()
        self.quantize_weight = True
        # Set by learned-rounding algorithms while they optimise (AdaRound): replaces the
        # quantizer's round-to-nearest for this layer's weight.
        self.weight_fn: Callable[[], torch.Tensor] | None = None
        self.macs: int | None = None
        # MACs of this network pass's calls so far, while QuantModel counts them (None: not counting):
        # a layer called twice in one pass does its work twice
        self.macs_pass: int | None = None
        # Set only while QAT trains this layer with its BatchNorm (lowbit.qat.bn): the
        # weight and bias seen by everything else are then the folded ones.
        self.bn: nn.Module | None = None
        # A weight quantizer kind for this layer only (recipe overrides or a mixed plan:
        # ternary here, k-means there); None trains it with the recipe's weights.quantizer.
        self.weight_kind: str | None = None
        self.weight_kind_options: dict = {}

    def set_weight_bits(self, bits: int) -> None:
        """Change the weight width; the scale no longer fits, so calibration is required."""
        q = self.weight_quantizer
        spec = weight_spec_at(self.base_weight_spec, bits)
        if spec != q.spec:
            q.spec = spec
            q.calibrated = False
            if spec.grid == "midrise":
                q.signed = True
        if self.weight_kind is not None:  # the layer's own kind keeps its grid (or says the bits do not fit it)
            self.set_weight_kind(self.weight_kind, self.weight_kind_options)

    def set_weight_kind(self, kind: str | None, options: dict | None = None) -> None:
        """Give this layer its own weight kind; a kind with one grid (binary, ternary) or
        one set of levels per layer (TTQ, INQ) gets it, and other bits are an error."""
        from lowbit.quant.registry import check_kind, required_bits, spec_for_kind

        if kind is None:
            self.weight_kind, self.weight_kind_options = None, {}
            return
        check_kind(kind, "weights")
        q = self.weight_quantizer
        need = required_bits(kind)
        if need is not None and q.bits != need:
            raise RecipeError(f"layer {self.name!r}: weight quantizer {kind!r} needs {need}-bit weights, "
                              f"the layer has {q.bits}")
        spec = spec_for_kind(kind, q.spec)
        if spec != q.spec:
            q.spec, q.calibrated = spec, False
            if need is not None:
                q.signed = True
        self.weight_kind, self.weight_kind_options = kind, dict(options or {})

    @property
    def weight(self) -> torch.Tensor:
        """The layer's (folded) float weight: W·γ/σ while QAT trains it with its BN."""
        w = self.module.weight
        if self.bn is not None:
            w = w * self.bn.weight_factor().reshape([-1] + [1] * (w.dim() - 1))
        return w

    @property
    def bias(self) -> torch.Tensor | None:
        if self.bn is not None:  # β carries the layer's own bias while the BN trains
            return self.bn.folded_bias()
        return self.module.bias

    def quantized_weight(self) -> torch.Tensor:
        if not self.quantize_weight:
            return self.weight
        if self.weight_fn is not None:
            return self.weight_fn()
        if self.bn_factor_follows():
            return self.weight_quantizer.quantize_folded(self.weight, self.bn.weight_factor())
        return self.weight_quantizer(self.weight)

    def bn_factor_follows(self) -> bool:
        """Whether the weight quantizer's step scales with this layer's trained BN factor."""
        follows = getattr(self.weight_quantizer, "follows_bn_factor", None)
        return self.bn is not None and follows is not None and follows()

    def weight_step(self) -> torch.Tensor:
        """The step of the (folded) weight's grid, as the bias grid and exporters read it."""
        q = self.weight_quantizer
        return q.folded_step(self.bn.weight_factor()) if self.bn_factor_follows() else q.scale

    def bias_on_int32_grid(self) -> bool:
        """Whether this layer's bias (if it has one) lies on the int32 grid of step s_in·s_w: an
        integer kernel runs the layer, so its input and weight grids are both in use and calibrated.

        The one test both the fake-quant model (:meth:`quantized_bias`) and the ONNX exporter read:
        the exporter once rounded a bias with a disabled input quantizer's placeholder scale 1.0,
        which the model did not (ONNX and torch logits then differed by up to 0.015)."""
        if not self.quantize_weight or not self.input_ref:
            return False
        q_in, q_w = self.input_ref[0], self.weight_quantizer
        if not (q_in.enabled and q_in.calibrated and q_w.calibrated):
            return False
        # binary or codebook inputs, or codebook weights: no integer kernel runs this layer (the
        # exporter rebuilds a codebook weight in float), so its bias has no int32 grid either. 1-bit
        # sign weights do run on one (int8 codes ±1, step s/2: ONNX Runtime fuses them into an integer
        # conv and rounds a float bias itself), so theirs is on the grid like every integer layer's.
        return bool(q_in.integer_kernel) and not isinstance(q_w, CodebookQuantizer) \
            and not getattr(q_w, "deploys_to_codebook", False)

    def quantized_bias(self) -> torch.Tensor | None:
        """The bias on the int32 grid of step s_in·s_w, as integer runtimes store it
        (QLinearConv, QDQ bias): without this, low-bit activations make the coarse
        accumulator step visible only at deployment."""
        b = self.bias
        if b is None or not self.bias_on_int32_grid():
            return b
        step = self.input_ref[0].scale * self.weight_step()
        return round_ste(b / step) * step

    def xnor_input_scale(self) -> torch.Tensor | None:
        """XNOR-Net's K = A ∗ k (sec. 3.2) when this layer's input quantizer is XNOR-Net's:
        A = mean_c |I| (kept by the quantizer), k the 1/(w·h) box filter at this conv's
        stride and padding; for a Linear layer, A itself (one value per sample)."""
        q = self.input_ref[0] if self.input_ref else self.input_quantizer
        if q is None or not q.enabled or getattr(q, "method", None) != "xnor" or q.abs_mean is None:
            return None
        a, m = q.abs_mean, self.module
        if isinstance(m, nn.Linear):
            return a
        check_xnor_groups(self)
        if any(d != 1 for d in m.dilation) or isinstance(m.padding, str):
            raise RecipeError(f"layer {self.name!r}: XNOR-Net's input scale needs dilation 1 and numeric padding")
        pool = F.avg_pool2d if isinstance(m, nn.Conv2d) else F.avg_pool1d
        return pool(a, m.kernel_size, m.stride, m.padding, count_include_pad=True)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - the wrapped layer's name, for ``input=x``
        x = input
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        w = self.quantized_weight()
        batch_norm = self.bn is not None and self.training and not self.bn.frozen
        b = None if batch_norm else self.quantized_bias()
        m = self.module
        k = self.xnor_input_scale()
        if k is not None:  # (sign(I) ⊛ W_b) ⊙ K, then the bias
            out = (F.linear(x, w) if isinstance(m, nn.Linear) else m._conv_forward(x, w, None)) * k
            if b is not None:
                out = out + b.reshape([1, -1] + [1] * (out.dim() - 2))
        elif isinstance(m, nn.Linear):
            out = F.linear(x, w, b)
        else:
            out = m._conv_forward(x, w, b)
        # Under a bfloat16 autocast (qat precision bf16) only the convolution runs in bf16: what
        # follows (BN, the next quantizer's rounding, the loss) keeps the input's float32.
        out = out.to(x.dtype)
        if batch_norm:
            out = self.bn.normalise(out)
        if self.macs_pass is not None:
            self.macs_pass += self._count_macs(out)
        elif self.macs is None:  # run outside a QuantModel pass: this call's count
            self.macs = self._count_macs(out)
        return out

    def _count_macs(self, out: torch.Tensor) -> int:
        """Multiply-accumulates per sample: output elements × inputs each one reads.

        An unbatched input (a conv's (C, L) or (C, H, W), one dimension fewer than its weight; a Linear's
        (features,)) is one sample: its first dimension is channels, not a batch."""
        w = self.module.weight
        per_output = w[0].numel()  # in_channels/groups × kernel (conv) or in_features
        batched = out.dim() == w.dim() if isinstance(self.module, (nn.Conv1d, nn.Conv2d)) else out.dim() > 1
        per_sample = out.shape[1:].numel() if batched else out.numel()
        return int(per_sample * per_output)
