"""Training labels checked before and during QAT: one integer class index per sample, each
one of the model's outputs. Unchecked, a bad label failed deep in torch ("Target 7 is out of
bounds") or in dataset_tensors, naming neither the dataset nor the model, or (float and
column labels) trained on without complaint."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from lowbit.data.dataset import ImageDataset
from lowbit.errors import LowbitError
from lowbit.model.quant_model import QuantModel


def integral(y: torch.Tensor) -> bool:
    """Whether ``y`` holds integers (bool is not a class index)."""
    return not (y.is_floating_point() or y.is_complex() or y.dtype == torch.bool)


def dataset_labels(ds: Dataset) -> torch.Tensor | None:
    """The labels of ``ds`` as it holds them (dtype and shape unchanged), read without its inputs;
    None for a dataset that keeps no label tensor: reading its items one by one would cost about
    an epoch's loading before the first step, so its labels are checked batch by batch instead."""
    if isinstance(ds, Subset):
        labels = dataset_labels(ds.dataset)
        return None if labels is None else labels[torch.as_tensor(np.asarray(ds.indices), dtype=torch.long)]
    if isinstance(ds, TensorDataset) and len(ds.tensors) == 2:
        return ds.tensors[1]
    if isinstance(ds, ImageDataset):
        return ds.labels
    return None


def _check_shape_and_type(y: torch.Tensor, what: str) -> None:
    if y.dim() != 1:
        raise LowbitError(f"qat {what} data: the labels have shape {tuple(y.shape)}; QAT needs one integer class index "
                          f"per sample, shape ({y.shape[0] if y.dim() else 1},) (squeeze a column of labels; take the "
                          "argmax of one-hot ones)")
    if not integral(y):
        raise LowbitError(f"qat {what} data: the labels are {y.dtype}; QAT needs integer class indices (for one-hot or "
                          "soft labels, their argmax)")


def class_indices(ds: Dataset, what: str) -> torch.Tensor | None:
    """The labels of dataset ``what`` (train/val), checked to be one integer class index per
    sample; None where they are checked per batch (see dataset_labels)."""
    y = dataset_labels(ds)
    if y is not None:
        _check_shape_and_type(y, what)
    return y


def _check_range(y: torch.Tensor, classes: int, what: str, sample_ids: torch.Tensor | None = None) -> None:
    bad = ((y < 0) | (y >= classes)).nonzero().flatten()
    if bad.numel():
        i = int(bad[0])
        sample = i if sample_ids is None else int(sample_ids[i])
        more = f" (and {bad.numel() - 1} more)" if bad.numel() > 1 else ""
        raise LowbitError(f"qat {what} data: sample {sample} has label {int(y[i])}{more}, outside the model's "
                          f"{classes} classes (0 to {classes - 1})")


def check_label_range(labels: dict[str, torch.Tensor | None], classes: int) -> None:
    """Every label one of the model's ``classes`` outputs (datasets whose labels are known)."""
    for what, y in labels.items():
        if y is not None:
            _check_range(y, classes, what)


def check_batch_labels(y: torch.Tensor, classes: int, what: str, sample_ids: torch.Tensor) -> None:
    """The same checks on one batch's labels (CPU, before they move), for a dataset whose labels
    were not known up front; ``sample_ids``: the batch's positions in the caller's dataset."""
    _check_shape_and_type(y, what)
    _check_range(y, classes, what, sample_ids)


def model_classes(qm: QuantModel, sample: torch.Tensor, dev: torch.device) -> int:
    """How many classes the model predicts: the width of its output on one sample (whatever its last layer)."""
    was_training = qm.training
    try:
        with torch.no_grad():
            out = qm.to(dev).eval()(sample.to(dev))
    finally:
        qm.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise LowbitError(f"qat trains classifiers, whose output is (batch, classes); the model outputs {shape}")
    return int(out.shape[1])
