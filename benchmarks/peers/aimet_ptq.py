"""Qualcomm AIMET's post-training flow on a lowbit CIFAR ResNet, for the side-by-side PTQ table
(issue 16). Runs in a venv of its own (AIMET is never a lowbit dependency):

    python3 -m venv ../venvs/aimet && ../venvs/aimet/bin/pip install aimet-torch==2.42.0 \\
        torch==2.14.1 torchvision==0.29.1
    ../venvs/aimet/bin/pip install --no-deps -e .  # the model, data and calibration subset (keeps AIMET's torch)
    ../venvs/aimet/bin/python benchmarks/peers/aimet_ptq.py --config w4a4 --flow ptq --seed 0 --threads 1

Prints one JSON line: top-1 on the full test split and the quantize wall time (model
preparation, BN folding, building the QuantizationSimModel, setting the bit widths and
computing the encodings; evaluation excluded). The calibration images are lowbit's own subset
for the seed (the same 1,024 training images every tool sees), run through the sim in 8
batches of 128; AIMET's log lines go to stderr.

Flow "ptq" is AIMET's documented PTQ path: ``aimet_torch.model_preparer.prepare_model``
(functional ReLU/add/pad/pooling become modules), ``fold_all_batch_norms``, then
``QuantizationSimModel(quant_scheme=QuantScheme.post_training_tf_enhanced)`` with AIMET's
default config (per-channel weights, per-tensor asymmetric activations, Conv+ReLU and
Add+ReLU fused; copied with the weights' symmetry set per config) and ``compute_encodings``
over the calibration images. The SQNR-based "TF-enhanced" range search applies to weights and
activations alike. No bias correction.

Flow "adaround" runs ``Adaround.apply_adaround`` (AIMET's AdaRound: layer-wise learned
weight rounding, activations unquantized while it learns, TF-enhanced weight ranges) on the
folded model with ADAROUND_ITERS = 500 iterations a layer (AIMET's default is 10,000-15,000;
500 keeps it to ~3 minutes on one thread; --adaround-iters changes it) over the 8 batches,
then the same sim as "ptq" with AdaRound's weight encodings loaded and frozen
(``set_and_freeze_param_encodings``) before the activation encodings are computed.

Bit widths: the sim is built at 8 bits and the quantizers are then changed through their
``bitwidth``/``symmetric`` properties before the encodings are computed (the constructor
refuses a default bit width under 4; AdaRound gets 8 and a per-layer override list).
Matching lowbit's convention (first_last_bits 8, add_bits 8):
  * weights per channel; the first conv and the last Linear at 8 bits, every other conv at
    W bits; symmetric for W4A4/W8A8/W4A8, asymmetric for W3A3 and W2A4;
  * activations per tensor (AIMET's asymmetric grid, which is unsigned after a ReLU): A bits
    on every ReLU output, 8 bits on the image input, on the conv outputs AIMET quantizes
    (the convs not fused with a ReLU: the residual add inputs), on the last ReLU (the pooling
    input) and on the pooled features (the classifier input);
  * the logits are not quantized (AIMET's output quantizer on the Linear is removed);
    slicing and padding carry their input's grid unquantized.
"""
from __future__ import annotations

import json
import os
import tempfile

import torch
from torch import nn

FLOWS = ("ptq", "adaround")
ADAROUND_ITERS = 500
BITS = {"w4a4": (4, 4), "w3a3": (3, 3), "w2a4": (2, 4), "w8a8": (8, 8), "w4a8": (4, 8)}
AFFINE = {"w3a3", "w2a4"}
BATCH = 128


def set_bits(sim_model: nn.Module, prepared: torch.fx.GraphModule, weight_bits: int, act_bits: int,
             affine: bool) -> None:
    """Apply lowbit's bit-width convention to AIMET's quantizers (8 bits as built)."""
    convs = [m for m in sim_model.modules() if type(m).__name__ == "QuantizedConv2d"]
    linears = [m for m in sim_model.modules() if type(m).__name__ == "QuantizedLinear"]
    for conv in convs[1:]:  # the first conv keeps 8-bit weights
        q = conv.param_quantizers["weight"]
        q.bitwidth = weight_bits
        q.symmetric = not affine
    for m in (convs[0], linears[-1]):
        m.param_quantizers["weight"].symmetric = not affine
    linears[-1].output_quantizers[0] = None  # lowbit leaves the logits in float
    # The module feeding the average pooling keeps an 8-bit output (lowbit's pooling input).
    pool = [n for n in prepared.graph.nodes if n.op == "call_module" and "avg_pool" in str(n.target)]
    if len(pool) != 1:
        raise RuntimeError(f"expected one average-pooling module, found {[str(p.target) for p in pool]}")
    pool_input = str(pool[0].args[0].target)
    for name, m in sim_model.named_modules():
        if type(m).__name__ == "QuantizedReLU" and name != pool_input and m.output_quantizers[0] is not None:
            m.output_quantizers[0].bitwidth = act_bits


