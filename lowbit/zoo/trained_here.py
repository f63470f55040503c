"""Float baselines for zoo models that have no published weights (LeNet-5, the small CNNs).

Such a model is trained here once on its dataset's training split (SGD, cosine schedule)
and cached as safetensors, so every benchmark of it starts from the same float model.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError

DEFAULT_EPOCHS = 3


def trained_here_path(name: str, epochs: int = DEFAULT_EPOCHS, seed: int = 0) -> Path:
    """Cache file of ``trained_here(name, epochs=epochs, seed=seed)``: name, dataset, epochs and seed in its name."""
    from lowbit.zoo.registry import model_info, models_cache_dir

    return models_cache_dir() / f"{name}-{model_info(name).dataset}-e{epochs}-s{seed}.safetensors"


def trained_here(name: str, data_dir: str | os.PathLike[str] | None = None, epochs: int = DEFAULT_EPOCHS,
                 seed: int = 0, cache: str | os.PathLike[str] | None = None, progress: bool = True,
                 download: bool = True) -> nn.Module:
    """``name`` trained for ``epochs`` on its dataset's training split (cached after the first call), in eval mode.

    Refuses a model that has published weights: its float baseline is those weights (``pretrained``).
    The initial weights and the training come from ``seed`` alone (the cache name says so), and the
    caller's global RNG state is left as it was.
    """
    from lowbit.data import load_dataset, make_loader
    from lowbit.zoo.registry import ARCHITECTURES, build, model_info
    from lowbit.zoo.train import remove_checkpoint, train_classifier
    from lowbit.zoo.weights import save_weights

    with torch.random.fork_rng(devices=[]):  # CPU RNG only: the model is built and trained on the CPU
        torch.manual_seed(seed)
        model = build(name)  # unknown names fail here, naming the known ones
        if ARCHITECTURES[name].weights is not None:
            raise LowbitError(f"model {name!r} has published weights: load them with lowbit.zoo.pretrained({name!r})")
        if epochs < 1:
            raise LowbitError(f"epochs must be >= 1 to train {name!r} here, got {epochs}")
        path = Path(cache) if cache else trained_here_path(name, epochs, seed)
        if path.is_file():
            return _load_cached(model, name, path)
        if path.suffix != ".safetensors":  # refused before minutes of training, not after them
            raise LowbitError(f"cache={str(path)!r}: the float baseline is written as safetensors; use a "
                              ".safetensors file name")
        dataset = model_info(name).dataset
        train = load_dataset(dataset, "train", data_dir=data_dir, download=download)
        checkpoint = training_checkpoint_path(path)  # a killed run resumes where it stopped
        train_classifier(model, make_loader(train, 128, shuffle=True, seed=seed), epochs, lr=0.05, progress=progress,
                         checkpoint=checkpoint, run={"model": name, "dataset": dataset, "seed": seed,
                                                     "batch_size": 128, "train_images": len(train)})
    save_weights(model, path, {"model": name, "dataset": dataset, "epochs": str(epochs), "seed": str(seed)})
    remove_checkpoint(checkpoint)  # the baseline is saved: not needed
    return model.eval()


def training_checkpoint_path(cache: Path) -> Path:
    """Where ``trained_here`` keeps its training state while the baseline at ``cache`` is trained (beside it)."""
    return cache.with_name(cache.name[: -len(".safetensors")] + ".training.safetensors")


def _load_cached(model: nn.Module, name: str, path: Path) -> nn.Module:
    """``model`` with the cached weights, through the checked loader so a bad file is named, not a raw error."""
    from lowbit.zoo.weights import load_weights

    try:
        load_weights(model, path)
    except LowbitError as err:
        raise LowbitError(f"cached float baseline of {name!r} is unusable: {err}. Delete {path} to train it "
                          "again, or pass another cache=") from err
    return model.eval()
