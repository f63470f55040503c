"""Sony's Model Compression Toolkit (MCT) post-training flows on a lowbit CIFAR ResNet, for the
side-by-side PTQ table (issue 16). Runs in a venv of its own (MCT is never a lowbit dependency):

    python3 -m venv ../venvs/mct && ../venvs/mct/bin/pip install torch==2.14.1 torchvision==0.29.1 \\
        model-compression-toolkit==2.6.1
    ../venvs/mct/bin/pip install --no-deps -e .    # the model, data and calibration subset (keeps MCT's torch)
    ../venvs/mct/bin/pip install pyyaml            # plus any of numpy scipy pyyaml safetensors tqdm it lacks
    ../venvs/mct/bin/python benchmarks/peers/mct_ptq.py --config w4a4 --flow ptq --seed 0 --threads 1

Prints one JSON line: top-1 on the full test split and the quantize wall time (MCT's graph
reading, BN folding, statistics collection, range search, bias correction, GPTQ training and
the export to a fake-quant PyTorch module; evaluation excluded). The calibration images are
lowbit's own subset for the seed (the same 1,024 training images every tool sees), fed to MCT
as 8 batches of 128; MCT's own log lines go to stderr.

Flows:
  ptq   ``mct.ptq.pytorch_post_training_quantization``: BN folding, MSE error method for the
        weight and the activation ranges, weight bias correction (MCT's default
        ``weights_bias_correction``), symmetric activation thresholds (not MCT's power-of-two
        default; unsigned where the statistics are non-negative, i.e. after ReLU).
  gptq  ``mct.gptq.pytorch_gradient_post_training_quantization`` with
        ``mct.gptq.get_pytorch_gptq_config(n_epochs=20, use_hessian_sample_attention=False)``:
        20 epochs over the 1,024 images in batches of 128 (160 steps, ~7 s an epoch on one
        thread; --gptq-epochs changes it), on top of the same ptq configuration (statistics,
        MSE ranges, bias correction), with MCT's defaults otherwise: soft-rounding (AdaRound-
        style) weights, Hessian-weighted MSE over the compare points (Hessian scores from 32
        samples), regularization 0.01, gradual activation quantization, bias training. MCT's
        default sample-layer attention is off because its per-sample Hessian scores for the
        1,024 images alone took ~15 minutes on one thread (measured with MCT 2.6.1; with it, one
        epoch took 918 s in all). MCT's "GPTQ" is gradient-based rounding learning, not
        Frantar et al.'s second-order GPTQ.

Bit widths. MCT's shipped TPCs (IMX500, TFLite, QNNPACK) only offer 8-bit activations, so the
script builds its own target platform capabilities (TPC) with MCT's schema, as MCT's TPC
docstrings document (a get_op_quantization_configs/generate_tpc pair of one's own): every
operator set offers the low-bit configuration as its base and 8-bit alternatives, and MCT's
manual bit-width API (``mct.core.BitWidthConfig.set_manual_activation_bit_width`` /
``set_manual_weights_bit_width`` with ``NodeNameFilter``) picks the 8-bit ones per node.
Matching lowbit's convention (first_last_bits 8, add_bits 8):
  * weights per channel, the first conv and the last Linear at 8 bits, the rest at W bits;
    symmetric for W4A4/W8A8/W4A8, asymmetric for W3A3 and W2A4 (MCT's UNIFORM method:
    a per-channel min/max range, MSE-searched);
  * activations per tensor at A bits on every ReLU output (conv/add outputs fused with
    their ReLU), at 8 bits on the image input, on the conv outputs that enter a residual add,
    on the last ReLU (the pooling input) and on the pooled features (the classifier input);
  * the logits are not quantized (the Linear's operator set has activation quantization off),
    slicing, padding and flatten pass their input's grid through unquantized.
"""
from __future__ import annotations

import operator

import torch
from torch import nn

FLOWS = ("ptq", "gptq")
BITS = {"w4a4": (4, 4), "w3a3": (3, 3), "w2a4": (2, 4), "w8a8": (8, 8), "w4a8": (4, 8)}
AFFINE = {"w3a3", "w2a4"}
GPTQ_EPOCHS = 20
BATCH = 128


