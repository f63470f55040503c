"""ONNX export of a QuantModel as a standard QDQ graph.

Every activation quantizer becomes QuantizeLinear → DequantizeLinear (uint8 after ReLU,
int8 otherwise; a grid starting at 0.0 is stored as uint8 codes with zero point 0 whatever its
signedness, see stored_codes); every quantized weight is stored as int8 codes with its per-channel
scales behind a DequantizeLinear; biases are stored as int32 at scale s_in·s_w (the
integer-runtime convention), so ONNX Runtime can fuse DQ→Conv→Q into QLinearConv. Codes
below 8 bits are stored as int8 values inside their clipped range; activations below 8
bits get a Clip of their codes to the b-bit range after QuantizeLinear, so the runtime cannot
use codes the fake-quant model never produces and still fuses Conv → Q. A layer whose weight stays
float (a ``keep_float`` layer, 32-bit weights) is a float Conv / Gemm on its initializer, reading a
quantized input through a per-channel DequantizeLinear that ONNX Runtime's optimizer leaves alone.

Differences from the fake-quant model, by construction: the int32 bias rounding (at most
half a step of s_in·s_w per channel) and the runtime's own integer accumulation and
requantization rounding. Min/max ranges make s_in·s_w/s_out a ratio of small integers, so a conv's
exact output can land on a rounding tie, which float32 scales move by ~1e-6 of a step; the model and
ONNX Runtime round that, OpenVINO's code is as if a non-zero output zero point were added first
(156.5000019 is 156.5 in float32, rounded to even): ResNet-20 W4A4 with min/max ranges, 54 of 0.5M
codes of one 8-bit residual-add input, logits 0.045 off on average over 200 images. No 8-bit type
holds an 8-bit affine grid with zero point 0, so the layout cannot avoid it.
"""
from __future__ import annotations

import contextlib
import operator
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from lowbit.checks import probe_forward
from lowbit.errors import LowbitError
from lowbit.model.fold_bn import BN_TYPES
from lowbit.model.graph import ADD_FUNCTIONS, RELU_FUNCTIONS, RELU_MODULES, add_alpha
from lowbit.model.quant_layer import QuantLayer, check_xnor_groups
from lowbit.model.quant_model import QuantModel
from lowbit.quant.codebook import CodebookQuantizer
from lowbit.quant.quantizer import UniformQuantizer
from lowbit.state_io import blocking_file, write_atomically

INT64_MAX = np.iinfo(np.int64).max
# QDQ with per-axis (per-channel) scales needs opset 13; the highest is what the installed onnx defines.
MIN_OPSET = 13
# From opset 18 on, ReduceMean takes its axes as an input, not an attribute.
REDUCE_AXES_AS_INPUT = 18


class ExportError(LowbitError):
    """The model holds an op or a quantizer the ONNX exporter cannot express."""


_POOL_PARAMETERS = {True: ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
                    False: ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")}
_POOL_DEFAULTS = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False,
                  "count_include_pad": True, "divisor_override": None}


def pool_attributes(node: fx.Node, max_pool: bool) -> dict[str, Any]:
    """ONNX MaxPool / AveragePool attributes for an F.max_pool2d / F.avg_pool2d call, every argument
    read (padding, dilation, count_include_pad): one left out silently changes the result. What ONNX
    cannot say the same way (ceil_mode, whose last-window rule differs between runtimes; indices;
    a divisor override) is an ExportError naming it."""
    names = _POOL_PARAMETERS[max_pool]
    given = {**_POOL_DEFAULTS, **dict(zip(names, node.args[1:])), **node.kwargs}
    for name in ("ceil_mode", "return_indices", "divisor_override"):  # each off when None or False
        if name in names and given[name] not in (None, False):
            raise ExportError(f"{node.name}: {'max' if max_pool else 'avg'}_pool2d with {name}={given[name]!r} is "
                              "not exported")

    def pair(v: Any) -> list[int]:
        return [int(v), int(v)] if isinstance(v, int) else [int(i) for i in v]

    kernel = pair(given["kernel_size"])
    pad = pair(given["padding"])
    attrs: dict[str, Any] = {"kernel_shape": kernel, "strides": pair(given["stride"] or kernel),
                             "pads": pad + pad}
    if max_pool:
        attrs["dilations"] = pair(given["dilation"])
    else:  # PyTorch counts the zero padding in each window's divisor by default; ONNX does not
        attrs["count_include_pad"] = int(bool(given["count_include_pad"]))
    return attrs


