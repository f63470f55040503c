"""The common case in one call: ``quantize`` and ``evaluate``."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn
from tqdm import tqdm

from lowbit.checks import probe_forward
from lowbit.errors import LowbitError
from lowbit.model.quant_model import QuantModel
from lowbit.model.untie import untie_layer_weights
from lowbit.ptq.batches import as_batches
from lowbit.recipes.recipe import Recipe, load_recipe
from lowbit.steps import run_step


def _check_shared_input_override(table: Any, matched: list[Any], index: int, a_bits: int) -> None:
    """Layers reading one tensor share one activation quantizer: an override's a_bits on some of
    them set it for the others too, without a word (a plan doing the same is refused)."""
    chosen = {id(r) for r in matched}
    for r in matched:
        q = r.input_quantizer
        others = [o.name for o in table if q is not None and o.input_quantizer is q and id(o) not in chosen]
        if others:
            raise LowbitError(f"overrides[{index}] gives a_bits {a_bits} to {r.name!r}, but {others} read the same "
                              "tensor through one activation quantizer: widen the pattern to match them too")


def _integer_grid_at_8_bits(table: Any) -> None:
    """A mid-rise grid (1-bit layers need it) has no int8 codes at 8 bits (256 odd levels): a layer
    raised to 8 bits keeps the integer grid, whether the first/last rule, an override or a plan
    raised it (only the first/last rule did, so such a model could not be exported)."""
    for r in table:
        q = r.layer.weight_quantizer
        if r.layer.quantize_weight and q.spec.grid == "midrise" and r.w_bits >= 8:
            q.spec = q.spec.with_(grid="midtread")
        q = r.input_quantizer
        if q is not None and q.spec.grid == "midrise" and r.a_bits >= 8:
            q.spec = q.spec.with_(grid="midtread")


def apply_bit_overrides(qm: QuantModel, recipe: Recipe) -> None:
    """First/last layer bits, then name-pattern overrides (later entries win), then the
    recipe's mixed-precision plan, which names layers exactly and so has the last word."""
    table = qm.layers
    if recipe.add_bits is not None:
        # Residual-add and pooling inputs stay at add_bits (8) however low the layers go, as
        # integer hardware keeps them: they carry the whole signal of a residual network.
        # (First: under shortcut: stream a layer's input cannot be wider than them.)
        for key in qm.tensor_quantizers:
            qm.net.get_submodule(key).set_bits(recipe.add_bits)
    if recipe.first_last_bits is not None and len(table) > 0:
        first, last = table[0], table[len(table) - 1]
        for r in (first, last):
            r.w_bits = max(r.w_bits, recipe.first_last_bits)
        # The network input and the head's input are 8-bit in every integer runtime.
        first.a_bits = max(first.a_bits, recipe.first_last_bits)
        last.a_bits = max(last.a_bits, recipe.first_last_bits)
    for i, o in enumerate(recipe.overrides):
        matched = table.match(o["pattern"])
        if not matched:
            raise LowbitError(f"overrides[{i}]: pattern {o['pattern']!r} matches no layer; layers: {table.names()}")
        if "a_bits" in o:
            _check_shared_input_override(table, matched, i, o["a_bits"])
        for r in matched:
            if "w_bits" in o:
                r.w_bits = o["w_bits"]
            if "a_bits" in o:
                r.a_bits = o["a_bits"]
            if "w_quantizer" in o:  # after the bits: a binary/ternary kind checks them
                r.layer.set_weight_kind(o["w_quantizer"], o.get("w_quantizer_options"))
    if recipe.plan is not None:
        recipe.plan.apply(table)
    _integer_grid_at_8_bits(table)