def build_tpc(weight_bits: int, act_bits: int, affine: bool):
    """A TPC whose conv/linear/activation operator sets offer the low-bit configuration as the
    base and the 8-bit variants as alternatives (for MCT's manual bit-width selection)."""
    from mct_quantizers import QuantizationMethod
    import model_compression_toolkit.target_platform_capabilities.schema.mct_current_schema as schema
    from model_compression_toolkit.target_platform_capabilities.constants import BIAS_ATTR, KERNEL_ATTR

    names = schema.OperatorSetNames
    act_choices = tuple(sorted({act_bits, 8}))
    no_weights = schema.AttributeQuantizationConfig(enable_weights_quantization=False)

    def kernel(bits: int):  # noqa: ANN202
        return schema.AttributeQuantizationConfig(
            weights_quantization_method=QuantizationMethod.UNIFORM if affine else QuantizationMethod.SYMMETRIC,
            weights_n_bits=bits, weights_per_channel_threshold=True, enable_weights_quantization=True)

    def op(w_bits: int | None, a_bits: int, act_on: bool = True):  # noqa: ANN202
        attrs = {} if w_bits is None else {KERNEL_ATTR: kernel(w_bits), BIAS_ATTR: no_weights}  # float bias
        return schema.OpQuantizationConfig(
            default_weight_attr_config=no_weights, attr_weights_configs_mapping=attrs,
            activation_quantization_method=QuantizationMethod.SYMMETRIC, activation_n_bits=a_bits,
            supported_input_activation_n_bits=act_choices, enable_activation_quantization=act_on,
            quantization_preserving=False, signedness=schema.Signedness.AUTO)

    def options(configs):  # noqa: ANN001,ANN202 - the first is the base (non-mixed-precision) choice
        unique = [c for i, c in enumerate(configs) if c not in configs[:i]]  # W8A8: the variants coincide
        return schema.QuantizationConfigOptions(quantization_configurations=tuple(unique), base_config=unique[0])

    # MCT wants exactly one default option; it serves the operators no set names: the image
    # input and the average pooling (both 8-bit in lowbit).
    default = options([op(None, 8)])
    activation = options([op(None, act_bits), op(None, 8)])
    # Order matters: MCT's manual selection takes the first option left after filtering by
    # the requested activation bits, then by the requested weight bits.
    conv = options([op(weight_bits, act_bits), op(weight_bits, 8), op(8, act_bits), op(8, 8)])
    linear = options([op(weight_bits, 8, act_on=False), op(8, 8, act_on=False)])  # logits stay float
    passthrough = options([op(None, 8, act_on=False)])
    sets = [schema.OperatorsSet(name=n, qc_options=passthrough) for n in (
        names.FLATTEN, names.GET_ITEM, names.PAD, names.RESHAPE, names.SIZE, names.DROPOUT, names.SQUEEZE,
        names.UNSQUEEZE, names.PERMUTE, names.TRANSPOSE, names.SPLIT_CHUNK, names.ZERO_PADDING2D)]
    conv_set = schema.OperatorsSet(name=names.CONV, qc_options=conv)
    fc_set = schema.OperatorsSet(name=names.FULLY_CONNECTED, qc_options=linear)
    relu = schema.OperatorsSet(name=names.RELU, qc_options=activation)
    relu6 = schema.OperatorsSet(name=names.RELU6, qc_options=activation)
    add = schema.OperatorsSet(name=names.ADD, qc_options=activation)
    sets += [conv_set, fc_set, relu, relu6, add]
    any_relu = schema.OperatorSetGroup(operators_set=[relu, relu6])
    fusing = [schema.Fusing(operator_groups=(conv_set, any_relu)), schema.Fusing(operator_groups=(fc_set, any_relu)),
              schema.Fusing(operator_groups=(add, any_relu))]
    return schema.TargetPlatformCapabilities(
        default_qco=default, operator_set=tuple(sets), fusing_patterns=tuple(fusing),
        tpc_minor_version=1, tpc_patch_version=0, tpc_platform_type="lowbit_peer",
        name=f"lowbit_w{weight_bits}a{act_bits}", add_metadata=False, is_simd_padding=False)


