"""Which layer hurts: per-layer quantization sensitivity of a QuantModel (issue 13 part 3).

For every quantized layer: the SQNR of its weights, the SQNR of its output inside the fully
quantized network (against the float network's output of the same layer, same inputs), the
top-1 when *only* that layer is quantized (weights and input), and the top-1 when every layer
*but* that one is quantized. Layers are ranked by the drop they cause alone. Before the layers,
which side loses: top-1 with only the weights quantized (the deployed weights, activations float)
and with only the activations (the float weights as built, activations on their grids), since
bits given to the wrong side buy nothing (ResNet-20 W4A4 loses all of its gap in the activations).

Switching a layer off here switches its weight quantizer and its input quantizer. An input
quantizer is shared by every reader of its tensor (one QDQ per tensor, what integer runtimes
run), so those layers switch together; the report names the sharers. "Float" means the layer as
the network was built (``QuantModel.float_reference``), so weights and biases that steps edited
(bias correction, GPTQ, AdaRound, AdaQuant) count as part of that layer's quantization.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Iterator

import torch
from tqdm import tqdm

from lowbit.api import evaluate
from lowbit.errors import LowbitError
from lowbit.model.quant_model import QuantModel


@dataclass
class LayerSensitivity:
    name: str
    quantizer: str
    w_bits: int
    a_bits: int
    weight_sqnr_db: float
    output_sqnr_db: float
    top1_only_this_quantized: float
    top1_all_but_this_quantized: float
    drop_alone_pt: float          # float top-1 minus top-1 with only this layer quantized
    recovered_pt: float           # top-1 with this layer kept float minus the fully quantized top-1
    shares_input_quantizer_with: list[str]

    def row(self) -> dict[str, Any]:
        d = asdict(self)
        d["shares_input_quantizer_with"] = ",".join(self.shares_input_quantizer_with)
        return {k: round(v, 2) if isinstance(v, float) else v for k, v in d.items()}


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """10·log10(‖ref‖² / ‖ref − approx‖²); inf when they are equal, -inf when ref is all zero."""
    signal = float(reference.double().pow(2).sum())
    noise = float((reference.double() - approx.double()).pow(2).sum())
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10 * math.log10(signal / noise)


def _batches(data: Iterable[Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for batch in data:
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
            raise LowbitError("analyze needs (input, label) batches, e.g. a DataLoader over a labelled dataset")
        out.append((batch[0], batch[1]))
    if not out:
        raise LowbitError("analyze got no data: pass (input, label) batches from the training split")
    return out


@contextlib.contextmanager
def _only(qm: QuantModel, record: Any, on: bool) -> Iterator[None]:
    """``on``: only this layer quantized, every other layer the original float one; else: this
    layer the original float one (weights and bias as built, before any step edited them), the
    rest as quantized. Under ``shortcut: stream`` "float" switches off the layer's own requantizer
    only: its input stays on the 8-bit residual stream the block's add reads too."""
    layer, q = record.layer, record.input_quantizer
    own = {id(t) for t in [*layer.parameters(), *layer.buffers()]}
    originals = [(t, f) for t, f in qm._float_copy if id(t) in own]
    current = [t.data for t, _ in originals]
    saved = (layer.quantize_weight, q.enabled if q is not None else None)
    outer = qm.float_reference() if on else contextlib.nullcontext()
    with outer:
        try:
            for (t, f), c in zip(originals, current):
                t.data = c if on else f
            layer.quantize_weight = on and saved[0]
            if q is not None:
                q.enabled = on and bool(saved[1])
            yield
        finally:
            for (t, _), c in zip(originals, current):
                t.data = c
            layer.quantize_weight = saved[0]
            if q is not None:
                q.enabled = saved[1]