def prepare(model: nn.Module, recipe: str | Path | dict[str, Any] | Recipe = "w8a8") -> QuantModel:
    """Wrap without calibrating: for algorithms that drive calibration themselves.
    A recipe with ``widen: k`` wraps a k× wider copy computing the same function (WRPN)."""
    if not isinstance(model, nn.Module):
        raise LowbitError(f"quantize expects a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, QuantModel):
        raise LowbitError("quantize got a QuantModel, which is already quantized: pass the float model it was made "
                          "from (a QuantModel trains further with lowbit.train_qat)")
    r = load_recipe(recipe)
    if r.widen != 1:
        from lowbit.model.widen import widen

        model = widen(model, r.widen)
    qm = QuantModel(model, r.weights.spec, r.activations.spec, fold_bn=r.fold_bn, keep_float=r.keep_float,
                    quantize_adds=r.quantize_adds, relu=r.relu, shortcut=r.shortcut)
    untie_layer_weights(qm)
    apply_bit_overrides(qm, r)
    if r.activations.quantizer == "xnor":  # XNOR-Net: binary inputs keep mean_c |x| for their layer's K
        for row in qm.layers:
            if row.input_quantizer is not None and row.a_bits == 1:
                row.input_quantizer.keep_abs_mean = True
    qm.meta["recipe"] = r.to_dict()
    qm.meta["arch"] = getattr(model, "lowbit_arch", None)
    return qm


def check_device(device: Any, recipe: str, has_qat: bool) -> torch.device:
    """The device ``quantize`` was given, parsed: a name torch does not know, a GPU this machine
    lacks, or any device but the CPU for a recipe that does not train (its steps run on the CPU,
    so the device would be ignored) is an error naming it."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise LowbitError(f"device={device!r} is not a device name torch knows (cpu, cuda, cuda:N): "
                          f"{str(err).splitlines()[0][:120]}") from None
    if not has_qat and dev.type != "cpu":
        raise LowbitError(f"recipe {recipe!r} has no `qat` step: its post-training steps run on the CPU, so "
                          f"device={device!r} would be ignored; drop device=, or use a recipe with a qat step "
                          "(e.g. w4a4-lsq)")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise LowbitError(f"device={device!r}: this machine (this torch build) has no CUDA GPU; use device='cpu'")
        if dev.index is not None and dev.index >= count:
            raise LowbitError(f"device={device!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    return dev


def quantize(
    model: nn.Module, recipe: str | Path | dict[str, Any] | Recipe = "w8a8", calib: Any = None,
    progress: bool = True, *, train: Any = None, val: Any = None, device: str = "cpu",
    teacher: nn.Module | None = None,
) -> QuantModel:
    """Quantize a copy of ``model`` with a recipe; the float model is left unchanged.

    ``calib``: a DataLoader, an iterable of input batches or (input, label) pairs, or a
    tensor: its first ``calibration.samples`` inputs are used; or a Dataset (the training
    split): the recipe's seeded ``calibration.samples`` of it, the images `lowbit quantize`
    takes. Recipes whose first
    step is ``zeroq`` make their own data and take ``calib=None``. Recipes with a ``qat``
    step train on ``train`` (a Dataset of (input, label) from the training split) and
    choose their final epoch on ``val`` (default: held out of ``train``). ``teacher``: the network
    the ``qat`` step distils from when its ``kd`` is on (default: ``kd.teacher``, else ``model``;
    give the original float model when ``model`` is a trained low-bit network made float again,
    ``lowbit.as_float_model``).
    """
    r = load_recipe(recipe)
    has_qat = any(name == "qat" for name, _ in r.steps)
    check_device(device, r.name, has_qat)
    if (train is not None or val is not None or teacher is not None) and not has_qat:
        raise LowbitError(f"recipe {r.name!r} has no `qat` step, so it does not train: drop train=/val=/teacher=, "
                          "or use a recipe with a qat step (e.g. w4a4-lsq)")
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise LowbitError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
    start = time.perf_counter()
    qm = prepare(model, r)
    data_free = r.data_free
    if data_free and calib is not None:
        raise LowbitError(f"recipe {r.name!r} distils its calibration data (zeroq); pass calib=None")
    batches = [] if data_free else as_batches(calib, r.calibration["samples"], r.calibration["batch_size"],
                                               seed=r.calibration["seed"])
    if batches:
        probe_forward(model, batches[0], "calibration batch 0")  # fail now, not deep inside a step
    torch.manual_seed(r.calibration["seed"])
    if has_qat:
        qm.qat_data = {"train": train, "val": val, "device": device, "teacher": teacher}
    step_seconds: list[list] = []  # [step, seconds] in recipe order: which step a budget goes to
    try:
        for name, params in r.steps:
            began = time.perf_counter()
            run_step(name, params, qm, batches, r, progress)
            step_seconds.append([name, round(time.perf_counter() - began, 3)])
    finally:
        qm.__dict__.pop("qat_data", None)
    if not qm.calibrated:
        raise LowbitError(f"recipe {r.name!r} finished without calibrating every quantizer: "
                          "its steps must include `calibrate`")
    qm.meta["quantize_seconds"] = time.perf_counter() - start
    qm.meta["step_seconds"] = step_seconds
    qm.meta["calibration_samples"] = sum(b.shape[0] for b in batches)
    return qm


def check_labels(y: Any, logits: torch.Tensor, seen: int) -> None:
    """Labels a top-1 count can read: one integer class index per input, inside the model's classes.
    (An (N, 1) label tensor broadcasts against the (N,) predictions to N×N and reports top-1 far
    above 100%; an index outside the classes can never be right.)"""
    where = f"labels of the batch starting at sample {seen}"
    if not isinstance(y, torch.Tensor):
        raise LowbitError(f"{where} are a {type(y).__name__}, not a tensor")
    if y.dim() != 1 or y.shape[0] != logits.shape[0]:
        raise LowbitError(f"{where} have shape {tuple(y.shape)}; evaluate needs one class index per input, shape "
                          f"({logits.shape[0]},)")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise LowbitError(f"{where} are {y.dtype}; class indices are integers")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= logits.shape[1]):
        raise LowbitError(f"{where} run from {int(y.min())} to {int(y.max())}; the model has {logits.shape[1]} "
                          f"classes (0 to {logits.shape[1] - 1})")


def check_logits(logits: Any, x: torch.Tensor, seen: int) -> None:
    """What a top-1 count reads: one row of class scores per input, a (batch, classes) tensor.
    (A tuple of heads, an output object or 1-D scores failed deep inside the count.)"""
    where = f"the model's output for the batch starting at sample {seen}"
    if not isinstance(logits, torch.Tensor):
        raise LowbitError(f"{where} is a {type(logits).__name__}, not a tensor: evaluate needs class scores of "
                          "shape (batch, classes); wrap the model so forward returns its logits tensor")
    if logits.dim() != 2 or logits.shape[0] != x.shape[0]:
        raise LowbitError(f"{where} has shape {tuple(logits.shape)}; evaluate needs class scores of shape "
                          f"({x.shape[0]}, classes), one row per input")


@torch.no_grad()
def evaluate(model: nn.Module, data: Iterable[Any], progress: bool = False, desc: str = "evaluate") -> float:
    """Top-1 accuracy in [0, 1] over (input, label) batches."""
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for batch in tqdm(data, desc=desc, unit="batch", disable=not progress, leave=False):
            if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
                raise LowbitError("evaluate needs (input, label) batches")
            x, y = batch[0], batch[1]
            if total == 0:
                probe_forward(model, x, "test batch 0")
            logits = model(x)
            check_logits(logits, x, total)
            check_labels(y, logits, total)
            correct += int((logits.argmax(dim=1) == y).sum())
            total += int(y.numel())
    finally:
        model.train(was_training)
    if total == 0:
        raise LowbitError("evaluate got no data")
    return correct / total
