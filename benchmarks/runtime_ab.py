"""A/B timing of two or more model files in one runtime: interleaved rounds of batch-64
runs, median per round and over rounds (the README's OpenVINO lowbit-vs-peer check), plus
the op types and precisions OpenVINO compiled each file into.

    python benchmarks/runtime_ab.py --runtime openvino /tmp/lowbit-runtime-bench/w8a8.onnx \\
        /tmp/lowbit-runtime-bench/ort_static.onnx --rounds 10
(the files are the ones benchmarks/runtime.py leaves in its --workdir)
"""
from __future__ import annotations

import argparse
import collections
import statistics
import time

import numpy as np

from lowbit.deploy.runtime import OnnxModel


def openvino_ops(path: str, threads: int) -> dict[str, int]:
    import openvino as ov

    core = ov.Core()
    model = core.read_model(path)
    model.reshape({model.inputs[0].get_any_name(): [64, 3, 32, 32]})
    compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"})
    counts: collections.Counter[str] = collections.Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str)
        if kind == "Convolution":
            kind += f" {info['runtimePrecision'].astype(str)}"
        counts[kind] += 1
    return dict(counts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--runtime", default="openvino")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    x = np.random.default_rng(0).random((64, 3, 32, 32), dtype=np.float32)
    models = {p: OnnxModel(p, threads=args.threads, runtime=args.runtime) for p in args.files}
    for m in models.values():
        for _ in range(10):
            m.run_numpy(x)
    rounds: dict[str, list[float]] = {p: [] for p in models}
    for _ in range(args.rounds):
        for p, m in models.items():
            times = []
            for _ in range(args.runs):
                start = time.perf_counter()
                m.run_numpy(x)
                times.append(time.perf_counter() - start)
            rounds[p].append(64 / statistics.median(times))
    for p, values in rounds.items():
        print(f"{p}: median {statistics.median(values):.0f} img/s over {args.rounds} rounds "
              f"(range {min(values):.0f}-{max(values):.0f})")
        if args.runtime == "openvino":
            print(f"  compiled ops: {openvino_ops(p, args.threads)}")


if __name__ == "__main__":
    main()
