"""Run exported ONNX models in ONNX Runtime behind the same interface as a torch model."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from lowbit.errors import LowbitError


class OnnxModel(nn.Module):
    """An ONNX Runtime session (CPU provider) as an nn.Module, so ``lowbit.evaluate`` and
    the benchmarks treat it like any model. ``threads`` fixes intra-op threads."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError:
            raise LowbitError("running ONNX models needs onnxruntime: pip install 'lowbit[deploy]'") from None

        path = Path(path)
        if not path.is_file():
            raise LowbitError(f"ONNX model {path} does not exist")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001 - ORT raises several unrelated types
            raise LowbitError(f"ONNX Runtime cannot load {path}: {err}") from None
        self.input_name = self.session.get_inputs()[0].name
        self.path = path

    def run_numpy(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.run_numpy(x.detach().cpu().numpy()))
