"""What freezing BN does to a QAT run: from a saved training-form state (a QAT checkpoint's
``best.safetensors`` or ``state-<epoch>.safetensors``, written before its BN froze), take a few SGD
steps with the BN statistics frozen, or still training, and print each step's loss.

Why: a 30-epoch ternary run at lr 0.002 collapsed in the first steps after its BN froze
(training accuracy 95.7% -> 15%), while the same state trains smoothly with batch statistics.
The variants say which update does it (the layers' weights, the BN parameters, the 8-bit
first/last layers) and how much a quantized weight changes in one step.

    python benchmarks/bn_freeze_probe.py --state benchmarks/results/checkpoints/<run>/best.safetensors \
        --recipe w2a32-twn --lr 3.3e-4 --variants frozen,batch-stats,frozen-low-lr,frozen-bn-only,frozen-mid-weights,frozen-ends \
        --out benchmarks/results/bn_freeze_probe.jsonl
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

import lowbit
from lowbit.data import dataset_tensors, load_dataset
from lowbit.data.augment import random_crop_flip
from lowbit.qat.bn import FoldedBatchNorm
from lowbit.qat.convert import freeze_batchnorms, snap_latent_weights, to_training_form
from lowbit.qat.engine import QATConfig, distillation_loss, make_optimizer
from lowbit.recipes.recipe import load_recipe
from lowbit.zoo import pretrained

# variant: (BN frozen, lr multiplier, which parameters step: all | bn | mid | ends)
VARIANTS = {
    "frozen": (True, 1.0, "all"),
    "batch-stats": (False, 1.0, "all"),
    "frozen-low-lr": (True, 0.1, "all"),
    "frozen-bn-only": (True, 1.0, "bn"),         # the layers' weights held
    "frozen-mid-weights": (True, 1.0, "mid"),    # only the low-bit layers' weights step
    "frozen-ends": (True, 1.0, "ends"),          # only the 8-bit first/last layers' weights step
    "frozen-snapped": (True, 1.0, "all"),        # binary/ternary latent weights set to their quantized values first
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--state", required=True, help="a training-form state dict (safetensors) of a QAT checkpoint")
    ap.add_argument("--recipe", required=True, help="the recipe that checkpoint trained")
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--models-dir", default="../shared/models")
    ap.add_argument("--lr", type=float, default=3.3e-4)
    ap.add_argument("--weight-decay", type=float, default=5e-5)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--kd", default="4,1", help="temperature,weight of the distillation loss ('' for plain CE)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    train = load_dataset("cifar10", "train", data_dir=args.data_dir, download=False)
    model = pretrained("resnet20", models_dir=args.models_dir, download=False)
    teacher = copy.deepcopy(model).eval()
    recipe = load_recipe(args.recipe)
    calib = dataset_tensors(train, list(range(512)))[0]
    qm = lowbit.quantize(model, dict(recipe.source, steps=["calibrate"]), calib=calib, progress=False)
    to_training_form(qm, recipe.weights.quantizer, recipe.activations.quantizer, recipe.weights.quantizer_options,
                     recipe.activations.quantizer_options, [calib], True, 0.1)
    saved = load_file(args.state)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 45000, (128,), generator=g).tolist() for _ in range(args.steps)]
    kd = [float(v) for v in args.kd.split(",")] if args.kd else None
    layers = list(qm.layers)
    groups = {"bn": {id(p) for m in qm.modules() if isinstance(m, FoldedBatchNorm) for p in m.parameters()},
              "mid": {id(r.layer.module.weight) for r in layers[1:-1]},
              "ends": {id(layers[0].layer.module.weight), id(layers[-1].layer.module.weight)}}

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = qm(x)
        if kd is None:
            return torch.nn.functional.cross_entropy(out, y)
        with torch.no_grad():
            t = teacher(x)
        return distillation_loss(out, t, y, kd[0], kd[1])

    for name in args.variants.split(","):
        frozen, lr_mult, stepping = VARIANTS[name]
        qm.load_state_dict(saved)
        for m in qm.modules():
            if isinstance(m, FoldedBatchNorm):
                m.frozen = False
        if frozen:
            freeze_batchnorms(qm)
        if name == "frozen-snapped":  # W := Q(W·γ/σ)/(γ/σ): the same forward, no latent weight left at a threshold
            snap_latent_weights(qm)
        opt = make_optimizer(qm, QATConfig(lr=args.lr * lr_mult, weight_decay=args.weight_decay))
        qm.train()
        losses, first_change = [], {}
        for i, idx in enumerate(batches):
            x, y = dataset_tensors(train, idx)
            x = random_crop_flip(x, generator=torch.Generator().manual_seed(i))
            before = {r.name: r.layer.quantized_weight().detach().clone() for r in layers} if i == 0 else None
            loss = loss_of(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if stepping != "all":
                for p in qm.parameters():
                    if id(p) not in groups[stepping]:
                        p.grad = None
            opt.step()
            losses.append(round(loss.item(), 3))
            if before is not None:  # how far one step moves each layer's quantized weight, worst channel
                for r in layers:
                    a = r.layer.quantized_weight().detach().reshape(before[r.name].shape[0], -1)
                    b = before[r.name].reshape(a.shape[0], -1)
                    first_change[r.name] = round(float(((a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-12)).max()), 4)
        row = {"state": args.state, "recipe": args.recipe, "variant": name, "bn_frozen": frozen, "lr": args.lr * lr_mult,
               "stepping": stepping, "losses": losses, "first_step_max_channel_change": first_change}
        print(json.dumps({k: row[k] for k in ("variant", "lr", "losses")}), flush=True)
        if args.out:
            with Path(args.out).open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
