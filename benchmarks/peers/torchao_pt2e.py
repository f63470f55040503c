"""Peer: PyTorch's PT2E post-training flow (torch.export, prepare_pt2e, calibrate, convert_pt2e)
with the X86 Inductor quantizer's default int8 configuration (per-channel symmetric weights,
per-tensor affine activations), as torchao ships it now that torch.ao's copy is gone.

Runs in a venv of its own (torchao is never a lowbit dependency):

    python3 -m venv ../venvs/torchao && ../venvs/torchao/bin/pip install torch==2.13.0 torchao
    ../venvs/torchao/bin/pip install -e .          # for the model, data and calibration subset
    ../venvs/torchao/bin/python benchmarks/peers/torchao_pt2e.py --model resnet20

Calibrates on lowbit's 1,024 calibration images (the w8a8 recipe's seeded subset) and prints one
JSON line: top-1 on the full test split (the converted reference model run in PyTorch) and the
quantize wall time (export, prepare, calibration, convert).
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--models-dir", default="../shared/models")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import torchao
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)

    import lowbit
    from lowbit.data import load_dataset
    from lowbit.evaluation import TensorBatches, calibration_batches
    from lowbit.zoo import model_info, pretrained

    model = pretrained(args.model, models_dir=args.models_dir, download=False).eval()
    dataset = model_info(args.model).dataset
    train = load_dataset(dataset, "train", data_dir=args.data_dir, download=False)
    test = load_dataset(dataset, "test", data_dir=args.data_dir, download=False)
    calib = calibration_batches(train, lowbit.load_recipe("w8a8"))
    start = time.perf_counter()
    batch = torch.export.Dim("batch", min=1, max=1024)
    exported = torch.export.export(model, (calib[0],), dynamic_shapes=({0: batch},)).module()
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for x in calib:
            prepared(x)
    converted = convert_pt2e(prepared)
    move_exported_model_to_eval(converted)
    seconds = time.perf_counter() - start
    # Scored here, not with lowbit.evaluate: an exported program refuses .eval() (it switches modes
    # through move_exported_model_to_eval above), and lowbit.evaluate calls it.
    correct = total = 0
    with torch.no_grad():
        for x, y in TensorBatches(test, 500):
            correct += int((converted(x).argmax(1) == y).sum())
            total += len(y)
    print(json.dumps({"top1": 100 * correct / total, "test_images": total, "seconds": seconds,
                      "version": f"torchao {torchao.__version__} (PT2E, X86InductorQuantizer)",
                      "calibration_images": sum(len(x) for x in calib)}))


if __name__ == "__main__":
    main()
