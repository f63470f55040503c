"""The peers benchmark's ONNX Runtime W4A4 layout: 4-bit everywhere except the first conv and the
classifier (weights and inputs, and the pooled tensor the classifier's Flatten reads), which stay
8-bit as in lowbit's recipes, so the side-by-side rows compare the same layout."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import onnx
import torch
from torch import nn

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _peers():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("peers_bench", BENCH / "peers.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _types(path: Path) -> dict[str, str]:
    """The integer type of every quantized tensor: weights by their initializer, activations by
    their zero point."""
    m = onnx.load(str(path))
    inits = {i.name: i for i in m.graph.initializer}
    out = {}
    for node in m.graph.node:
        if node.op_type == "DequantizeLinear":
            src = node.input[0]
            t = inits[src].data_type if src in inits else inits[node.input[2]].data_type
            out[src] = onnx.TensorProto.DataType.Name(t)
    return out


def test_ort_w4a4_keeps_the_first_and_last_layers_at_8_bits(tmp_path):
    import lowbit
    from lowbit.deploy.onnx_export import export_onnx

    peers = _peers()
    torch.manual_seed(0)
    calib = [torch.randn(16, 3, 8, 8) for _ in range(2)]
    qm = lowbit.quantize(Net().eval(), "w8a8", calib=calib, progress=False)
    with qm.quantization(weights=False, activations=False):
        float_onnx = export_onnx(qm, tmp_path / "float.onnx", calib[0][:1])
    edges = peers.eight_bit_edges(float_onnx)
    assert sorted(edges.values()).count("weight") == 2 and len(edges) == 5
    types = _types(peers.ort_static(float_onnx, tmp_path / "q.onnx", calib, "w4a4", "minmax"))
    weights = {k: v for k, v in types.items() if k.endswith("_quantized") and "bias" not in k}
    eight = {k for k, v in weights.items() if v == "INT8"}
    assert eight == {f"{name}_quantized" for name, role in edges.items() if role == "weight"}
    assert len(weights) == 3 and all(v == "INT4" for k, v in weights.items() if k not in eight)
    acts = {k: v for k, v in types.items() if k.endswith("QuantizeLinear_Output")}
    assert sum(v == "UINT8" for v in acts.values()) == 3  # the input, the pooled tensor, the flattened one
    assert any(v == "UINT4" for v in acts.values())
