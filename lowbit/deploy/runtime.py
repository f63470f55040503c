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


# Input element types OnnxModel can feed, by their ONNX Runtime ("tensor(float)") and OpenVINO ("f32") names.
_ORT_DTYPES = {"float": np.float32, "float16": np.float16, "double": np.float64, "uint8": np.uint8, "int8": np.int8,
               "uint16": np.uint16, "int16": np.int16, "int32": np.int32, "int64": np.int64, "bool": np.bool_}
_OPENVINO_DTYPES = {"f32": np.float32, "f16": np.float16, "f64": np.float64, "u8": np.uint8, "i8": np.int8,
                    "u16": np.uint16, "i16": np.int16, "i32": np.int32, "i64": np.int64, "boolean": np.bool_}


def _input_dtype(declared: str, table: dict[str, Any], path: Path, name: str) -> np.dtype:
    """The numpy dtype of the model's declared input type: inputs are cast to it (a float16
    model gets float16), never blindly to float32."""
    if declared not in table:
        raise LowbitError(f"ONNX model {path} declares input {name!r} of type {declared}, which lowbit cannot "
                          f"feed from a tensor (it feeds float16/32/64 and integer inputs)")
    return np.dtype(table[declared])


def _static(dim: Any) -> int | None:
    """An ONNX Runtime dimension: an int where fixed, a name or None where dynamic."""
    return dim if isinstance(dim, int) and not isinstance(dim, bool) and dim > 0 else None


def _ort_runner(path: Path, threads: int | None) -> tuple[Callable[[np.ndarray], np.ndarray], str,
                                                          tuple[int | None, ...] | None, np.dtype]:
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
    declared = str(first.type)
    declared = declared[len("tensor("):-1] if declared.startswith("tensor(") and declared.endswith(")") else declared
    dtype = _input_dtype(declared, _ORT_DTYPES, path, name)
    return (lambda x: session.run(None, {name: x})[0]), name, shape, dtype


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
        self.input_dtype = _input_dtype(self.model.inputs[0].get_element_type().get_type_name(), _OPENVINO_DTYPES,
                                        path, self.input_name)
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


def onnx_metadata(path: str | Path) -> dict[str, str]:
    """The key/value metadata of an ONNX file (``lowbit.arch``, ``lowbit.dataset`` from lowbit's
    export; empty for files from other tools or older lowbit versions). Reads the graph, not
    external weight files."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # a damaged file: named here, as the runtimes name it
        raise LowbitError(f"cannot read ONNX model {path}: {err}") from None
    return {p.key: p.value for p in model.metadata_props}


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
            self._run, self.input_name, self.input_shape, self.input_dtype = _ort_runner(path, threads)
        else:
            runner = _OpenVinoRunner(path, threads, openvino_precision)
            self._run, self.input_name, self.input_shape = runner, runner.input_name, runner.input_shape
            self.input_dtype = runner.input_dtype

    def _fit_input(self, x: np.ndarray) -> np.ndarray:
        """``x`` in the model's declared input type. Refused, not cast: integer data for a float
        input (raw uint8 pixels would run unnormalised and score garbage) and an empty batch
        (ONNX Runtime returned an empty output, OpenVINO failed to compile: one answer for both)."""
        if x.ndim and x.shape[0] == 0:
            raise DataMismatchError(f"ONNX model {self.path}: input {self.input_name!r} of shape {tuple(x.shape)} "
                                    "holds no samples; give at least one")
        want = self.input_dtype
        if np.issubdtype(want, np.floating):
            if not np.issubdtype(x.dtype, np.floating):
                raise DataMismatchError(f"ONNX model {self.path} expects input {self.input_name!r} as {want.name} "
                                        f"(floating point), got {x.dtype}: convert the data to float (normalised "
                                        "as for training) first")
        elif x.dtype != want:  # an integer input: casting floats or other integers to it could silently wrap
            raise DataMismatchError(f"ONNX model {self.path} expects input {self.input_name!r} as {want.name}, "
                                    f"got {x.dtype}")
        return np.ascontiguousarray(x, dtype=want)

    def run_numpy(self, x: np.ndarray) -> np.ndarray:
        check_input_shape(tuple(x.shape), self.input_shape, self.path, self.input_name)
        return self._run(self._fit_input(np.asarray(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:  # numpy has no bfloat16; widening to float32 is exact
            x = x.float()
        return torch.from_numpy(self.run_numpy(x.numpy()))
