"""What every peer script shares: its command line, lowbit's model and calibration images for
the seed, the timed quantization, and the one JSON line of results (stdout carries only it)."""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from typing import Callable

import torch
from torch import nn


def parser(doc: str, bits: dict, flows: tuple[str, ...], default_flow: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--config", default="w4a4", choices=sorted(bits))
    ap.add_argument("--flow", default=default_flow, choices=flows)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--models-dir", default="../shared/models")
    ap.add_argument("--test-samples", type=int, default=0, help="0: the full test split")
    return ap


def run(args: argparse.Namespace, tool: str, quantize: Callable[[nn.Module, torch.Tensor], nn.Module],
        describe: Callable[[nn.Module], list[str]] | None = None) -> None:
    """Quantize lowbit's zoo model on lowbit's calibration images for the seed (timed; the
    tool's own prints go to stderr), score it on the test split and print the JSON line."""
    torch.set_num_threads(args.threads)
    from lowbit.api import evaluate
    from lowbit.data import load_dataset
    from lowbit.evaluation import TensorBatches, calibration_batches
    from lowbit.recipes.recipe import load_recipe
    from lowbit.zoo import pretrained

    model = pretrained(args.model, models_dir=args.models_dir, download=False).eval()
    train = load_dataset("cifar10", "train", data_dir=args.data_dir, download=False)
    test = load_dataset("cifar10", "test", data_dir=args.data_dir, download=False)
    recipe = load_recipe({"extends": "w4a4", "calibration": {"seed": args.seed}})
    calib = torch.cat(calibration_batches(train, recipe))
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        qmodel = quantize(model, calib)
    seconds = time.perf_counter() - start
    if describe is not None:
        print("\n".join(describe(qmodel)), file=sys.stderr)
    batches = list(TensorBatches(test, 500))
    if args.test_samples:  # a quick look: the first whole batches covering that many images
        batches = batches[:-(-args.test_samples // 500)]
    with torch.no_grad():
        top1 = evaluate(qmodel, batches)
    print(json.dumps({"tool": tool, "flow": args.flow, "config": args.config, "seed": args.seed, "top1": 100 * top1,
                      "test_images": sum(len(b[1]) for b in batches), "quant_seconds": seconds,
                      "threads": args.threads, "calibration_images": len(calib)}))
