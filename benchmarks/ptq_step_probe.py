"""One-seed probe of PTQ step lists on ResNet-20 W4A4 (seed 0, full test split): python benchmarks/ptq_step_probe.py '["calibrate","gptq",{"adaquant":{"iters":30}}]'"""
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
    recipe = load_recipe({"extends": "w4a4", "name": "exp", "steps": steps})
    torch.manual_seed(0)
    qm = quantize(model, recipe, calibration_batches(train, recipe), progress=False)
    print(json.dumps({"steps": steps, "top1": 100 * evaluate(qm, test), "s": qm.meta["quantize_seconds"]}), flush=True)
