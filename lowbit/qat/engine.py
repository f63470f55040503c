"""The QAT loop: one training loop over a calibrated QuantModel, whatever the quantizers.

Calibration (or any PTQ step) is the initialisation; the loop trains the recipe's
trainable quantizer kinds together with the weights and the layers' BatchNorms on the
training split with its standard augmentation, keeps an epoch chosen on a validation
subset of the training split (keeps_epoch), and returns the model in its deployed form (BN
folded, uniform quantizers), which is what artifacts, ONNX export and runtimes read.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from tqdm import tqdm

from lowbit.data.augment import random_crop_flip
from lowbit.data.subsets import dataset_tensors, run_seed
from lowbit.errors import LowbitError, NumericalError, RecipeError
from lowbit.model.quant_model import QuantModel
from lowbit.qat import distributed as D
from lowbit.qat.bn import FoldedBatchNorm
from lowbit.qat.checkpoint import (LATER_OPTIONS, LOCATION_KEYS, TrainingState, load_state, read_summary, save_state,
                                   sync_metrics)
from lowbit.qat.labels import check_batch_labels, check_label_range, class_indices, integral, model_classes
from lowbit.qat.dampen import dampened_layers, dampening_loss, dampening_weight
from lowbit.qat.convert import freeze_batchnorms, snap_latent_weights, to_deployed_form, to_training_form
from lowbit.qat.ema import WeightAverage
from lowbit.quant.learned.base import TrainableQuantizer


# Settings that act only from the BN freeze on: a run may branch from another run's checkpoint
# that differs in them as long as neither run has frozen yet (lowbit.qat.engine.branch_state).
BRANCHABLE = ("freeze_bn_after", "snap_at_freeze")


@dataclass
class QATConfig:
    """The ``qat`` recipe step's parameters (schema: lowbit.recipes.schema)."""

    epochs: int = 5
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.001
    quantizer_lr: float = 0.0          # 0: the same as lr
    weight_decay: float = 5e-4
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup: float = 0.0                # epochs of linear warm-up
    kd: dict[str, Any] = field(default_factory=dict)  # {temperature, weight, teacher}; empty: off
    train_bn: bool = True
    freeze_bn_after: int = -1          # epochs; -1: 3/4 of them (at 3/4 of the steps of a 1-epoch run)
    bn_momentum: float = 0.1
    augment: str = "auto"              # auto | crop_flip | none
    val_samples: int = 5000            # held out of the training data when no val set is given
    seed: int = 0
    checkpoint: str = ""
    branch_from: str = ""              # a checkpoint folder to start from (see branch_state)
    steps_per_epoch: int = 0           # 0: the whole training set each epoch
    clip_grad_norm: float = 0.0        # > 0: rescale each step's gradient to at most this global L2 norm
    ema: float = 0.0                   # > 0: validate and keep an exponential moving average of the state
    snap_at_freeze: bool = False       # at the BN freeze, binary/ternary latent weights := their quantized values
    dampen: float = 0.0                # > 0: final weight of the oscillation-dampening loss (lowbit.qat.dampen)
    precision: str = "fp32"            # bf16: convolutions and matmuls of the training steps in bfloat16 (autocast)
    channels_last: bool = False        # train 4-D tensors in NHWC memory order (faster convolutions, above all in bf16)
    select: str = "within_error"       # which epoch is kept: see keeps_epoch
    mix: str = "none"                  # none | mixup | cutmix: each training batch mixed with itself (see mix_batch)
    mix_alpha: float = 1.0             # λ ~ Beta(α, α)

    def __post_init__(self) -> None:
        # kd's defaults here, so a QATConfig built directly gets them as one read from a recipe does
        if self.kd:
            self.kd = {"temperature": 4.0, "weight": 0.5, **self.kd}

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "QATConfig":
        """From parameters the step schema has checked (lowbit.recipes.schema.check_params)."""
        return cls(**params)

    def changed(self) -> dict[str, Any]:
        """The parameters set otherwise than their defaults (what a recipe's qat step would spell out)."""
        defaults = asdict(QATConfig())
        return {k: v for k, v in asdict(self).items() if v != defaults[k]}

    def freeze_step(self, per_epoch: int) -> int:
        """The global step from which BN statistics are frozen (bn_freeze_epoch in steps).

        Kept below the last step whenever a freeze is meant (bn_freeze_epoch < epochs) and the run
        has two steps or more: 3/4 of a 1-epoch run of 1 or 2 steps rounds to all of them, and such
        a run never trained the folded layers it deploys."""
        step = round(self.bn_freeze_epoch * per_epoch)
        total = self.epochs * per_epoch
        if self.bn_freeze_epoch < self.epochs and total > 1:
            step = min(step, total - 1)
        return step

    @property
    def bn_freeze_epoch(self) -> float:
        """When BN statistics freeze, in epochs (an epoch boundary, except for 1-epoch runs).

        Late by default: a folded layer has no BN to absorb large steps, so its final epochs
        train best at the low learning rate the cosine schedule reaches by then. A 1-epoch run
        freezes at 3/4 of its steps: freezing from the start left 1-bit ResNet-20 without the
        batch statistics that re-normalise a freshly binarised network (stuck at 10%)."""
        if self.freeze_bn_after >= 0:
            return float(self.freeze_bn_after)
        # (at most epochs − 1: round(0.75 · 2) = 2 left a 2-epoch run never frozen)
        return float(min(round(0.75 * self.epochs), self.epochs - 1)) if self.epochs > 1 else 0.75


