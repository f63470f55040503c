"""Run exported ONNX models in ONNX Runtime or OpenVINO behind the interface of a torch model."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from lowbit.errors import DataMismatchError, LowbitError

RUNTIMES = ("ort", "openvino")
RUNTIME_ALIASES = {"ort": "ort", "onnxruntime": "ort", "openvino": "openvino", "ov": "openvino"}


def runtime_name(runtime: str) -> str:
    """The canonical runtime name for ``runtime`` (``ort``/``onnxruntime``, ``openvino``/``ov``)."""
    key = str(runtime).strip().lower()
    if key not in RUNTIME_ALIASES:
        raise LowbitError(f"unknown runtime {runtime!r}; choose one of: {', '.join(RUNTIMES)}")
    return RUNTIME_ALIASES[key]


def check_input_shape(x_shape: tuple[int, ...], expected: tuple[int | None, ...] | None, path: Path,
                      name: str) -> None:
    """Refuse an input that cannot fit before the runtime sees it: ONNX Runtime and OpenVINO
    answer a wrong rank or channel count with their own errors, deep in shape inference.
    ``expected``: one entry per dimension, None where dynamic (the batch); None: rank not fixed."""
    if expected is None:
        return
    fits = len(x_shape) == len(expected) and all(e is None or e == d for d, e in zip(x_shape, expected))
    if not fits:
        want = ", ".join(str(e) if e is not None else "batch" if i == 0 else "any" for i, e in enumerate(expected))
        raise DataMismatchError(f"ONNX model {path} expects input {name!r} of shape ({want}), got "
                                f"{tuple(x_shape)}")


def _static(dim: Any) -> int | None:
    """An ONNX Runtime dimension: an int where fixed, a name or None where dynamic."""
    return dim if isinstance(dim, int) and not isinstance(dim, bool) and dim > 0 else None


def _ort_runner(path: Path, threads: int | None) -> tuple[Callable[[np.ndarray], np.ndarray], str,
                                                          tuple[int | None, ...] | None]:
    try:
        import onnxruntime as ort
    except ImportError:
        raise LowbitError("running ONNX models needs onnxruntime: pip install 'lowbit[deploy]'") from None
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - ORT raises several unrelated types
        raise LowbitError(f"ONNX Runtime cannot load {path}: {err}") from None
    first = session.get_inputs()[0]
    name = first.name
    shape = tuple(_static(d) for d in first.shape) if isinstance(first.shape, (list, tuple)) else None
    return (lambda x: session.run(None, {name: x})[0]), name, shape


class _OpenVinoRunner:
    """One compiled model per input shape: OpenVINO's CPU plugin runs static shapes fastest,
    and a deployment runs a handful of batch sizes, so each is compiled once on first use."""

    def __init__(self, path: Path, threads: int | None, precision: str = "f32") -> None:
        try:
            import openvino as ov
        except ImportError:
            raise LowbitError("the OpenVINO runtime needs openvino: pip install 'lowbit[openvino]'") from None
        self.core = ov.Core()
        try:
            self.model = self.core.read_model(str(path))
        except Exception as err:  # noqa: BLE001 - OpenVINO raises its own generic errors
            raise LowbitError(f"OpenVINO cannot read {path}: {err}") from None
        self.input_name = self.model.inputs[0].get_any_name()
        self.input_shape = self._declared_shape()
        self.config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if precision != "auto":
            # On a CPU with bf16 units the plugin runs every float op in bf16 unless told otherwise: a codebook
            # layer (float by design) then scored 0.047 off per logit against ONNX Runtime and the model.
            self.config["INFERENCE_PRECISION_HINT"] = precision
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = threads
        self.compiled: dict[tuple[int, ...], Any] = {}

    def _declared_shape(self) -> tuple[int | None, ...] | None:
        shape = self.model.inputs[0].get_partial_shape()
        if shape.rank.is_dynamic:
            return None
        return tuple(d.get_length() if d.is_static else None for d in shape)

    def request(self, shape: tuple[int, ...]) -> Any:
        if shape not in self.compiled:
            try:  # reshape runs shape inference, which is where a shape that does not fit fails
                model = self.model.clone()
                model.reshape({self.input_name: list(shape)})
                self.compiled[shape] = self.core.compile_model(model, "CPU", self.config).create_infer_request()
            except Exception as err:  # noqa: BLE001
                raise LowbitError(f"OpenVINO cannot compile the model for input shape {shape}: {err}") from None
        return self.compiled[shape]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        req = self.request(tuple(x.shape))
        req.infer({0: x})
        return np.array(req.get_output_tensor(0).data, copy=True)


# OpenVINO's float arithmetic: f32 computes what the model says (the default here); bf16, or auto (the CPU
# plugin's own choice: bf16 where the CPU has bf16 units), trade that for speed in the layers left in float.
OPENVINO_PRECISIONS = ("f32", "bf16", "auto")


class OnnxModel(nn.Module):
    """An exported ONNX model as an nn.Module, so ``lowbit.evaluate`` and the benchmarks
    treat it like any model. ``runtime`` is ``"ort"`` (ONNX Runtime, CPU provider) or
    ``"openvino"`` (OpenVINO CPU plugin); ``threads`` fixes intra-op threads;
    ``openvino_precision`` the arithmetic of OpenVINO's float ops (see OPENVINO_PRECISIONS)."""

    def __init__(self, path: str | Path, threads: int | None = None, runtime: str = "ort",
                 openvino_precision: str = "f32") -> None:
        super().__init__()
        self.runtime = runtime_name(runtime)
        if openvino_precision not in OPENVINO_PRECISIONS:
            raise LowbitError(f"openvino_precision must be one of {', '.join(OPENVINO_PRECISIONS)}, "
                              f"got {openvino_precision!r}")
        path = Path(path)
        if path.is_dir():
            raise LowbitError(f"ONNX model path {path} is a directory, not an .onnx file")
        if not path.is_file():
            raise LowbitError(f"ONNX model {path} does not exist")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise LowbitError(f"threads must be a positive integer, got {threads!r}")
        self.path = path
        if self.runtime == "ort":
            self._run, self.input_name, self.input_shape = _ort_runner(path, threads)
        else:
            runner = _OpenVinoRunner(path, threads, openvino_precision)
            self._run, self.input_name, self.input_shape = runner, runner.input_name, runner.input_shape

    def run_numpy(self, x: np.ndarray) -> np.ndarray:
        check_input_shape(tuple(x.shape), self.input_shape, self.path, self.input_name)
        return self._run(np.ascontiguousarray(x, dtype=np.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.run_numpy(x.detach().cpu().numpy()))