@torch.no_grad()
def _layer_outputs(qm: QuantModel, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every layer's output on ``x``, by layer name."""
    outputs: dict[str, torch.Tensor] = {}
    handles = [r.layer.register_forward_hook(lambda _m, _i, out, n=r.name: outputs.__setitem__(n, out.detach()))
               for r in qm.layers]
    try:
        qm(x)
    finally:
        for h in handles:
            h.remove()
    return outputs


@torch.no_grad()
def _layer_weights(qm: QuantModel) -> dict[str, torch.Tensor]:
    """Every layer's (folded) weight as it is now, by layer name: called under
    ``float_reference``, the weights from before any step edited them (GPTQ and AdaRound
    leave a weight on its grid, which compared with itself would show no error)."""
    return {r.name: r.layer.weight.detach().clone() for r in qm.layers}


def analysis_payload(result: dict[str, Any]) -> dict[str, Any]:
    """:func:`analyze`'s result as plain JSON-ready data (each layer its ``row()``): what
    ``lowbit analyze --json`` writes and ``json.dumps`` takes."""
    return {**result, "layers": [r.row() if isinstance(r, LayerSensitivity) else r for r in result["layers"]]}


def analyze(qm: QuantModel, data: Iterable[Any], progress: bool = True) -> dict[str, Any]:
    """Per-layer sensitivity of ``qm`` on ``data`` ((input, label) batches; use training-split
    images, not the test split). Returns float and quantized top-1 (in %), the weights-only and
    activations-only top-1, and the layers (LayerSensitivity), most harmful first. The result
    goes to ``lowbit.html_report`` as it is (``ReportInputs(analysis=...)``); for JSON, use
    :func:`analysis_payload`."""
    if not isinstance(qm, QuantModel):
        raise LowbitError(f"analyze takes a QuantModel (from lowbit.quantize), got {type(qm).__name__}")
    batches = _batches(data)
    was_training = qm.training
    qm.eval()
    try:
        with qm.float_reference():
            float_top1 = evaluate(qm, batches)
            float_out = _layer_outputs(qm, batches[0][0])
            float_w = _layer_weights(qm)
        quant_top1 = evaluate(qm, batches)
        quant_out = _layer_outputs(qm, batches[0][0])
        with qm.quantization(activations=False):
            weights_only = evaluate(qm, batches)
        with qm.float_reference(activations=True):
            activations_only = evaluate(qm, batches)
        readers: dict[int, list[str]] = {}
        for r in qm.layers:
            if r.input_quantizer is not None and r.input_quantizer.enabled:
                readers.setdefault(id(r.input_quantizer), []).append(r.name)
        active = [r for r in qm.layers if r.layer.quantize_weight or (r.input_quantizer is not None
                                                                        and r.input_quantizer.enabled)]
        rows = []
        for r in tqdm(active, desc="analyze", unit="layer", disable=not progress, leave=False):
            with torch.no_grad():
                w_sqnr = sqnr_db(float_w[r.name], r.layer.quantized_weight()) if r.layer.quantize_weight else math.inf
            with _only(qm, r, on=True):
                alone = evaluate(qm, batches)
            with _only(qm, r, on=False):
                but = evaluate(qm, batches)
            sharers = readers.get(id(r.input_quantizer), []) if r.input_quantizer is not None else []
            rows.append(LayerSensitivity(
                name=r.name, quantizer=getattr(r.layer.weight_quantizer, "kind", "uniform"),
                w_bits=int(r.w_bits), a_bits=int(r.a_bits), weight_sqnr_db=w_sqnr,
                output_sqnr_db=sqnr_db(float_out[r.name], quant_out[r.name]),
                top1_only_this_quantized=100 * alone, top1_all_but_this_quantized=100 * but,
                drop_alone_pt=100 * (float_top1 - alone), recovered_pt=100 * (but - quant_top1),
                shares_input_quantizer_with=[n for n in sharers if n != r.name]))
    finally:
        qm.train(was_training)
    rows.sort(key=lambda s: (-s.drop_alone_pt, -s.recovered_pt))
    return {"float_top1": 100 * float_top1, "quantized_top1": 100 * quant_top1,
            "weights_only_top1": 100 * weights_only, "activations_only_top1": 100 * activations_only,
            "images": sum(len(y) for _, y in batches), "layers": rows}