# -- data ---------------------------------------------------------------------------------
def as_dataset(data: Any, what: str) -> Dataset:
    """A map-style dataset of (input, label) from a Dataset, a DataLoader or an (x, y) pair."""
    if isinstance(data, DataLoader):
        return data.dataset
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
        if len(x) != len(y):
            raise LowbitError(f"{what}: {len(x)} inputs but {len(y)} labels")
        # integer labels of any width become int64; others stay as given, for class_indices to refuse
        return TensorDataset(x, y.long() if integral(y) else y)
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        return data
    raise LowbitError(f"{what} must be a Dataset of (input, label), a DataLoader over one, or an (inputs, labels) "
                      f"pair of tensors; got {type(data).__name__}")


def split_validation(train: Dataset, n: int, seed: int) -> tuple[Dataset, Dataset]:
    """Hold ``n`` seeded samples of the training data out for choosing the final weights."""
    from torch.utils.data import Subset

    total = len(train)  # type: ignore[arg-type]
    if not 0 < n < total:
        raise LowbitError(f"val_samples={n} must be between 1 and {total - 1} (the training set holds {total})")
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    return Subset(train, sorted(perm[n:])), Subset(train, sorted(perm[:n]))


def _augmenter(mode: str, sample: torch.Tensor) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    """The dataset's standard training augmentation: pad-crop-flip for colour 32x32 images
    (CIFAR), none for 28x28 digits and clothes (MNIST, Fashion-MNIST) and anything else."""
    if mode == "auto":
        mode = "crop_flip" if tuple(sample.shape[-3:]) == (3, 32, 32) else "none"
    if mode == "none":
        return lambda x, g: x
    if mode == "crop_flip":
        return lambda x, g: random_crop_flip(x, 4, True, g)
    raise RecipeError(f"step 'qat': augment must be auto, crop_flip or none, got {mode!r}")


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, limit: int = 0) -> list[torch.Tensor]:
    """Global index batches of one epoch: the permutation depends only on (seed, epoch), so
    a resumed run sees the same batches."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(run_seed(seed, epoch)))
    steps = n // batch_size  # drop the ragged last batch: every step has the same global size
    if limit:
        steps = min(steps, limit)
    return [perm[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


# -- optimisation -------------------------------------------------------------------------
def _param_groups(qm: QuantModel, cfg: QATConfig) -> list[dict[str, Any]]:
    """Weights with weight decay; BN γ/β and biases without; quantizer parameters with
    their own decay (PACT's L2 on α) and learning rate."""
    quantizer_lr = cfg.quantizer_lr or cfg.lr
    seen: set[int] = set()
    groups: list[dict[str, Any]] = []
    for m in qm.modules():
        if isinstance(m, TrainableQuantizer):
            for params, decay in m.weight_decay_groups():
                params = [p for p in params if id(p) not in seen]
                seen.update(id(p) for p in params)
                if params:
                    groups.append({"params": params, "weight_decay": decay, "lr": quantizer_lr, "base_lr": quantizer_lr})
    decay, no_decay = [], []
    for r in qm.layers:
        w = r.layer.module.weight
        if w.requires_grad and id(w) not in seen:
            decay.append(w)
            seen.add(id(w))
    for p in qm.parameters():
        if p.requires_grad and id(p) not in seen:
            no_decay.append(p)
            seen.add(id(p))
    groups.append({"params": decay, "weight_decay": cfg.weight_decay, "lr": cfg.lr, "base_lr": cfg.lr})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lr": cfg.lr, "base_lr": cfg.lr})
    return groups


def make_optimizer(qm: QuantModel, cfg: QATConfig) -> torch.optim.Optimizer:
    groups = _param_groups(qm, cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    raise RecipeError(f"step 'qat': optimizer must be sgd or adam, got {cfg.optimizer!r}")


def lr_factor(cfg: QATConfig, step: int, total: int, per_epoch: int) -> float:
    """Linear warm-up over ``warmup`` epochs, then cosine decay to 0 (or constant)."""
    warm = int(cfg.warmup * per_epoch)
    if step < warm:
        return (step + 1) / warm
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        t = (step - warm) / max(total - warm, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
    raise RecipeError(f"step 'qat': schedule must be cosine or constant, got {cfg.schedule!r}")


def mix_batch(x: torch.Tensor, y: torch.Tensor, kind: str, alpha: float, seed: int
              ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Each image mixed with the image at its place in a random permutation π of the batch;
    returns (x̃, y[π], λ), λ the share of the image's own label. mixup (Zhang et al. 2018):
    x̃ = λ·x + (1 − λ)·x[π], λ ~ Beta(α, α). cutmix (Yun et al. 2019): a box of about 1 − λ of
    the area, centred uniformly and clipped to the image, is cut from x[π] into x; λ becomes the
    area actually left (eq. 1-2). Why: the float teacher was trained on these very images and is
    near one-hot on them; on mixed images its outputs say more, so a distilled student learns
    more of the teacher's function from the same training split. cutmix keeps every pixel a
    real one, so the batch statistics BN trains on stay those of real images."""
    # drawn from ``seed`` alone (numpy: torch's Beta sampler would read the global generator, which
    # is seeded per process for the user's dropout), so every process mixes the global batch alike
    rng = np.random.default_rng(seed)
    lam = float(rng.beta(alpha, alpha))
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    if kind == "mixup":
        return lam * x + (1.0 - lam) * x[perm], y[perm], lam
    if kind != "cutmix":
        raise RecipeError(f"step 'qat': mix must be none, mixup or cutmix, got {kind!r}")
    if x.dim() != 4:
        raise LowbitError(f"qat mix: cutmix cuts boxes from images [N, C, H, W]; the training inputs are {tuple(x.shape)}")
    h, w = x.shape[-2:]
    cut = math.sqrt(1.0 - lam)
    bh, bw = int(round(h * cut)), int(round(w * cut))
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    y0, y1 = max(cy - bh // 2, 0), min(cy + bh - bh // 2, h)
    x0, x1 = max(cx - bw // 2, 0), min(cx + bw - bw // 2, w)
    mixed = x.clone()
    mixed[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
    return mixed, y[perm], 1.0 - (y1 - y0) * (x1 - x0) / (h * w)


def mixed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mixed: tuple[torch.Tensor, float] | None
                        ) -> torch.Tensor:
    """CE against ``labels``, or with ``mixed`` = (y[π], λ) mixup's λ·CE(y) + (1 − λ)·CE(y[π])."""
    if mixed is None:
        return F.cross_entropy(logits, labels)
    other, lam = mixed
    return lam * F.cross_entropy(logits, labels) + (1.0 - lam) * F.cross_entropy(logits, other)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                      temperature: float, weight: float, mixed: tuple[torch.Tensor, float] | None = None
                      ) -> torch.Tensor:
    """(1 − w)·CE + w·T²·KL(p_teacher^T ‖ p_student^T) (Hinton et al. 2015); CE as mixup's
    when ``mixed`` (the teacher sees the same mixed images as the student)."""
    t = temperature
    soft = F.kl_div(F.log_softmax(student / t, 1), F.softmax(teacher / t, 1), reduction="batchmean") * t * t
    if weight >= 1.0:  # distillation only: no CE term to compute
        return weight * soft
    return (1.0 - weight) * mixed_cross_entropy(student, labels, mixed) + weight * soft


def distillation_teacher(qm: QuantModel, cfg: QATConfig, teacher: nn.Module | None, sample: torch.Tensor,
                         dev: torch.device) -> nn.Module | None:
    """The network ``kd`` distils from: a given module, the zoo model ``kd.teacher`` names
    (a larger pretrained network gives the student a better target than its own float
    version), or the float model; None when distillation is off."""
    if not cfg.kd:
        if teacher is not None:
            raise LowbitError("a teacher was given but distillation is off: set kd (e.g. kd={'weight': 1.0})")
        return None
    if teacher is None and cfg.kd.get("teacher"):
        from lowbit.zoo import pretrained

        teacher = pretrained(cfg.kd["teacher"])
    if teacher is None:  # the float network; the original one where the recipe rewrote its graph (hardtanh, bireal)
        if qm.no_float_reference is not None:  # (its float_model too is the rebuilt, untrained network)
            raise LowbitError(f"distillation needs the float network as its teacher: {qm.no_float_reference}; "
                              "or give teacher=")
        teacher = qm.float_model if qm.float_model is not None else qm
    teacher = copy.deepcopy(teacher).to(dev).eval()
    with torch.no_grad():
        s_out = qm.to(dev).eval()(sample.to(dev))
        with teacher.float_reference() if isinstance(teacher, QuantModel) else contextlib.nullcontext():
            try:
                t_out = teacher(sample.to(dev))
            except Exception as err:  # noqa: BLE001 - a teacher that cannot read the student's inputs
                raise LowbitError(f"kd teacher {type(teacher).__name__} fails on the training inputs "
                                  f"{tuple(sample.shape)}: {err}") from err
    if t_out.shape != s_out.shape:
        raise LowbitError(f"kd teacher {type(teacher).__name__} outputs {tuple(t_out.shape)} but the student "
                          f"{tuple(s_out.shape)}: a teacher must predict the same classes")
    return teacher


def training_precision(precision: str, dev: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """The context the training forwards run in. ``bf16``: autocast, so convolutions and
    matmuls take bfloat16 inputs (QuantLayer casts each result back to float32, so quantizers,
    BN and the loss stay in float32); validation and the deployed model are float32 throughout.
    Why: on a CPU with native bfloat16 (AMX / AVX512-BF16) or a GPU the convolutions take about
    half the time, a ResNet-20 QAT step 1.1-1.6x less with channels_last (benchmarks/qat_step_time.py
    --precision both); elsewhere bf16 is emulated and slower."""
    if precision == "fp32":
        return contextlib.nullcontext
    if dev.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        warnings.warn("qat precision bf16: this CPU has no native bfloat16 (AVX512-BF16 / AMX), so it is emulated "
                      "and slower than fp32", stacklevel=3)
    return lambda: torch.autocast(dev.type, dtype=torch.bfloat16)


# -- the loop -------------------------------------------------------------------------------
def trains_batchnorms(qm: QuantModel, train_bn: bool) -> bool:
    """Whether QAT trains BN apart from the layers (``train_bn``, where every weight grid allows it).

    A per-tensor weight grid or codebook cannot follow a per-channel BN scale (at 1 bit it
    erases it: every channel becomes ±α·σ), so batch statistics learnt in training would
    not survive folding; such layers train folded from the start."""
    return train_bn and all(r.layer.weight_quantizer.spec.per_channel for r in qm.layers if r.layer.quantize_weight)


def trained_batchnorms(model: nn.Module) -> list[tuple[str, FoldedBatchNorm]]:
    """The BNs QAT trains, by layer name: found once, checked every step."""
    return [(name.removesuffix(".bn"), m) for name, m in model.named_modules() if isinstance(m, FoldedBatchNorm)]


def check_bn_statistics(batchnorms: list[tuple[str, FoldedBatchNorm]], epoch: int, step: int) -> None:
    """Stop when a trained BN's running statistics stop being finite. The loss stays finite
    (training normalises by batch statistics), but the model evaluated and deployed reads the
    running ones: a W2A2 ResNet-20 ran two epochs at 78-80% training accuracy while scoring
    10% held out, and its checkpoints kept the broken statistics. One reduction over all of
    them (a single device sync per step); the per-layer search runs only on failure."""
    if not batchnorms:
        return
    finite = [torch.isfinite(m.running_var).all() & torch.isfinite(m.running_mean).all() for _, m in batchnorms]
    if bool(torch.stack(finite).all()):
        return
    name = next(n for (n, _), ok in zip(batchnorms, finite) if not bool(ok))
    raise NumericalError(
        f"QAT: the BN running statistics of {name!r} became non-finite at epoch {epoch + 1}, step {step}: the "
        "training loss looks normal but the evaluated model is broken; the last checkpoint before it is kept. "
        "Lower lr, or freeze BN earlier (freeze_bn_after)")


@contextlib.contextmanager
def _detached(sampling: list[nn.Module]) -> Iterator[None]:
    """Give stochastic quantizers back without the run's generator (the trained model samples
    from the global one again, as a freshly built quantizer does)."""
    try:
        yield
    finally:
        for quantizer in sampling:
            quantizer.draws = None


def _layers_with_hook(qm: QuantModel, hook: str) -> list[torch.nn.Module]:
    """Layers whose weight quantizer overrides ``hook`` of TrainableQuantizer (so the loop
    calls only those, not a no-op for every layer at every step)."""
    return [r.layer for r in qm.layers if isinstance(r.layer.weight_quantizer, TrainableQuantizer)
            and getattr(type(r.layer.weight_quantizer), hook) is not getattr(TrainableQuantizer, hook)]


def finish_schedules(scheduled: list[torch.nn.Module], epochs: int, qm: QuantModel,
                     average: WeightAverage | None) -> None:
    """Advance scheduled kinds to their end stage (INQ: the last portion quantized) after the last
    epoch's steps, so that the model validated, kept and reported is the one deployed; in the weight
    average too, when that is what is kept."""
    def finish(_model: nn.Module) -> None:
        for layer in scheduled:
            layer.weight_quantizer.on_epoch_start(epochs, epochs, layer)

    finish(qm)
    if average is not None:
        average.transform(qm, finish)


def branch_state(source: Path, ckpt_dir: Path | None, qm: QuantModel, opt: torch.optim.Optimizer,
                 fingerprint: dict[str, Any], cfg: QATConfig, per_epoch: int, train_bn: bool,
                 data: dict[str, int]) -> TrainingState:
    """Another run's latest checkpoint as this run's start, restored into ``qm``/``opt``.

    Why: runs that differ only in when BN freezes (or whether latent weights snap then) share
    every step before the freeze; branching one from the other skips recomputing them. It is
    allowed only where the result is the run from scratch: the two may differ in BRANCHABLE
    settings alone, and neither run's freeze may have happened by the branch point."""
    if ckpt_dir is not None and ckpt_dir.resolve() == source.resolve():
        raise LowbitError(f"branch_from {source} is this run's own checkpoint folder: give the branch another one")
    summary = read_summary(source)
    if summary is None:
        raise LowbitError(f"branch_from {source}: no QAT checkpoint there (no state.json)")
    theirs = summary.get("fingerprint")
    their_qat = theirs.get("qat", {}) if isinstance(theirs, dict) else {}
    defaults = QATConfig()
    their_cfg = QATConfig(**{**asdict(cfg), **{k: their_qat.get(k, getattr(defaults, k)) for k in BRANCHABLE}})
    epoch = int(summary.get("epoch", 0))
    for who, c in (("the source run", their_cfg), ("this run", cfg)):
        if train_bn and epoch * per_epoch > c.freeze_step(per_epoch):
            raise LowbitError(f"branch_from {source}: it is at epoch {epoch}, past {who}'s BN freeze (after "
                              f"epoch {c.bn_freeze_epoch:g}); a branch must start before both runs freeze")
    state = load_state(source, qm, opt, fingerprint, may_differ=BRANCHABLE, data=data)
    assert state is not None  # read_summary found its state.json
    state.branched_from = {"folder": str(source), "epoch": state.epoch}
    return state


def check_kept(state: TrainingState, folder: Path, epochs: int) -> None:
    """Refuse a finished run whose kept model was dropped on loading (best.safetensors holds
    another epoch than state.json keeps): no epoch is left to train a new one, and the last
    epoch's weights would be returned in its place."""
    if state.best is None and state.best_epoch > 0 and state.epoch >= epochs > 0:
        raise LowbitError(f"QAT checkpoint {folder}: best.safetensors holds another epoch's model than the one "
                          "state.json keeps, and the run is finished, so no epoch is left to replace it: restore "
                          f"{folder / 'best.safetensors'}, or delete {folder} to start over")


def keeps_epoch(rule: str, val_top1: float, state: TrainingState, val_samples: int) -> bool:
    """Whether the epoch just validated (already in ``state.history``) replaces the kept one.

    ``best``: the highest held-out top-1 so far. ``within_error``: the latest epoch whose
    held-out top-1 is within one standard error, sqrt(p(1 − p)/n), of the highest so far. The
    held-out images come from the training split the float model learnt, so they sit near
    98–99 %: 5,000 of them resolve about ±0.17 pt, and a smaller lead is no evidence for an
    earlier epoch over a later one, which trained longer at a lower learning rate (and, after the
    BN freeze, in the folded form that is deployed). Decided online: the kept epoch is always
    within the error of the running highest, so one stored model suffices."""
    if state.best is None:  # nothing kept yet (or killed between the two checkpoint writes)
        return True
    if rule == "best":
        return val_top1 > state.best_val
    top = max(float(row["val_top1"]) for row in state.history)
    p = min(max(top / 100, 0.0), 1.0)
    return val_top1 >= top - 100 * math.sqrt(p * (1 - p) / max(val_samples, 1))


def held_out_top1(qm: QuantModel, val_ds: Dataset, dev: torch.device) -> float:
    """Top-1 (percent) on the held-out images. Under several processes each scores every
    world-th image and the counts are summed, so validation costs 1/world of an epoch's
    validation on each process instead of all of it (every rank holds the same weights)."""
    from lowbit.api import evaluate
    from lowbit.evaluation import TensorBatches

    world, rank = D.world_size(), D.rank()
    shard = Subset(val_ds, range(rank, len(val_ds), world)) if world > 1 else val_ds  # type: ignore[arg-type]
    count = len(shard)  # type: ignore[arg-type]
    correct = 0.0
    if count:
        correct = round(count * evaluate(qm, ((x.to(dev), y.to(dev)) for x, y in TensorBatches(shard, 500)),
                                         desc="validate"))
    correct, count = D.sum_over_ranks([correct, float(count)], dev)
    return 100 * correct / count


def train_qat(
    qm: QuantModel, train: Any, epochs: int | None = None, val: Any = None, *,
    recipe: dict[str, Any] | None = None, config: QATConfig | dict[str, Any] | None = None,
    calib: list[torch.Tensor] | None = None, device: str | torch.device = "cpu", progress: bool = True,
    teacher: nn.Module | None = None, **overrides: Any,
) -> QuantModel:
    """Train a calibrated QuantModel in place and return it in deployed form.

    ``train``/``val``: datasets of (input, label) from the *training* split (``val`` None:
    ``val_samples`` are held out of ``train``). ``config`` or keyword overrides give the
    ``qat`` step's parameters; ``recipe`` (default: the model's own) names the trainable
    quantizer kinds. ``calib``: input batches that measure the BN statistics (default: the
    first batches of ``train``). ``teacher``: the network to distil from when ``kd`` is on
    (default: ``kd.teacher``'s zoo model, else the float model). With ``checkpoint`` set, state is written after every epoch
    and a rerun continues from it. Under torchrun (``torch.distributed`` initialised) every
    process runs this with the same arguments.
    """
    from lowbit.recipes.recipe import load_recipe
    from lowbit.recipes.schema import check_params

    # A QATConfig is read as the parameters it sets, so ``epochs`` and keyword overrides apply over it
    # and everything passes the step schema's checks, as a recipe's qat step does.
    params = {**(config.changed() if isinstance(config, QATConfig) else config or {}), **overrides}
    if epochs is not None:
        params["epochs"] = epochs
    cfg = QATConfig.from_params(check_params("qat", params))
    rec = load_recipe(recipe if recipe is not None else qm.meta.get("recipe") or "w8a8")
    dev = torch.device(device)
    world, rank = D.world_size(), D.rank()
    if cfg.batch_size % world:
        raise LowbitError(f"batch_size {cfg.batch_size} must divide evenly among {world} processes")
    train_ds = as_dataset(train, "train")
    labels = {"train": class_indices(train_ds, "train")}  # before the split: held-out samples are checked as train's
    if val is None:
        train_ds, val_ds = split_validation(train_ds, cfg.val_samples, cfg.seed)
    else:
        val_ds = as_dataset(val, "val")
        labels["val"] = class_indices(val_ds, "val")
    n = len(train_ds)  # type: ignore[arg-type]
    if n < cfg.batch_size:
        held = "" if val is not None else (f" after val_samples={cfg.val_samples} of its {n + cfg.val_samples} were held "
                                           "out for validation (lower val_samples, or pass val=)")
        raise LowbitError(f"the training set holds {n} samples{held}, fewer than one batch of {cfg.batch_size}")
    sample_x, _ = dataset_tensors(train_ds, [0])
    classes = model_classes(qm, sample_x, dev)
    check_label_range(labels, classes)
    # labels not known up front (a dataset of items) are checked batch by batch, as the caller numbers its samples
    caller_ids = (torch.as_tensor(np.asarray(train_ds.indices)) if isinstance(train_ds, Subset) and val is None
                  else None)
    augment = _augmenter(cfg.augment, sample_x)
    if calib is None:
        calib = list(torch.split(dataset_tensors(train_ds, list(range(min(n, 1024))))[0], 256))

    teacher = distillation_teacher(qm, cfg, teacher, sample_x, dev)
    lower_precision = training_precision(cfg.precision, dev)
    qm.to(dev)
    train_bn = trains_batchnorms(qm, cfg.train_bn)
    info = to_training_form(qm, rec.weights.quantizer, rec.activations.quantizer, rec.weights.quantizer_options,
                            rec.activations.quantizer_options, [c.to(dev) for c in calib], train_bn, cfg.bn_momentum)
    info["train_bn"] = train_bn
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    qm.to(memory_format=memory_format)  # 4-D weights; each batch is laid out the same way below
    if teacher is not None:
        teacher.to(memory_format=memory_format)
    opt = make_optimizer(qm, cfg)
    model: nn.Module = D.wrap(qm, dev)
    ckpt_dir = Path(cfg.checkpoint) if cfg.checkpoint else None
    # "weight_step": a learned weight step is the step of the pre-BN weight (see
    # TrainableQuantizer.follows_bn_factor); checkpoints from before that change are refused.
    # (options added later join the fingerprint only when set, so checkpoints written before them still resume)
    fingerprint = {"recipe": rec.to_dict(),
                   "qat": {k: v for k, v in asdict(cfg).items()
                           if k not in LOCATION_KEYS and not (k in LATER_OPTIONS and v == LATER_OPTIONS[k])},
                   "weight_step": "pre-bn"}
    per_epoch = len(epoch_batches(n, cfg.batch_size, cfg.seed, 0, cfg.steps_per_epoch))
    total = cfg.epochs * per_epoch
    freeze_step = cfg.freeze_step(per_epoch)
    if train_bn and freeze_step >= total and rank == 0:
        if cfg.bn_freeze_epoch >= cfg.epochs:
            warnings.warn(f"qat freeze_bn_after {cfg.freeze_bn_after} is not below epochs {cfg.epochs}: BN statistics "
                          "never freeze, so no epoch trains the folded layers that are deployed (the kept epoch is still "
                          f"chosen on them); set freeze_bn_after below {cfg.epochs} (e.g. {cfg.epochs - 1}: the last "
                          "epoch folded)", stacklevel=2)
        else:
            warnings.warn(f"qat: the run has {total} training step(s), too few to freeze BN statistics before the "
                          "end, so no step trains the folded layers that are deployed; train more steps (more data, "
                          "a smaller batch_size, or more epochs)", stacklevel=2)
    if cfg.snap_at_freeze and not train_bn and rank == 0:
        warnings.warn("qat snap_at_freeze acts at the BN freeze, and no BN trains in this run (train_bn is off, or a "
                      "per-tensor weight grid trains the layers folded from the start): nothing is snapped",
                      stacklevel=2)
    data = {"train_samples": n, "val_samples": len(val_ds)}  # type: ignore[arg-type]
    state = TrainingState(data=data)
    loaded = load_state(ckpt_dir, qm, opt, fingerprint, data=data) if ckpt_dir is not None else None
    if loaded is not None:
        state = loaded
        state.data = data  # (a checkpoint from before the sizes were kept says none: it holds them from now on)
        check_kept(state, ckpt_dir, cfg.epochs)  # type: ignore[arg-type]
        if rank == 0:
            sync_metrics(ckpt_dir, state.history)  # type: ignore[arg-type]
        if rank == 0 and progress:
            print(f"qat: resuming {ckpt_dir} after epoch {state.epoch}/{cfg.epochs}", flush=True)
    elif cfg.branch_from:
        state = branch_state(Path(cfg.branch_from), ckpt_dir, qm, opt, fingerprint, cfg, per_epoch, train_bn, data)
        state.data = data
        if rank == 0 and progress:
            print(f"qat: branching from {cfg.branch_from} after epoch {state.epoch}/{cfg.epochs}", flush=True)
        if ckpt_dir is not None:
            if rank == 0:  # the branch point is this run's first checkpoint
                save_state(ckpt_dir, qm, opt, state, fingerprint)
            D.barrier()
    average = WeightAverage(qm, cfg.ema, state.ema) if cfg.ema > 0 else None
    constrained, scheduled = _layers_with_hook(qm, "project_"), _layers_with_hook(qm, "on_epoch_start")
    annealed = [layer.weight_quantizer for layer in _layers_with_hook(qm, "anneal")] + [
        q for q in qm.act_quantizers().values()
        if isinstance(q, TrainableQuantizer) and type(q).anneal is not TrainableQuantizer.anneal]
    batchnorms = trained_batchnorms(model)
    dampened = dampened_layers(qm) if cfg.dampen > 0 else []
    frozen = not train_bn
    # Stochastic kinds (BinaryConnect's stochastic sign) draw from a generator of their own, seeded from
    # (seed, step) before every step: a resumed run draws what an uninterrupted one would, and every process
    # quantizes the weights alike. The global generator (dropout in the user's model) is seeded per step and
    # per process (D.rank_seed), so processes holding other samples draw other masks; the caller's own
    # generator state is given back afterwards.
    sampling = [r.layer.weight_quantizer for r in qm.layers if hasattr(r.layer.weight_quantizer, "draws")]
    weight_draws = torch.Generator(device=dev)
    for quantizer in sampling:
        quantizer.draws = weight_draws
    try:
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), _detached(sampling):
            for epoch in range(state.epoch, cfg.epochs):
                for layer in scheduled:
                    layer.weight_quantizer.on_epoch_start(epoch, cfg.epochs, layer)
                for quantizer in annealed:  # from the epoch alone, so a resumed run anneals as an uninterrupted one
                    quantizer.anneal(epoch / cfg.epochs)
                started = time.perf_counter()
                model.train()
                batches = epoch_batches(n, cfg.batch_size, cfg.seed, epoch, cfg.steps_per_epoch)
                bar = tqdm(batches, desc=f"qat epoch {epoch + 1}/{cfg.epochs}", unit="step", leave=False,
                           disable=not progress or rank != 0)
                loss_sum = correct = seen = 0.0
                try:
                    for i, idx in enumerate(bar):
                        step = epoch * per_epoch + i
                        if not frozen and step >= freeze_step:
                            freeze_batchnorms(qm)
                            frozen = True
                            if cfg.snap_at_freeze and step == freeze_step:  # once: a run resumed past it is already snapped
                                snap_latent_weights(qm)
                                if average is not None:  # the average is what is kept: snap its latents too
                                    average.transform(qm, snap_latent_weights)
                        weight_draws.manual_seed(run_seed(cfg.seed, step))
                        torch.manual_seed(D.rank_seed(run_seed(cfg.seed, step)))
                        factor = lr_factor(cfg, step, total, per_epoch)
                        for g in opt.param_groups:
                            g["lr"] = g["base_lr"] * factor
                        # The global batch is augmented as one process would, then each of ``world``
                        # processes takes its share (rank r: positions r, r + world, ...).
                        x, y = dataset_tensors(train_ds, idx.tolist())
                        if labels["train"] is None:
                            check_batch_labels(y, classes, "train", idx if caller_ids is None else caller_ids[idx])
                        x = augment(x, torch.Generator().manual_seed(run_seed(cfg.seed, 131 * step)))  # seed 0: as before
                        mixed = None
                        if cfg.mix != "none":  # on the global batch too, so that pairs cross the processes' shares
                            x, y_other, lam = mix_batch(x, y, cfg.mix, cfg.mix_alpha, cfg.seed * 5557 + step)
                            mixed = (y_other[rank::world].to(dev), lam)
                        x, y = x[rank::world].to(dev), y[rank::world].to(dev)
                        if x.dim() == 4:
                            x = x.contiguous(memory_format=memory_format)
                        with lower_precision():
                            out = model(x).float()
                        if teacher is not None:
                            reference = (teacher.float_reference() if isinstance(teacher, QuantModel)
                                         else contextlib.nullcontext())
                            with torch.no_grad(), lower_precision(), reference:
                                t_out = teacher(x).float()
                            loss = distillation_loss(out, t_out, y, cfg.kd["temperature"], cfg.kd["weight"], mixed)
                        else:
                            loss = mixed_cross_entropy(out, y, mixed)
                        task_loss = loss.detach()
                        damp = dampening_weight(cfg.dampen, step, total)
                        if damp > 0:  # Nagel et al. 2022 eq. 6, its weight on a rising cosine
                            loss = loss + damp * dampening_loss(dampened)
                        if not D.all_ranks_finite(loss):  # (collective: every process stops here, none waits)
                            value = loss.item()
                            became = f"{value}" if not math.isfinite(value) else f"non-finite on another process (here {value:.4g})"
                            raise NumericalError(f"QAT loss became {became} at epoch {epoch + 1}, step {i}: lower lr "
                                                 "(or quantizer_lr)")
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        if cfg.clip_grad_norm > 0:  # after DDP's all-reduce: every rank clips the same gradient
                            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]],
                                                           cfg.clip_grad_norm)
                        opt.step()
                        check_bn_statistics(batchnorms, epoch, i)
                        for layer in constrained:
                            layer.weight_quantizer.project_(layer)
                        if average is not None:
                            average.update(step)
                        loss_sum += task_loss.item() * len(y)
                        correct += float((out.argmax(1) == y).sum())
                        seen += len(y)
                        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}",
                                        lr=f"{opt.param_groups[-1]['lr']:.3g}", refresh=False)
                except KeyboardInterrupt:
                    bar.close()
                    if rank == 0:
                        where = f"; {ckpt_dir} holds {state.epoch} finished epoch(s): rerun to continue" if ckpt_dir else ""
                        print(f"\nqat: interrupted in epoch {epoch + 1}{where}", flush=True)
                    raise
                bar.close()
                if epoch + 1 == cfg.epochs and scheduled:
                    finish_schedules(scheduled, cfg.epochs, qm, average)
                with average.applied(qm) if average is not None else contextlib.nullcontext():  # the average is what is kept
                    val_top1 = held_out_top1(qm, val_ds, dev)
                    candidate = {k: v.detach().cpu().clone() for k, v in qm.state_dict().items()}
                loss_sum, correct, seen = D.sum_over_ranks([loss_sum, correct, seen], dev)  # the global batch's metrics
                row = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "train_top1": 100 * correct / max(seen, 1),
                       "val_top1": val_top1, "lr": opt.param_groups[-1]["lr"], "bn_frozen": frozen, "seconds": time.perf_counter() - started,
                       "processes": world}
                if cfg.dampen > 0:
                    row["dampen_weight"] = dampening_weight(cfg.dampen, (epoch + 1) * per_epoch, total)
                state.epoch = epoch + 1
                state.history.append(row)
                # A scheduled kind (INQ) validates a partly float network until its last stage, so
                # earlier epochs are not candidates: its last epoch is kept.
                improved = bool(scheduled) or keeps_epoch(cfg.select, val_top1, state, len(val_ds))  # type: ignore[arg-type]
                if improved:
                    state.best_val, state.best_epoch = val_top1, epoch + 1
                    state.best = candidate
                state.ema = average.shadow if average is not None else None
                if rank == 0 and progress:
                    print(f"qat epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.4f}, train {row['train_top1']:.2f}%, "
                          f"val {val_top1:.2f}%{' (kept)' if improved else ''}, {row['seconds']:.0f} s", flush=True)
                if ckpt_dir is not None:
                    if rank == 0:
                        save_state(ckpt_dir, qm, opt, state, fingerprint)
                    D.barrier()
    finally:
        # DDP and the last step's graph (its gradient hooks) are let go here, while the process group
        # is alive: an error unwinding through this frame kept them until a later garbage collection,
        # which under gloo could run after destroy_process_group and abort the process at exit.
        model = out = loss = None  # noqa: F841
        D.collect_wrapper()

    if state.best is not None:
        qm.load_state_dict(state.best)
    qm.to(memory_format=torch.contiguous_format)  # the deployed model's usual layout, whatever training used
    to_deployed_form(qm)
    qm.eval()
    qm.meta["qat"] = {**info, "epochs": cfg.epochs, "best_epoch": state.best_epoch, "best_val_top1": state.best_val, "select": cfg.select,
                      "val_samples": len(val_ds), "processes": world, "history": state.history}  # type: ignore[arg-type]
    if state.branched_from is not None:
        qm.meta["qat"]["branched_from"] = state.branched_from
    return qm