class _Builder:
    def __init__(self, gm: fx.GraphModule, opset: int) -> None:
        import onnx  # noqa: F401 - fail early with a clear message if missing
        from onnx import helper

        self.helper = helper
        self.gm = gm
        self.opset = opset
        self.modules = dict(gm.named_modules())
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.values: dict[str, np.ndarray] = {}  # each initializer's array, by name (read back by requantize)
        self.names: dict[fx.Node, str] = {}
        self.counter = 0
        # scale of the quantized tensor each node produces (for int32 bias scales)
        self.act_scale: dict[str, tuple[np.ndarray, UniformQuantizer]] = {}
        # DequantizeLinear output -> (its integer input, scale name, zero-point name)
        self.dq_source: dict[str, tuple[str, str, str]] = {}
        # DequantizeLinear output -> the (lowest, highest) code its integer input holds, as stored
        self.code_bounds: dict[str, tuple[int, int]] = {}
        # Relu output -> Relu input, so a quantizer whose grid starts at 0 can absorb it
        self.relu_input: dict[str, str] = {}
        self.pre_quant: dict[str, str] = {}  # a binary activation's output -> its input
        self.layer_outputs: set[str] = set()  # Conv/Gemm outputs (before any quantizer)
        self.from_layer: set[str] = set()  # DequantizeLinear outputs whose QuantizeLinear reads a layer output
        # quantizer nodes already applied in front of a flatten / max pool (see quantize_early)
        self.applied_early: set[fx.Node] = set()

    def fresh(self, stem: str) -> str:
        self.counter += 1
        return f"{stem}_{self.counter}"

    def const(self, stem: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.fresh(stem)
        self.values[name] = np.asarray(array)
        self.inits.append(numpy_helper.from_array(self.values[name], name))
        return name

    def op(self, op_type: str, inputs: list[str], stem: str, **attrs: Any) -> str:
        out = self.fresh(stem)
        self.nodes.append(self.helper.make_node(op_type, inputs, [out], name=self.fresh(op_type), **attrs))
        return out

    def arg(self, a: Any) -> str:
        if not isinstance(a, fx.Node):
            raise ExportError(f"expected a tensor argument, got {a!r}")
        return self.names[a]

    def shape(self, node: fx.Node) -> tuple[int, ...]:
        meta = node.meta.get("tensor_meta")
        if meta is None:
            raise ExportError(f"no shape known for {node.name}")
        return tuple(meta.shape)

    # -- quantizers --------------------------------------------------------------------------
    def quant_dtype(self, q: UniformQuantizer) -> type:
        return np.int8 if q.signed else np.uint8

    def check_grid(self, q: UniformQuantizer) -> None:
        if q.spec.grid != "midtread":
            raise ExportError(f"quantizer {q.name!r} uses a {q.spec.grid} grid; QDQ ONNX needs integer zero points "
                              "(mid-tread grids only)")

    def fake_quant(self, x: str, q: UniformQuantizer) -> str:
        if isinstance(q, CodebookQuantizer):
            return self.codebook_activation(x, q)
        if not q.integer_kernel:
            return self.binary_activation(x, q)
        self.check_grid(q)
        dtype, qmin, qmax, zp = self.stored_codes(q)
        scale = q.scale.detach().numpy().astype(np.float32)
        info = np.iinfo(dtype)
        if x in self.relu_input and qmin - float(zp) >= 0:
            # Q(relu(x)) == Q(x) when the grid's lowest value is >= 0 (Q clamps there), so the
            # Relu is dropped and the runtime sees Conv -> Q, which it fuses (as ORT's own
            # quantizer lays the graph out); dead-node removal deletes the Relu.
            x = self.relu_input[x]
        s_name, z_name = self.const("act_scale", scale), self.const("act_zp", zp)
        qx = self.op("QuantizeLinear", [x, s_name, z_name], "q")
        if (qmin, qmax) != (info.min, info.max):
            # Clip the codes, not the float input: Q is monotone and (qmin − zp)·s lands exactly on
            # qmin, so clip(Q(x)) == Q(clip(x)); a float Clip between Conv and Q kept ONNX Runtime from
            # fusing DQ→Conv→Q into QLinearConv (ResNet-20 W4A4: 9 of 19 convs fused, now 19)
            qx = self.op("Clip", [qx, self.const("code_lo", np.array(qmin, dtype)),
                                  self.const("code_hi", np.array(qmax, dtype))], "q_clipped")
        out = self.op("DequantizeLinear", [qx, s_name, z_name], "dq")
        self.act_scale[out] = (scale, q)
        self.dq_source[out] = (qx, s_name, z_name)
        self.code_bounds[out] = (qmin, qmax)
        if x in self.layer_outputs:
            self.from_layer.add(out)
        return out

    def stored_codes(self, q: UniformQuantizer) -> tuple[type, int, int, np.ndarray]:
        """(type, lowest code, highest code, zero point) of the codes ``q``'s QuantizeLinear stores. A grid
        starting at 0.0 (zero point == lowest code: a signed affine grid after a ReLU, -8..7 with zero point
        -8 at 4 bits) is stored as the unsigned one, codes c - qmin on uint8 with zero point 0: the same
        values. OpenVINO's CPU plugin (2026.4, f32) rounded near-ties of an int8 conv the other way when its
        input and output zero points were both non-zero (ResNet-20 W4A4 signed affine, the first 4-bit conv
        alone: 490 of 1M codes; conv/s_out = 13.4999944 exactly, OpenVINO's code 14, the model's 13; none
        with either zero point 0), and through the 4-bit layers the logits were 0.51 off on average (4.5% of
        top-1s changed); with zero point 0, 0.001. uint8 also lets ONNX Runtime 1.32 fuse
        each conv into QLinearConv (with int8 inputs it fused none of ResNet-20's 19 on an x86 CPU)."""
        dtype = self.quant_dtype(q)
        qmin, qmax = q.code_range()
        zp = q.zero_point.detach().numpy()
        if np.all(zp == qmin) and qmax - qmin <= np.iinfo(np.uint8).max:
            return np.uint8, 0, qmax - qmin, np.zeros_like(zp, dtype=np.uint8)
        return dtype, qmin, qmax, zp.astype(dtype)

    def requantize(self, x: str) -> str:
        """Q → DQ again on ``x``'s own grid: the identity, as ``x`` is on the grid and in range. OpenVINO's CPU
        plugin fuses Conv → Q → DQ → Add(shortcut) → Q into one int8 convolution and drops the rounding of
        the conv's quantizer when a sum and another quantizer follow it (it computed Q(conv + shortcut) for
        Q(Q(conv) + shortcut): ResNet-20 W4A4 logits 0.82 off the model's on average, 3.3% of top-1s
        changed); this second quantizer is kept and rounds. On a grid that starts at 0.0 (uint8, zero point
        0: unsigned symmetric activations, or a ReLU before the add) the same pair did nothing (OpenVINO
        still computed Q(max(conv, 0) + shortcut): W4A4 logits 0.43 off), so there its codes are held by the
        other 8-bit type (other_type_zero_point), where it rounds. Only there: on other grids the other type
        moved OpenVINO's results where float layers feed adds (ResNet-20 W4A4, layer1's weights in float:
        logits 0.027 off instead of 0.0003)."""
        _, s_name, z_name = self.dq_source[x]
        if self.starts_at_zero(x):
            z_name = self.const("rq_zp", self.other_type_zero_point(x))
        return self.dequantize_like(x, self.op("QuantizeLinear", [x, s_name, z_name], "rq"), z_name)

    def starts_at_zero(self, x: str) -> bool:
        """Whether the grid of the dequantized ``x`` starts at 0.0 (its lowest code is the zero point), as a
        quantizer's after a ReLU: where OpenVINO ignored a requantize on the same type (see requantize)."""
        qmin, _ = self.code_bounds[x]
        return bool(np.all(self.values[self.dq_source[x][2]].astype(np.int32) == qmin))

    def other_type_zero_point(self, x: str) -> np.ndarray:
        """The zero point that holds the codes of the dequantized ``x`` on the other 8-bit type, same grid:
        z − 128 on int8 for uint8 codes, z + 128 on uint8 for int8 codes. Every code c moves by the same
        128, so each value (c − z)·s is unchanged, provided the new type holds every code of the
        quantizer's range (clipped below 8 bits or not), which is checked rather than assumed."""
        _, _, z_name = self.dq_source[x]
        zp = self.values[z_name]
        shift, target = (128, np.uint8) if zp.dtype == np.int8 else (-128, np.int8)
        qmin, qmax = self.code_bounds[x]
        info = np.iinfo(target)
        if not info.min <= qmin + shift <= qmax + shift <= info.max:
            raise ExportError(f"{x}: codes {qmin}..{qmax} of {zp.dtype} do not fit {np.dtype(target)} shifted by "
                              f"{shift}; the requantize before a residual add needs them to")
        return (zp.astype(np.int32) + shift).astype(target)

    def binary_activation(self, x: str, q: UniformQuantizer) -> str:
        """A 1-bit mid-rise activation (BNN's sign, ±s/2, zero to +): Where(x ≥ 0, s/2, −s/2).
        There is no QDQ form of it (QuantizeLinear rounds to a grid with zero), so the next
        layer runs in float on these exact values; its weights stay QDQ."""
        half = np.float32(float(q.scale.detach()) / 2)
        positive = self.op("GreaterOrEqual", [x, self.const("zero", np.array(0, np.float32))], "nonneg")
        out = self.op("Where", [positive, self.const("plus", half), self.const("minus", -half)], "sign")
        self.pre_quant[out] = x  # XNOR-Net's K is computed from the input before its sign
        return out

    def codebook_activation(self, x: str, q: CodebookQuantizer) -> str:
        """Nearest of K sorted float levels l_0 < … (LQ-Nets activations) by standard ops:
        l_0 + Σ_i (l_{i+1} − l_i)·[x > t_i], t_i the midpoints; as bucketize, a tie goes
        down. No integer kernel reads it: the next layer runs in float on these values."""
        from onnx import TensorProto

        if q.centroids.dim() != 1:
            raise ExportError(f"quantizer {q.name!r}: a per-channel activation codebook is not exported")
        levels = q.centroids.detach().numpy().astype(np.float32)
        if levels.size == 1:
            return self.op("Add", [self.op("Mul", [x, self.const("zero", np.array(0, np.float32))], "zeroed"),
                                   self.const("level", levels[0])], "level")
        cut = self.const("cuts", (levels[1:] + levels[:-1]) / 2)
        up = self.op("Cast", [self.op("Greater", [self.op("Unsqueeze", [x, self.const("axis", np.array([-1], np.int64))],
                                                          "x_last"), cut], "above")], "above_f", to=TensorProto.FLOAT)
        steps = self.op("ReduceSum", [self.op("Mul", [up, self.const("rises", np.diff(levels))], "rise"),
                                      self.const("axis", np.array([-1], np.int64))], "risen", keepdims=0)
        return self.op("Add", [steps, self.const("level0", levels[0])], "codebook_act")

    def xnor_scale(self, layer: QuantLayer, x: str) -> str | None:
        """K = AveragePool(ReduceMean(|I|, channels)) at the conv's geometry (QuantLayer.xnor_input_scale)."""
        q = layer.input_ref[0] if layer.input_ref else None
        if q is None or not q.enabled or getattr(q, "method", None) != "xnor":
            return None
        check_xnor_groups(layer)
        magnitude = self.op("Abs", [self.pre_quant[x]], "abs")
        if self.opset >= REDUCE_AXES_AS_INPUT:  # an axes attribute there makes the model invalid
            a = self.op("ReduceMean", [magnitude, self.const("axis", np.array([1], np.int64))], "abs_mean", keepdims=1)
        else:
            a = self.op("ReduceMean", [magnitude], "abs_mean", axes=[1], keepdims=1)
        m = layer.module
        if isinstance(m, nn.Linear):
            return a
        return self.op("AveragePool", [a], "xnor_k", kernel_shape=list(m.kernel_size), strides=list(m.stride),
                       pads=list(m.padding) * 2, count_include_pad=1)

    def relu(self, x: str) -> str:
        out = self.op("Relu", [x], "relu")
        self.relu_input[out] = x
        return out

    def on_codes(self, x: str, op_type: str, extra: list[str], stem: str, pad_codes: bool = False, **attrs: Any) -> str:
        """Run a grid-preserving op (Flatten, Slice, zero Pad) on the integer side of a
        dequantized tensor: DQ∘op = op∘DQ for a per-tensor scale (a zero pad becomes a pad
        with the zero point), so the runtime sees DQ right before the next layer and fuses it."""
        if x not in self.dq_source:
            return self.op(op_type, [x] + extra, stem, **attrs)
        qx, _, z_name = self.dq_source[x]
        inputs = [qx] + extra + ([z_name] if pad_codes else [])
        return self.dequantize_like(x, self.op(op_type, inputs, f"{stem}_q", **attrs))

    def dequantize_like(self, x: str, codes: str, z_name: str | None = None) -> str:
        """DequantizeLinear of ``codes`` on the grid of the dequantized tensor ``x``, recorded like ``x``
        (``z_name``: the zero point of codes held by another type, the same grid)."""
        _, s_name, own_zero = self.dq_source[x]
        z_name = z_name or own_zero
        out = self.op("DequantizeLinear", [codes, s_name, z_name], "dq")
        self.act_scale[out] = self.act_scale[x]
        self.dq_source[out] = (codes, s_name, z_name)
        # codes on another type's zero point (requantize) are x's codes moved by the zero points' difference
        shift = int(self.values[z_name].astype(np.int32).flat[0]) - int(self.values[own_zero].astype(np.int32).flat[0])
        self.code_bounds[out] = (self.code_bounds[x][0] + shift, self.code_bounds[x][1] + shift)
        return out

    def quantize_early(self, node: fx.Node, x: str) -> str:
        """q(f(x)) == f(q(x)) for f = flatten or max pool and a per-tensor q, so when f's
        only consumer is a quantizer, quantize before f and run f on the codes: the runtime
        then fuses the op before f (a Relu, a pooling) into its integer kernel."""
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module":
            return x
        q = self.modules[users[0].target]
        if not isinstance(q, UniformQuantizer) or not q.enabled or q.spec.per_channel or x in self.dq_source:
            return x
        if not q.integer_kernel:
            return x  # a sign or a codebook has no integer kernel to fuse into; XNOR-Net's K needs the pooled input
        self.applied_early.add(users[0])
        return self.fake_quant(x, q)

    def flatten(self, x: str, axis: int) -> str:
        return self.on_codes(x, "Flatten", [], "flatten", axis=axis)

    def float_input(self, node: fx.Node, x: str) -> str:
        """The input of a layer whose weight stays float. Where it is a per-tensor DequantizeLinear output, the
        same codes are dequantized again with the scale and zero point repeated per channel (the same values):
        ONNX Runtime's WeightBiasQuantization pass (in its default ORT_ENABLE_ALL session) re-quantized a float
        weight between a per-tensor DequantizeLinear and a QuantizeLinear to per-tensor int8, which the model
        does not (ResNet-20 W32A4 logits 0.74 off on average, 1.6% of top-1s changed), and it reads only a
        per-tensor input. The weight stays a constant initializer the runtimes can prepack: fed as
        Mul(W, DequantizeLinear(1)) instead (ORT never folds a DequantizeLinear), OpenVINO's CPU plugin took
        it for a compressed weight (W as the scale of a uint8 code 1) and failed to compile a float Linear."""
        if x not in self.dq_source:
            return x
        codes, s_name, z_name = self.dq_source[x]
        scale, zp = self.values[s_name], self.values[z_name]
        if scale.ndim:  # already per channel: the pass leaves the layer alone
            return x
        channels = self.shape(node.args[0])[1]
        return self.op("DequantizeLinear", [codes, self.const("act_scale_c", np.full(channels, scale, np.float32)),
                                            self.const("act_zp_c", np.full(channels, zp, zp.dtype))],
                       "dq_float_layer", axis=1)

    def weight(self, layer: QuantLayer) -> str:
        w = layer.weight.detach()
        if not layer.quantize_weight:
            return self.const("weight", w.numpy().astype(np.float32))
        q = layer.weight_quantizer
        if isinstance(q, CodebookQuantizer):
            # No integer kernel runs a codebook: the float weight is rebuilt from the stored
            # indices, Gather(centroids, Cast(indices)), and the layer runs in float.
            from onnx import TensorProto

            codes = q.codes(w).numpy().astype(np.int64)
            table = q.centroids.numpy().astype(np.float32)
            if table.ndim == 2:  # one table per output channel: index the flattened tables
                codes = codes + (np.arange(table.shape[0]) * table.shape[1]).reshape([-1] + [1] * (codes.ndim - 1))
                table = table.reshape(-1)
            # The indices pass through a DequantizeLinear (scale 1: the same integers, as float), which
            # ONNX Runtime never constant-folds: folded, the Gather became a float weight initializer
            # between a DequantizeLinear and a QuantizeLinear, which its WeightBiasQuantization pass
            # re-quantized to int8 (ORT_ENABLE_ALL scored a 3-bit k-means CNN 0.08 off per logit).
            largest = int(codes.max())
            stored = np.uint8 if largest <= np.iinfo(np.uint8).max else np.int32  # (DequantizeLinear's types)
            if largest >= 2**24:  # float32 holds integers exactly up to 2^24
                raise ExportError(f"weights of {layer.name!r}: {largest + 1} codebook entries, more than the "
                                  f"{2**24} the exported index path holds exactly")
            idx = self.op("DequantizeLinear", [self.const("w_index", codes.astype(stored)),
                                               self.const("w_index_unit", np.array(1.0, dtype=np.float32)),
                                               self.const("w_index_zp", np.array(0, dtype=stored))], "w_index_f")
            idx = self.op("Cast", [idx], "w_index_i64", to=TensorProto.INT64)
            return self.op("Gather", [self.const("w_codebook", table), idx], "w")
        if not q.signed or not q.spec.symmetric:
            raise ExportError(f"weights of {layer.name!r} must be signed symmetric for ONNX Runtime's int8 kernels")
        codes, scale = self.weight_codes(layer)
        zp = np.zeros_like(scale, dtype=np.int8)
        attrs = {"axis": 0} if scale.ndim == 1 else {}
        return self.op("DequantizeLinear", [self.const("w_codes", codes), self.const("w_scale", scale),
                                            self.const("w_zp", zp)], "w", **attrs)

    @staticmethod
    def weight_codes(layer: QuantLayer) -> tuple[np.ndarray, np.ndarray]:
        """int8 codes and scale of a layer's weight. A b-bit mid-rise grid (binary, μL2Q, DoReFa
        weights: levels (q + ½)·s) is the mid-tread grid of step s/2 on the odd codes 2q + 1,
        so it runs on the same int8 kernels, exactly (|2q + 1| ≤ 2^b − 1 fits int8 to 7 bits)."""
        q = layer.weight_quantizer
        codes = q.codes(layer.weight.detach()).numpy().astype(np.int32)
        scale = q.scale.detach().numpy().astype(np.float32)
        if q.spec.grid == "midrise":
            if q.bits > 7:
                raise ExportError(f"{layer.name}: a {q.bits}-bit mid-rise weight grid does not fit int8 codes")
            codes, scale = 2 * codes + 1, (scale / 2).astype(np.float32)
        return codes.astype(np.int8), scale

    def bias(self, layer: QuantLayer, x_name: str, out_channels: int) -> str | None:
        """int32 codes on the grid QuantLayer.quantized_bias simulates (same float32 maths); a float
        bias exactly where the model keeps it float (the one predicate both read)."""
        b = layer.bias
        if b is None:
            return None
        if x_name not in self.act_scale or not layer.bias_on_int32_grid():
            return self.const("bias", b.detach().numpy().astype(np.float32))
        with torch.no_grad():
            step = layer.input_ref[0].scale * layer.weight_step()
            codes_f = torch.round(b / step).numpy()
            if layer.weight_quantizer.spec.grid == "midrise":  # the weight's ONNX step is s_w/2 (weight_codes)
                step, codes_f = step / 2, 2 * codes_f
            scale = torch.broadcast_to(step, (out_channels,)).numpy().astype(np.float32)
        if np.abs(codes_f).max() > np.iinfo(np.int32).max:
            raise ExportError(f"{layer.name}: bias does not fit int32 at step s_in*s_w")
        codes = codes_f.astype(np.int32)
        return self.op("DequantizeLinear", [self.const("b_codes", codes), self.const("b_scale", scale),
                                            self.const("b_zp", np.zeros_like(codes))], "b", axis=0)

    # -- layers ----------------------------------------------------------------------------------
    def layer(self, node: fx.Node, layer: QuantLayer) -> str:
        x = self.arg(node.args[0])
        m = layer.module
        w = self.weight(layer)
        out_ch = m.weight.shape[0]
        b = self.bias(layer, x, out_ch)
        k = self.xnor_scale(layer, x)
        if k is not None:  # (sign(I) ⊛ W) ⊙ K + b, as QuantLayer.forward
            out = self.op("Mul", [self.conv_or_gemm(node, m, layer.name, [x, w]), k], "xnor_scaled")
            return self.add_bias(out, b, node) if b else out
        # A float bias on a quantized input (the layer's own input quantizer off, its input quantized for
        # another reader): inside the conv, ONNX Runtime's optimizer fuses DQ→Conv→Q into an integer kernel
        # and rounds that bias to int32 itself, which the model does not; added after it, it stays float.
        late = b if (b is not None and x in self.act_scale and not layer.bias_on_int32_grid()) else None
        inner = [b] if b and late is None else []
        x_in = x if layer.quantize_weight else self.float_input(node, x)
        out = self.conv_or_gemm(node, m, layer.name, [x_in, w] + inner)
        out = self.add_bias(out, late, node) if late else out
        self.layer_outputs.add(out)
        return out

    def float_layer(self, node: fx.Node, m: nn.Conv2d | nn.Linear) -> str:
        """A layer the recipe keeps float (``keep_float``): a plain nn.Conv2d / nn.Linear in the traced graph,
        its BN folded into it or exported as a BatchNormalization of its own, so Conv / Gemm on its own float
        weight and bias computes it, on a quantized input too (float_input)."""
        x = self.float_input(node, self.arg(node.args[0]))
        inputs = [x, self.const("weight", m.weight.detach().numpy().astype(np.float32))]
        if m.bias is not None:  # no integer kernel reads this layer (float_input), so its bias stays inside
            inputs.append(self.const("bias", m.bias.detach().numpy().astype(np.float32)))
        out = self.conv_or_gemm(node, m, str(node.target), inputs)
        self.layer_outputs.add(out)
        return out

    def conv_or_gemm(self, node: fx.Node, m: nn.Conv2d | nn.Linear, name: str, inputs: list[str]) -> str:
        """Gemm (transB) for a Linear, Conv for a Conv2d, on ``inputs`` = [x, w(, b)]; what the ONNX op
        cannot say the same way (a Linear on a non-2-D input, string or non-zero padding) is refused."""
        if isinstance(m, nn.Linear):
            if len(self.shape(node.args[0])) != 2:
                raise ExportError(f"{name}: Linear on a {len(self.shape(node.args[0]))}-D input is not exported (2-D only)")
            return self.op("Gemm", inputs, "gemm", transB=1)
        if isinstance(m.padding, str) or m.padding_mode != "zeros":
            raise ExportError(f"{name}: padding={m.padding!r}, padding_mode={m.padding_mode!r} not exported")
        return self.op("Conv", inputs, "conv", kernel_shape=list(m.kernel_size), strides=list(m.stride),
                       pads=list(m.padding) * 2, dilations=list(m.dilation), group=m.groups)

    def add_bias(self, out: str, b: str, node: fx.Node) -> str:
        """``out + b`` with the bias broadcast over the channel axis of the layer's output."""
        shape = [1, -1] + [1] * (len(self.shape(node.args[0])) - 2)
        return self.op("Add", [out, self.op("Reshape", [b, self.const("shape", np.array(shape, np.int64))], "bias")],
                       "biased")

    def batchnorm(self, node: fx.Node, bn: nn.Module) -> str:
        arrays = [bn.weight, bn.bias, bn.running_mean, bn.running_var]
        names = [self.const("bn", a.detach().numpy().astype(np.float32)) for a in arrays]
        return self.op("BatchNormalization", [self.arg(node.args[0])] + names, "bn", epsilon=float(bn.eps))

    def pad(self, node: fx.Node) -> str:
        x = node.args[0]
        pad = list(node.args[1] if len(node.args) > 1 else node.kwargs["pad"])
        mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
        value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
        if mode != "constant":
            raise ExportError(f"{node.name}: F.pad mode {mode!r} is not exported (constant only)")
        rank = len(self.shape(x))
        begins, ends = [0] * rank, [0] * rank
        for i in range(len(pad) // 2):
            dim = rank - 1 - i
            begins[dim], ends[dim] = pad[2 * i], pad[2 * i + 1]
        pads = self.const("pads", np.array(begins + ends, dtype=np.int64))
        if value:
            return self.op("Pad", [self.arg(x), pads, self.const("pad_value", np.array(value, dtype=np.float32))],
                           "pad", mode="constant")
        return self.on_codes(self.arg(x), "Pad", [pads], "pad", pad_codes=True, mode="constant")

    def getitem(self, node: fx.Node) -> str:
        x, index = node.args
        index = index if isinstance(index, tuple) else (index,)
        starts, ends, axes, steps = [], [], [], []
        for axis, s in enumerate(index):
            if not isinstance(s, slice):
                raise ExportError(f"{node.name}: only slice indexing is exported, got {s!r}")
            if s == slice(None):
                continue
            starts.append(s.start or 0)
            ends.append(INT64_MAX if s.stop is None else s.stop)
            axes.append(axis)
            steps.append(s.step or 1)
        if not axes:
            return self.arg(x)
        arrays = [np.array(v, dtype=np.int64) for v in (starts, ends, axes, steps)]
        return self.on_codes(self.arg(x), "Slice", [self.const("slice", a) for a in arrays], "slice")

    def add(self, node: fx.Node) -> str:
        """a + alpha·b: torch.add's alpha as a Mul on b (written as a plain Add it was dropped)."""
        # a layer's quantized output entering an add is quantized once more on its grid (see requantize)
        a, b = (self.requantize(v) if v in self.from_layer else v for v in (self.arg(node.args[0]), self.arg(node.args[1])))
        alpha = add_alpha(node)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise ExportError(f"{node.name}: torch.add with alpha={alpha!r} is not exported (a number only)")
        if alpha != 1:
            b = self.op("Mul", [b, self.const("alpha", np.array(alpha, np.float32))], "scaled")
        return self.op("Add", [a, b], "add")

    def function(self, node: fx.Node) -> str:
        t = node.target
        if t in RELU_FUNCTIONS:
            return self.relu(self.arg(node.args[0]))
        if t in ADD_FUNCTIONS:
            return self.add(node)
        if t is F.hardtanh:
            lo = node.kwargs.get("min_val", node.args[1] if len(node.args) > 1 else -1.0)
            hi = node.kwargs.get("max_val", node.args[2] if len(node.args) > 2 else 1.0)
            return self.op("Clip", [self.arg(node.args[0]), self.const("clip_lo", np.array(lo, np.float32)),
                                    self.const("clip_hi", np.array(hi, np.float32))], "hardtanh")
        if t is F.pad:
            return self.pad(node)
        if t is operator.getitem:
            return self.getitem(node)
        if t is F.adaptive_avg_pool2d:
            size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
            if size not in (1, (1, 1), [1, 1]):
                raise ExportError(f"{node.name}: adaptive_avg_pool2d to {size} is not exported (global pooling only)")
            return self.op("GlobalAveragePool", [self.arg(node.args[0])], "gap")
        if t in (F.max_pool2d, F.avg_pool2d):
            attrs = pool_attributes(node, max_pool=t is F.max_pool2d)
            if t is F.max_pool2d:  # on the codes when its input is quantized: max commutes with Q
                x = self.quantize_early(node, self.arg(node.args[0]))
                return self.on_codes(x, "MaxPool", [], "pool", **attrs)
            return self.op("AveragePool", [self.arg(node.args[0])], "pool", **attrs)
        if t is torch.flatten:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            return self.flatten(self.quantize_early(node, self.arg(node.args[0])), int(start))
        raise ExportError(f"cannot export {node.name}: function {getattr(t, '__name__', t)!r} has no ONNX mapping here")

    def method(self, node: fx.Node) -> str:
        if node.target in ("relu", "relu_"):
            return self.relu(self.arg(node.args[0]))
        if node.target == "flatten":
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            return self.flatten(self.quantize_early(node, self.arg(node.args[0])), int(start))
        raise ExportError(f"cannot export {node.name}: tensor method {node.target!r} has no ONNX mapping here")

    def module(self, node: fx.Node) -> str:
        m = self.modules[node.target]
        if isinstance(m, UniformQuantizer):
            x = self.arg(node.args[0])
            if node in self.applied_early:
                return x  # already quantized in front of the flatten / max pool feeding it
            return self.fake_quant(x, m) if m.enabled else x
        if isinstance(m, QuantLayer):
            return self.layer(node, m)
        if type(m) in (nn.Conv2d, nn.Linear):  # exactly these: a subclass may compute something else in forward
            return self.float_layer(node, m)
        if isinstance(m, RELU_MODULES) and isinstance(m, nn.ReLU):
            return self.relu(self.arg(node.args[0]))
        if isinstance(m, BN_TYPES):
            return self.batchnorm(node, m)
        if isinstance(m, nn.Flatten):
            return self.flatten(self.quantize_early(node, self.arg(node.args[0])), int(m.start_dim))
        raise ExportError(f"cannot export layer {node.target!r} of type {type(m).__name__}: no ONNX mapping")


def _live_nodes(nodes: list[Any], outputs: list[str]) -> list[Any]:
    """Drop nodes nothing reads (e.g. a Relu a quantizer absorbed), keeping graph order."""
    needed, live = set(outputs), []
    for n in reversed(nodes):
        if any(o in needed for o in n.output):
            live.append(n)
            needed.update(n.input)
    return live[::-1]


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode, each one's own mode back afterwards: the export's forwards on a
    model in training mode updated its BN running statistics (the exported ones, and the model's own
    outputs after it) and ran its quantizers' training paths."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _check_opset(opset: Any) -> None:
    import onnx

    highest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= highest:
        raise ExportError(f"opset={opset!r}: the exporter writes opsets {MIN_OPSET} to {highest} (per-channel "
                          f"QuantizeLinear needs {MIN_OPSET}; {highest} is the newest the installed onnx "
                          f"{onnx.__version__} defines)")


def _check_target(path: Path) -> None:
    """A file path to write: a directory, or a path inside a file, is refused before any work (they
    failed as a raw IsADirectoryError / FileExistsError after it)."""
    if path.is_dir():
        raise ExportError(f"cannot export to {path}: it is a directory; give a file path such as "
                          f"{path / 'model.onnx'}")
    blocker = blocking_file(path)
    if blocker is not None:
        raise ExportError(f"cannot export to {path}: {blocker} is a file, not a folder")


def _write(model: Any, path: Path) -> None:
    """Save atomically (lowbit.state_io: a file of its own beside the target, flushed, renamed over
    it), so a killed export, or a second one writing the same path, never leaves half a model where a
    good one was. A link's target is the file replaced (the link stays); a device or a pipe cannot be
    renamed over, so it is written through."""
    import onnx

    target = path.resolve() if path.is_symlink() else path
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() and not target.is_file():
            onnx.save(model, str(target))
        else:
            write_atomically(target, lambda tmp: onnx.save(model, str(tmp)))
    except OSError as err:
        raise ExportError(f"cannot write {path}: {err.strerror or err}") from None


def export_onnx(qm: QuantModel, path: str | Path, example_input: torch.Tensor, opset: int = 17,
                dataset: str | None = None) -> Path:
    """Write ``qm`` as a QDQ ONNX model with a dynamic batch dimension; returns the path.

    Run inside ``qm.quantization(False, False)`` to export the float network (BN folded)
    through the same code path, e.g. as a runtime baseline. The model is read in eval mode
    (as it deploys) and left in the mode it was in. The file's metadata names the zoo
    architecture (``lowbit.arch``) and, when given, the ``dataset`` it was quantized for
    (``lowbit.dataset``), so ``lowbit eval --onnx`` scores it on the right test split.
    """
    try:
        import onnx
    except ImportError:
        raise ExportError("ONNX export needs the onnx package: pip install 'lowbit[deploy]'") from None
    _check_opset(opset)
    if qm.mode != "graph":
        raise ExportError("ONNX export needs a traced model; this QuantModel runs in hook fallback mode")
    if not qm.calibrated:
        raise ExportError("calibrate the QuantModel before exporting it")
    path = Path(path)
    _check_target(path)
    with _eval_mode(qm):
        model = _build(qm, example_input, opset)
    _describe(model, qm, dataset)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as err:
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise ExportError(f"the exported graph is not a valid ONNX model at opset {opset}: {first}") from None
    _write(model, path)
    return path


METADATA_ARCH, METADATA_DATASET = "lowbit.arch", "lowbit.dataset"


def _describe(model: Any, qm: QuantModel, dataset: str | None) -> None:
    """Record what the file holds in its metadata_props (read back by ``runtime.onnx_metadata``)."""
    from onnx import helper

    arch = qm.meta.get("arch") or {}
    fields = {METADATA_ARCH: arch.get("name"), METADATA_DATASET: dataset}
    helper.set_model_props(model, {k: str(v) for k, v in fields.items() if v})


def _build(qm: QuantModel, example_input: torch.Tensor, opset: int) -> Any:
    """The ONNX ModelProto of ``qm`` (in eval mode: see export_onnx)."""
    from onnx import TensorProto, helper

    gm: fx.GraphModule = qm.net
    probe_forward(qm, example_input, "the example input")
    with torch.no_grad():
        ShapeProp(gm).propagate(example_input)
        expected = qm(example_input)
    b = _Builder(gm, opset)
    inputs, outputs = [], []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            shape = ["batch"] + list(b.shape(node)[1:])
            inputs.append(helper.make_tensor_value_info(node.name, TensorProto.FLOAT, shape))
            b.names[node] = node.name
        elif node.op == "call_module":
            b.names[node] = b.module(node)
        elif node.op == "call_function":
            b.names[node] = b.function(node)
        elif node.op == "call_method":
            b.names[node] = b.method(node)
        elif node.op == "output":
            result = node.args[0]
            if not isinstance(result, fx.Node):
                raise ExportError("only models with a single tensor output are exported")
            b.nodes.append(helper.make_node("Identity", [b.names[result]], ["logits"], name="output"))
            outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch"] + list(expected.shape[1:])))
        elif node.op == "get_attr":
            raise ExportError(f"cannot export {node.name}: direct parameter access ({node.target}) is not supported")
    graph = helper.make_graph(_live_nodes(b.nodes, ["logits"]), "lowbit", inputs, outputs, initializer=b.inits)
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="lowbit")
    # IR 9 where the opset allows (older runtimes read it), the version a newer opset requires otherwise
    model.ir_version = max(min(model.ir_version, 9), helper.find_min_ir_version_for(opsets))
    return model