def quantsim_config(affine: bool, folder: str) -> str:
    """AIMET's default config (per-channel weights) with the weights' symmetry as asked."""
    from aimet_torch.common.quantsim_config import quantsim_config as qc

    path = os.path.join(os.path.dirname(qc.__file__), qc._config_file_aliases["default"])  # noqa: SLF001
    with open(path) as f:
        cfg = json.load(f)
    cfg["defaults"]["params"]["is_symmetric"] = str(not affine)
    out = os.path.join(folder, "quantsim_config.json")
    with open(out, "w") as f:
        json.dump(cfg, f)
    return out


def aimet_quantize(model: nn.Module, calib: torch.Tensor, config: str, flow: str,
                   adaround_iters: int = ADAROUND_ITERS) -> nn.Module:
    from aimet_torch.batch_norm_fold import fold_all_batch_norms
    from aimet_torch.model_preparer import prepare_model

    weight_bits, act_bits = BITS[config]
    prepared = prepare_model(model)
    fold_all_batch_norms(prepared, input_shapes=tuple(calib[:1].shape))
    with tempfile.TemporaryDirectory(prefix="aimet_ptq_") as folder:  # config and AdaRound encodings
        return _quantize_prepared(prepared, calib, weight_bits, act_bits, config in AFFINE, flow, adaround_iters,
                                  folder)


def _quantize_prepared(prepared: torch.fx.GraphModule, calib: torch.Tensor, weight_bits: int, act_bits: int,
                       affine: bool, flow: str, adaround_iters: int, folder: str) -> nn.Module:
    from aimet_torch.common.defs import QuantScheme
    from aimet_torch.quantsim import QuantizationSimModel

    cfg = quantsim_config(affine, folder)
    encodings = None
    if flow == "adaround":
        from aimet_torch.adaround.adaround_weight import Adaround, AdaroundParameters

        convs = [m for m in prepared.modules() if isinstance(m, nn.Conv2d)]
        batches = [calib[i:i + BATCH] for i in range(0, len(calib), BATCH)]
        params = AdaroundParameters(data_loader=batches, num_batches=len(batches),
                                    default_num_iterations=adaround_iters)
        # Built at 8 bits (AdaRound's default_param_bw accepts 4-31), then every conv but the
        # first overridden to W bits; the Linear stays at 8.
        prepared = Adaround.apply_adaround(
            prepared, calib[:1], params, path=folder, filename_prefix="adaround", default_param_bw=8,
            param_bw_override_list=[(c, weight_bits) for c in convs[1:]],
            default_quant_scheme=QuantScheme.post_training_tf_enhanced, default_config_file=cfg)
        encodings = os.path.join(folder, "adaround.encodings")
    sim = QuantizationSimModel(prepared, calib[:1], quant_scheme=QuantScheme.post_training_tf_enhanced,
                               default_output_bw=8, default_param_bw=8, config_file=cfg)
    set_bits(sim.model, prepared, weight_bits, act_bits, affine)
    if encodings is not None:
        sim.set_and_freeze_param_encodings(encodings)  # AdaRound's weight encodings, frozen

    def calibrate(sim_model: nn.Module) -> None:
        for i in range(0, len(calib), BATCH):
            sim_model(calib[i:i + BATCH])

    sim.compute_encodings(calibrate)
    return sim.model


def describe(qmodel: nn.Module) -> list[str]:
    """Where AIMET put quantizers and at which bits (stderr, for the record)."""
    lines = []
    for name, m in qmodel.named_modules():
        for kind in ("input_quantizers", "output_quantizers"):
            for i, q in enumerate(getattr(m, kind, None) or []):
                if q is not None:
                    lines.append(f"{name}.{kind}[{i}]: {q.bitwidth} bits symmetric={q.symmetric} "
                                 f"signed={q.signed} shape={tuple(q.shape)}")
        for attr, q in (getattr(m, "param_quantizers", None) or {}).items():
            if q is not None:
                lines.append(f"{name}.{attr}: {q.bitwidth} bits symmetric={q.symmetric} shape={tuple(q.shape)}")
    return lines


def main() -> None:
    from importlib.metadata import version

    from peer_cli import parser, run

    ap = parser(__doc__, BITS, FLOWS, "ptq")
    ap.add_argument("--adaround-iters", type=int, default=ADAROUND_ITERS, help="flow adaround: iterations a layer")
    ap.add_argument("--show-quantizers", action="store_true", help="list AIMET's quantizers on stderr")
    args = ap.parse_args()
    run(args, f"aimet-torch {version('aimet-torch')}",
        lambda model, calib: aimet_quantize(model, calib, args.config, args.flow, args.adaround_iters),
        describe if args.show_quantizers else None)

if __name__ == "__main__":
    main()
