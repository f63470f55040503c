"""Peer: NNCF post-training quantization of a float ONNX model for OpenVINO (its own
default, the 'performance' preset: symmetric int8 weights and activations).

Runs in a separate virtual environment (NNCF is never a lowbit dependency):

    /path/to/peer-venv/bin/python benchmarks/peers/nncf_openvino.py float.onnx calib.npy out.xml

``calib.npy`` holds the calibration images (N, C, H, W) float32, the same ones lowbit uses.
Prints the quantization wall time in seconds as JSON on the last line.
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np


def main() -> None:
    import nncf
    import openvino as ov

    float_path, calib_path, out_path = sys.argv[1:4]
    calib = np.load(calib_path)
    batches = [calib[i:i + 1] for i in range(len(calib))]
    start = time.perf_counter()
    model = ov.Core().read_model(float_path)
    quantized = nncf.quantize(model, nncf.Dataset(batches), subset_size=len(batches))
    ov.save_model(quantized, out_path)
    print(json.dumps({"seconds": time.perf_counter() - start, "nncf": nncf.__version__, "openvino": ov.__version__}))


if __name__ == "__main__":
    main()
