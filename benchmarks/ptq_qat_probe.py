"""The same probe with LSQ+ activations and the calibration subset as QAT training data: python benchmarks/ptq_qat_probe.py '["calibrate","gptq","bias_correction",{"qat":{"epochs":1,"steps_per_epoch":100,"batch_size":64,"lr":1e-6,"quantizer_lr":1e-3,"kd":{"weight":1.0},"val_samples":128,"weight_decay":0}}]'"""
import sys, json, time, torch
from torch.utils.data import Subset
from lowbit.api import evaluate, quantize
from lowbit.data import load_dataset
from lowbit.data.subsets import calibration_subset
from lowbit.evaluation import TensorBatches, calibration_batches
from lowbit.recipes.recipe import load_recipe
from lowbit.zoo import pretrained
torch.set_num_threads(1)
train = load_dataset("cifar10", "train", data_dir="../shared/data")
test = [b for b in TensorBatches(load_dataset("cifar10", "test", data_dir="../shared/data"), 500)]
model = pretrained("resnet20", models_dir="../shared/models")
for spec in sys.argv[1:]:
    steps = json.loads(spec)
    recipe = load_recipe({"extends": "w4a4", "name": "exp", "activations": {"quantizer": "lsq+"}, "steps": steps})
    sub = calibration_subset(train, 1024, 0)
    torch.manual_seed(0)
    t = time.perf_counter()
    qm = quantize(model, recipe, calibration_batches(train, recipe), train=sub, progress=False)
    print(json.dumps({"steps": steps, "top1": 100 * evaluate(qm, test), "s": time.perf_counter() - t}), flush=True)