def eight_bit_nodes(model: nn.Module) -> tuple[list[str], list[str]]:
    """The fx node names lowbit keeps at 8 bits: activations (image input, conv outputs that
    enter a residual add, the pooling input and output) and weights (first conv, last Linear).
    MCT reads the model with torch.fx, so its node names are fx's, except that a conv with
    its BatchNorm folded in becomes ``<conv>_bn``."""
    gm = torch.fx.symbolic_trace(model)
    modules = dict(gm.named_modules())
    nodes = list(gm.graph.nodes)

    def module_of(node):  # noqa: ANN001,ANN202
        return modules.get(node.target) if node.op == "call_module" else None

    def mct_name(conv):  # noqa: ANN001,ANN202
        users = list(conv.users)
        folded = len(users) == 1 and isinstance(module_of(users[0]), nn.BatchNorm2d)
        return conv.name + "_bn" if folded else conv.name

    convs = [n for n in nodes if isinstance(module_of(n), nn.Conv2d)]
    linears = [n for n in nodes if isinstance(module_of(n), nn.Linear)]
    acts = [n.name for n in nodes if n.op == "placeholder"]
    for n in nodes:
        if n.op == "call_function" and n.target in (operator.add, torch.add):
            for arg in n.args[:2]:
                if isinstance(module_of(arg), nn.BatchNorm2d):  # folded into its conv by MCT
                    arg = arg.args[0]
                if isinstance(module_of(arg), nn.Conv2d):
                    acts.append(mct_name(arg))
    pools = [n for n in nodes if n.op == "call_function" and "avg_pool" in getattr(n.target, "__name__", "")]
    if len(pools) != 1:
        raise RuntimeError(f"expected one average-pooling node, found {[p.name for p in pools]}")
    acts += [pools[0].args[0].name, pools[0].name]
    return acts, [mct_name(convs[0]), linears[-1].name]


def mct_quantize(model: nn.Module, calib: torch.Tensor, config: str, flow: str,
                 gptq_epochs: int = GPTQ_EPOCHS) -> nn.Module:
    import model_compression_toolkit as mct
    from model_compression_toolkit.core.common.network_editors.node_filters import NodeNameFilter
    from model_compression_toolkit.target_platform_capabilities.constants import PYTORCH_KERNEL

    weight_bits, act_bits = BITS[config]
    tpc = build_tpc(weight_bits, act_bits, config in AFFINE)
    acts8, weights8 = eight_bit_nodes(model)
    bwc = mct.core.BitWidthConfig()
    bwc.set_manual_activation_bit_width([NodeNameFilter(n) for n in acts8], 8)
    # by the layer's own attribute name ("weight"): the graph nodes carry the framework names
    bwc.set_manual_weights_bit_width([NodeNameFilter(n) for n in weights8], 8, PYTORCH_KERNEL)
    qc = mct.core.QuantizationConfig(activation_error_method=mct.core.QuantizationErrorMethod.MSE,
                                     weights_error_method=mct.core.QuantizationErrorMethod.MSE,
                                     weights_bias_correction=True)
    core_config = mct.core.CoreConfig(quantization_config=qc, bit_width_config=bwc)

    def representative_data():  # noqa: ANN202 - MCT calls this for each pass over the data
        for i in range(0, len(calib), BATCH):
            yield [calib[i:i + BATCH]]

    if flow == "ptq":
        qmodel, _ = mct.ptq.pytorch_post_training_quantization(
            model, representative_data, core_config=core_config, target_platform_capabilities=tpc)
    else:
        # Sample-layer attention (MCT's default) needs per-sample Hessian scores of all 1,024
        # images (~15 minutes on one thread): the Hessian-weighted loss over 32 samples instead.
        gptq_config = mct.gptq.get_pytorch_gptq_config(n_epochs=gptq_epochs, use_hessian_sample_attention=False)
        qmodel, _ = mct.gptq.pytorch_gradient_post_training_quantization(
            model, representative_data, core_config=core_config, gptq_config=gptq_config,
            target_platform_capabilities=tpc)
    return qmodel


def describe(qmodel: nn.Module) -> list[str]:
    """Where MCT put quantizers and at which bits (stderr, for the record)."""
    lines = []
    for name, m in qmodel.named_modules():
        wq = getattr(m, "weights_quantizers", None)
        if wq:
            for attr, q in wq.items():
                lines.append(f"{name}.{attr}: {type(q).__name__} {getattr(q, 'num_bits', '?')} bits "
                             f"per_channel={getattr(q, 'per_channel', '?')}")
        aq = getattr(m, "activation_holder_quantizer", None)
        if aq is not None:
            lines.append(f"{name}: {type(aq).__name__} {getattr(aq, 'num_bits', '?')} bits "
                         f"signed={getattr(aq, 'signed', '?')}")
    return lines


def main() -> None:
    from peer_cli import parser, run

    ap = parser(__doc__, BITS, FLOWS, "ptq")
    ap.add_argument("--gptq-epochs", type=int, default=GPTQ_EPOCHS, help="flow gptq: epochs over the calibration set")
    ap.add_argument("--show-quantizers", action="store_true", help="list MCT's quantizers on stderr")
    args = ap.parse_args()
    import model_compression_toolkit as mct

    run(args, f"model-compression-toolkit {mct.__version__}",
        lambda model, calib: mct_quantize(model, calib, args.config, args.flow, args.gptq_epochs),
        describe if args.show_quantizers else None)

if __name__ == "__main__":
    main()
