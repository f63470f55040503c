"""A short QAT probe on ResNet-20: N steps of one recipe from the pretrained model, then top-1
on 2,000 training-split images outside the 20,000 it trains on (a quick comparison of
settings, not the protocol's test-split score). Prints one JSON line.

    python benchmarks/short_qat_probe.py --recipe w2a32-twn --lr 0.002 --steps 100 [--qat '{"warmup": 0.3}']
        [--before '[{"gptq": {"target": "float"}}]']   # PTQ steps between calibrate and qat
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.data import Subset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--models-dir", default="../shared/models")
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--lr", type=float, default=0.002)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--qat", default="{}", help="more qat-step parameters as JSON")
    ap.add_argument("--before", default="[]", help="PTQ steps between calibrate and qat, as a JSON list")
    ap.add_argument("--seed", type=int, default=0, help="the qat step's seed")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import lowbit
    from lowbit.data import load_dataset, make_loader
    from lowbit.zoo import pretrained

    model = pretrained("resnet20", models_dir=args.models_dir, download=False)
    train = load_dataset("cifar10", "train", data_dir=args.data_dir, download=False)
    calib = torch.stack([train[i][0] for i in range(0, 50000, 98)][:512])
    qat = {"epochs": 1, "lr": args.lr, "steps_per_epoch": args.steps, "val_samples": 1000, "quantizer_lr": 0,
           "seed": args.seed, **json.loads(args.qat)}
    before = json.loads(args.before)
    start = time.time()
    qm = lowbit.quantize(model, {"extends": args.recipe, "steps": ["calibrate", *before, {"qat": qat}]}, calib=calib,
                         train=Subset(train, range(20000)), progress=False)
    top1 = lowbit.evaluate(qm, make_loader(Subset(train, range(45000, 47000)), 250))
    print(json.dumps({"recipe": args.recipe, "before": before, "qat": qat, "heldout2000": top1, "seconds": round(time.time() - start)}))


if __name__ == "__main__":
    main()
