"""Brevitas' documented post-training flow on a lowbit CIFAR ResNet, for the side-by-side
PTQ table (issue 16). Runs in a venv of its own (Brevitas is never a lowbit dependency):

    python3 -m venv ../venv-brevitas && ../venv-brevitas/bin/pip install torch==2.13.0 brevitas==0.13.4
    ../venv-brevitas/bin/pip install -e .          # for the model, data and calibration subset
    ../venv-brevitas/bin/python benchmarks/peers/brevitas_ptq.py --config w4a4 --flow gptq+bc --seed 0

Prints one JSON line: top-1 on the full test split and the quantize wall time (graph
preparation, calibration and the flow's steps; evaluation excluded), so the caller can
store it beside lowbit's rows. The calibration images are lowbit's own subset for the seed
(the same 1,024 training images every tool sees).

The flow follows Brevitas' ImageNet PTQ example (brevitas_examples.imagenet_classification
.ptq): trace, merge BN, graph equalisation (20 iterations), the fx quantization maps with
MSE weight and activation ranges, per-channel weights, static per-tensor activations
(unsigned after ReLU), then ``calibrate``, optionally GPTQ, optionally bias correction.
Matching lowbit's convention: first conv and last Linear weights at 8 bits, the image input
and the last ReLU (the input of pooling and the classifier) at 8 bits; W3A3/W2A4 use
asymmetric per-channel weights as lowbit's rows do.
"""
from __future__ import annotations


import torch
from torch import nn

FLOWS = ("mse", "bc", "gptq", "gptq+bc")
BITS = {"w4a4": (4, 4), "w3a3": (3, 3), "w2a4": (2, 4), "w8a8": (8, 8), "w4a8": (4, 8)}
AFFINE = {"w3a3", "w2a4"}


def quant_maps(weight_bits: int, act_bits: int, affine: bool, last_linear: nn.Linear):
    """Brevitas' example maps, with 8-bit weights for the first conv and the classifier."""
    from brevitas.inject import value
    from brevitas_examples.imagenet_classification.ptq.ptq_common import create_quant_maps

    @value
    def weight_bit_width(module):  # noqa: ANN001,ANN202 - Brevitas resolves this by argument name
        first = isinstance(module, nn.Conv2d) and module.in_channels == 3
        last = isinstance(module, nn.Linear) and module.out_features == last_linear.out_features
        return 8 if first or last else weight_bits

    def maps(bits):  # noqa: ANN001,ANN202
        return create_quant_maps(
            dtype=torch.float32, bias_bit_width=None, weight_bit_width=weight_bit_width, weight_param_method="mse",
            weight_scale_type="float_scale", weight_quant_type="asym" if affine else "sym",
            weight_quant_granularity="per_channel", weight_narrow_range=False, weight_quant_format="int",
            act_quant_format="int", act_bit_width=bits, act_scale_type="float_scale",
            act_scale_computation_type="static", act_param_method="mse", act_quant_type="sym",
            act_quant_granularity="per_tensor", act_quant_percentile=99.999)

    return maps(act_bits), maps(8)


def _plain(x):  # noqa: ANN001,ANN202 - a QuantTensor's float value (a plain tensor passes through)
    return x.value if hasattr(x, "value") else x


def dequantize_before_slicing(graph_model: nn.Module) -> None:
    """Option-A shortcuts slice a tensor with a tuple of slices, which Brevitas 0.13.4's
    QuantTensor refuses ('tuple indices must be integers'); slice its float value instead
    (the slice is re-quantized where the shortcut joins the residual add)."""
    import operator

    graph = graph_model.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], tuple):
            with graph.inserting_before(node):
                plain = graph.call_function(_plain, (node.args[0],))
            node.args = (plain, *node.args[1:])
    graph_model.recompile()


def brevitas_quantize(model: nn.Module, calib: torch.Tensor, config: str, flow: str) -> nn.Module:
    from brevitas.graph.quantize import preprocess_for_quantize, quantize
    import brevitas.nn as qnn
    from brevitas_examples.imagenet_classification.ptq.ptq_common import (apply_bias_correction, apply_gptq,
                                                                           calibrate)

    weight_bits, act_bits = BITS[config]
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    graph = preprocess_for_quantize(model, equalize_iters=20, equalize_merge_bias=True, merge_bn=True)
    (layer_map, _, act_map, identity_map), (_, _, act_map8, identity_map8) = quant_maps(
        weight_bits, act_bits, config in AFFINE, last)
    qmodel = quantize(graph, quant_identity_map=identity_map, compute_layer_map=layer_map, quant_act_map=act_map)
    dequantize_before_slicing(qmodel)
    # 8 bits where lowbit keeps 8 (first/last layer inputs): the image input, the last ReLU
    # (it feeds pooling and the classifier) and the classifier's input. Swapped after
    # `quantize` because its residual handler shares quantizers between a ReLU and the add
    # it feeds; these three take part in no add.
    modules = {n.target: qmodel.get_submodule(n.target) for n in qmodel.graph.nodes if n.op == "call_module"}
    relus = [name for name, m in modules.items() if isinstance(m, qnn.QuantReLU)]
    eight_bit = {"x_quant": identity_map8["signed"], relus[-1]: act_map8[nn.ReLU],
                 "linear_input_quant": identity_map8["signed"]}
    for name, (cls, kwargs) in eight_bit.items():
        if name not in modules:
            raise RuntimeError(f"Brevitas graph has no {name!r}: this script knows Brevitas 0.13.4's names")
        parent, _, attr = name.rpartition(".")
        setattr(qmodel.get_submodule(parent) if parent else qmodel, attr, cls(**kwargs))
    loader = [(calib[i:i + 128], None) for i in range(0, len(calib), 128)]
    qmodel.eval()
    with torch.no_grad():
        qmodel(calib[:128])               # the example's initialising forward
    calibrate(loader, qmodel)
    if flow.startswith("gptq"):
        apply_gptq(loader, qmodel, act_order=False)
    if flow.endswith("bc"):
        apply_bias_correction(loader, qmodel)
    return qmodel


def main() -> None:
    from peer_cli import parser, run

    args = parser(__doc__, BITS, FLOWS, "mse").parse_args()
    import brevitas

    run(args, f"brevitas {brevitas.__version__}",
        lambda model, calib: brevitas_quantize(model, calib, args.config, args.flow))

if __name__ == "__main__":
    main()
