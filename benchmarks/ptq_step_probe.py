"""One-seed probe of PTQ step lists (full test split), one JSON line per step list:

    python benchmarks/ptq_step_probe.py '["calibrate","gptq",{"adaquant":{"iters":30}}]' ...

Environment: SEED=1 draws another 1,024 calibration images (default 0); BASE=w3a3 extends
another built-in (default w4a4), or BASE='{"extends": "w2a4", "weights": {...}}' is a recipe
of its own (JSON); MODEL=resnet32 probes another zoo model (default resnet20); OUT=FILE also
appends each line to FILE (JSON lines). FIDELITY=N adds "train_kl": the mean KL divergence of the
quantized model's predictions from the float model's on the split's last N training images, a
label-free score for choosing a setting without looking at the test split (the float model has
learnt those images' labels, so their top-1 cannot tell settings apart).
"""
import json
import os
import sys

import torch

from lowbit.api import evaluate, quantize
from lowbit.data import load_dataset
from lowbit.evaluation import TensorBatches, calibration_batches
from lowbit.recipes.recipe import load_recipe
from lowbit.zoo import pretrained

torch.set_num_threads(1)
MODEL = os.environ.get("MODEL", "resnet20")
SEED = int(os.environ.get("SEED", "0"))
BASE = os.environ.get("BASE", "w4a4")
BASE_RECIPE = json.loads(BASE) if BASE.startswith("{") else {"extends": BASE}

train = load_dataset("cifar10", "train", data_dir="../shared/data")
test = list(TensorBatches(load_dataset("cifar10", "test", data_dir="../shared/data"), 500))
model = pretrained(MODEL, models_dir="../shared/models")
FIDELITY = int(os.environ.get("FIDELITY", "0"))
if FIDELITY:
    fid_images = torch.stack([train[i][0] for i in range(len(train) - FIDELITY, len(train))])
    with torch.no_grad():
        fid_float = torch.cat([torch.log_softmax(model.eval()(b), 1) for b in fid_images.split(500)])


def train_kl(qm) -> float:
    """Mean KL(float || quantized) over the fidelity images."""
    with torch.no_grad():
        qm.eval()
        q = torch.cat([torch.log_softmax(qm(b), 1) for b in fid_images.split(500)])
    return float((fid_float.exp() * (fid_float - q)).sum(1).mean())

for spec in sys.argv[1:]:
    steps = json.loads(spec)
    recipe = load_recipe({**BASE_RECIPE, "name": "exp", "steps": steps,
                          "calibration": {"samples": 1024, "batch_size": 128, "seed": SEED}})
    torch.manual_seed(SEED)
    qm = quantize(model, recipe, calibration_batches(train, recipe), progress=False)
    line = json.dumps({"model": MODEL, "base": BASE if not BASE.startswith("{") else BASE_RECIPE, "steps": steps,
                       "seed": SEED, "top1": round(100 * evaluate(qm, test), 2),
                       "s": round(qm.meta["quantize_seconds"], 2),
                       **({"train_kl": round(train_kl(qm), 5)} if FIDELITY else {})})
    print(line, flush=True)
    if os.environ.get("OUT"):
        with open(os.environ["OUT"], "a") as f:
            f.write(line + "\n")
