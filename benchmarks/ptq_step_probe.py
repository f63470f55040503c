"""One-seed probe of PTQ step lists on ResNet-20 W4A4 (full test split): python benchmarks/ptq_step_probe.py '["calibrate","gptq",{"adaquant":{"iters":30}}]'
SEED=1 (environment) draws another 1,024 calibration images (default 0); BASE=w3a3 extends another built-in (default w4a4);
OUT=FILE also appends each result line to FILE (JSON lines)."""
import sys, json, time, torch
sys.path.insert(0, __import__("os").path.dirname(__file__))
import ptq_methods as pm
from lowbit.api import evaluate, quantize
from lowbit.data import load_dataset
from lowbit.evaluation import TensorBatches, calibration_batches
from lowbit.recipes.recipe import load_recipe
from lowbit.zoo import pretrained
torch.set_num_threads(1)
train = load_dataset("cifar10", "train", data_dir="../shared/data")
test = [b for b in TensorBatches(load_dataset("cifar10", "test", data_dir="../shared/data"), 500)]
model = pretrained("resnet20", models_dir="../shared/models")
for spec in sys.argv[1:]:
    steps = json.loads(spec)
    seed = int(__import__("os").environ.get("SEED", "0"))
    recipe = load_recipe({"extends": __import__("os").environ.get("BASE", "w4a4"), "name": "exp", "steps": steps,
                          "calibration": {"samples": 1024, "batch_size": 128, "seed": seed}})
    torch.manual_seed(seed)
    qm = quantize(model, recipe, calibration_batches(train, recipe), progress=False)
    line = json.dumps({"base": __import__("os").environ.get("BASE", "w4a4"), "steps": steps, "seed": seed,
                       "top1": 100 * evaluate(qm, test), "s": qm.meta["quantize_seconds"]})
    print(line, flush=True)
    if __import__("os").environ.get("OUT"):
        with open(__import__("os").environ["OUT"], "a") as f:
            f.write(line + "\n")
