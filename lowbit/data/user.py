"""A user's own data and model for the command line (issue 13 part 1).

Data, ``--data KIND:PATH``:
- ``imagefolder:DIR``: ``DIR/train/<class>/**`` and ``DIR/test/<class>/**`` (png, jpg, jpeg, bmp,
  gif, webp; read with Pillow, sub-folders of a class included). Classes are the sub-folder names,
  sorted, the same in both splits; hidden folders and files (``.ipynb_checkpoints``) are skipped.
  Every image must have the size of the first one; a folder of only grayscale images gives 1 channel
  (16-bit grayscale keeps its top 8 bits), otherwise every image is converted to RGB.
- ``tensors:FILE.npz``: arrays ``x_train, y_train, x_test, y_test`` (``x``: N×C×H×W uint8
  pixels, or float already normalised; ``y``: integer labels).
uint8 pixels are normalised as (x/255 − mean)/std with ``--mean``/``--std`` (default 0 and 1).

Model, ``--model pkg.module:factory`` (with ``--weights``): ``factory()`` must return an
``nn.Module``; the weights are loaded strictly into it.
"""
from __future__ import annotations

import importlib
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from lowbit.data.dataset import ImageDataset
from lowbit.errors import LowbitError

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
KINDS = ("imagefolder", "tensors")


def load_user_data(spec: str, mean: Sequence[float] | None = None,
                   std: Sequence[float] | None = None) -> tuple[Dataset, Dataset]:
    """(train, test) datasets of (normalised float CHW tensor, int label) from ``KIND:PATH``."""
    kind, _, path = spec.partition(":")
    if kind not in KINDS or not path:
        raise LowbitError(f"--data {spec!r}: write imagefolder:DIR or tensors:FILE.npz")
    if kind == "imagefolder":
        return _image_folder(Path(path), mean, std)
    return _npz(Path(path), mean, std)


def _norm(channels: int, values: Sequence[float] | None, default: float, what: str) -> list[float]:
    if values is None:
        return [default] * channels
    v = list(values)
    if len(v) == 1:
        v = v * channels
    if len(v) != channels:
        raise LowbitError(f"--{what} gives {len(v)} values for images with {channels} channels")
    if what == "std" and any(x <= 0 for x in v):
        raise LowbitError(f"--std values must be positive, got {v}")
    # pixels are scaled to [0, 1] before (x - mean) / std: a mean of 125.3 (0..255 units) maps every pixel
    # near -2 and trains or scores on a blank image without a word
    if (what == "mean" and not all(0.0 <= x <= 1.0 for x in v)) or (what == "std" and not all(x <= 1.0 for x in v)):
        raise LowbitError(f"--{what} {','.join(f'{x:g}' for x in v)} is outside [0, 1]: pixels are scaled to [0, 1] "
                          "first, so give the values in [0, 1] units (divide by 255)")
    return v


def _image_folder(root: Path, mean, std) -> tuple[Dataset, Dataset]:
    if not root.is_dir():
        raise LowbitError(f"imagefolder {root} is not a directory")
    classes: list[str] | None = None
    listed: dict[str, list[tuple[Path, int]]] = {}
    for split in ("train", "test"):
        names, listed[split] = _list_split(root, split)
        if classes is None:
            classes = names
        elif names != classes:
            raise LowbitError(f"{root / split} has classes {names}, train/ has {classes}: both splits need the "
                              "same ones")
    mode = _folder_mode([f for files in listed.values() for f, _ in files])
    size = None
    splits = {}
    for split, files in listed.items():
        images = []
        for f, _ in files:
            a, size = _read_image(f, mode, size)
            images.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
        splits[split] = (np.stack(images), np.asarray([label for _, label in files]))
    c = splits["train"][0].shape[1]
    m, s = _norm(c, mean, 0.0, "mean"), _norm(c, std, 1.0, "std")
    return tuple(ImageDataset(x, y, m, s, name=f"imagefolder:{root}", split=split, classes=classes or ())  # type: ignore[return-value]
                 for split, (x, y) in splits.items())


def _list_split(root: Path, split: str) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names and (image file, label) pairs of ``root/split``; a split without images is refused here."""
    d = root / split
    if not d.is_dir():
        raise LowbitError(f"imagefolder {root} needs a {split}/ sub-folder with one folder per class")
    names = _class_names(d)
    files = []
    for label, name in enumerate(names):
        found = _class_images(d / name)
        if not found:
            raise LowbitError(f"{d / name} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        files += [(f, label) for f in found]
    return names, files


def _class_names(d: Path) -> list[str]:
    """Sorted class folders of ``d``; hidden ones (.ipynb_checkpoints, ...) would be class 0 and shift every label."""
    folders = sorted(p.name for p in d.iterdir() if p.is_dir())
    hidden = [n for n in folders if n.startswith(".")]
    if hidden:
        warnings.warn(f"{d}: ignoring hidden folder(s) {', '.join(hidden)} (not classes)", stacklevel=5)
    names = [n for n in folders if not n.startswith(".")]
    if not names:
        raise LowbitError(f"{d} holds no class folders (one sub-folder per class, images inside)")
    return names


def _class_images(folder: Path) -> list[Path]:
    """Image files anywhere below ``folder`` (as torchvision's ImageFolder reads them), sorted, hidden ones skipped."""
    return sorted(p for p in folder.rglob("*")
                  if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _is_gray(pil_mode: str) -> bool:
    """Pillow modes read as one channel."""
    return pil_mode in ("L", "1") or _is_wide_gray(pil_mode)


def _folder_mode(files: list[Path]) -> str:
    """Mode "L" when every image is grayscale, else "RGB": one colour image must not turn the rest gray."""
    from PIL import Image, UnidentifiedImageError

    for f in files:
        try:
            with Image.open(f) as im:  # reads the header only
                if not _is_gray(im.mode):
                    return "RGB"
        except Image.DecompressionBombError as err:
            raise _too_large(f, err) from None
        except (UnidentifiedImageError, OSError) as err:
            raise LowbitError(f"{f} is not an image Pillow can read: {err}") from None
    return "L"


def _read_image(f: Path, mode: str, size: tuple[int, int] | None) -> tuple[np.ndarray, tuple[int, int]]:
    """Pixels of ``f`` in ``mode`` and the size every image must have (the first image's)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(f) as im:
            size = size or im.size
            if im.size != size:
                raise LowbitError(f"{f} is {im.size[0]}x{im.size[1]}, the first image was "
                                  f"{size[0]}x{size[1]}: every image must have one size")
            return _pixels(im, mode, f), size
    except Image.DecompressionBombError as err:
        raise _too_large(f, err) from None
    except (UnidentifiedImageError, OSError) as err:
        raise LowbitError(f"{f} is not an image Pillow can read: {err}") from None


def _too_large(f: Path, err: Exception) -> LowbitError:
    """Pillow refuses an image over its pixel limit (a decompression bomb: a few KB on disk, GBs in memory)."""
    return LowbitError(f"{f} is too large to read ({err}); the images of one data set must share one (small) "
                       "size: resize it")


def _is_wide_gray(pil_mode: str) -> bool:
    """16-bit ("I;16", "I;16B", ...) and 32-bit integer ("I") grayscale."""
    return pil_mode == "I" or pil_mode.startswith("I;16")


def _pixels(im: PILImage, mode: str, f: Path) -> np.ndarray:
    """HxW (``mode`` "L") or HxWx3 uint8 pixels of ``im``.

    Pillow's convert("L") clips 16-bit grayscale to 0/255 instead of scaling it, so wide grayscale
    keeps its top 8 bits (value >> 8) here.
    """
    if not _is_wide_gray(im.mode):
        return np.asarray(im.convert(mode), dtype=np.uint8)
    wide = np.asarray(im).astype(np.int64)
    if wide.size and (wide.min() < 0 or wide.max() > 0xFFFF):
        raise LowbitError(f"{f} is a {im.mode!r} image with values {wide.min()}..{wide.max()}, outside the 16-bit "
                          "range 0..65535: save it as 8- or 16-bit grayscale")
    a = (wide >> 8).astype(np.uint8)
    return a if mode == "L" else np.repeat(a[..., None], 3, axis=2)


_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
_DAMAGED = (zipfile.BadZipFile, zlib.error, EOFError)  # what a cut-off or bit-flipped .npz raises in numpy


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """The four arrays of ``path``, read without pickle; each way the file can be wrong is named."""
    try:
        data = np.load(path, allow_pickle=False)  # no pickle: a file from someone else runs no code
    except _DAMAGED as err:  # BadZipFile: a cut-off copy (the zip directory is at the end)
        raise LowbitError(f"{path} is truncated or corrupt ({_why(err)}); copy or save it again") from None
    except (ValueError, OSError) as err:
        raise LowbitError(f"{path} is not a readable .npz of arrays: {err}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise LowbitError(f"{path} holds a single array ({type(data).__name__}), not an .npz archive: save the splits "
                          f"with np.savez(file, {'=..., '.join(_NPZ_KEYS)}=...)")
    with data:
        missing = [k for k in _NPZ_KEYS if k not in data.files]
        if missing:
            raise LowbitError(f"{path} lacks {missing}; it holds {sorted(data.files)} (need {', '.join(_NPZ_KEYS)})")
        arrays = {}
        for k in _NPZ_KEYS:
            try:
                arrays[k] = data[k]
            except ValueError as err:
                if "pickle" in str(err):  # object arrays need pickle, which is refused
                    raise LowbitError(f"{path}: {k} is an object array ({err}); save plain numeric arrays "
                                      "(uint8 or float pixels, integer labels)") from None
                raise LowbitError(f"{path} is truncated or corrupt: its array {k} cannot be read ({err}); copy "
                                  "or save it again") from None
            except (*_DAMAGED, OSError) as err:  # flipped bytes in a member: zlib.error, a bad CRC, a short read
                raise LowbitError(f"{path} is truncated or corrupt: its array {k} cannot be read ({_why(err)}); "
                                  "copy or save it again") from None
    return arrays


def _why(err: BaseException) -> str:
    """An exception's message, or its name when it has none (EOFError)."""
    return str(err) or type(err).__name__


def _check_split(path: Path, split: str, x: np.ndarray, y: np.ndarray) -> None:
    """Shapes and labels that would fail later (or score wrong) are refused while the file is named."""
    if x.ndim != 4 or y.ndim != 1 or len(x) != len(y):
        raise LowbitError(f"{path}: x_{split} must be N×C×H×W with one label per image in y_{split} (shape "
                          f"(N,)); got {x.shape} and {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise LowbitError(f"{path}: y_{split} must hold integer labels, got {y.dtype}")
    if len(x) == 0:
        raise LowbitError(f"{path}: x_{split} holds no images (shape {x.shape}); each split needs at least one")
    if y.size and y.min() < 0:
        raise LowbitError(f"{path}: y_{split} holds negative labels (smallest {y.min()}); labels are class "
                          "indices 0..K-1")


def _npz(path: Path, mean, std) -> tuple[Dataset, Dataset]:
    if not path.is_file():
        raise LowbitError(f"tensors file {path} does not exist")
    data = _read_npz(path)
    if (data["x_train"].dtype == np.uint8) != (data["x_test"].dtype == np.uint8):  # uint8 scaled, floats as they are
        raise LowbitError(f"{path}: x_train is {data['x_train'].dtype} and x_test is {data['x_test'].dtype}; both "
                          "splits must be uint8 pixels or both floats, or calibration and scoring see different "
                          "scales")
    for split in ("train", "test"):
        _check_split(path, split, data[f"x_{split}"], data[f"y_{split}"])
    if data["x_train"].shape[1:] != data["x_test"].shape[1:]:
        raise LowbitError(f"{path}: x_train images are C×H×W {data['x_train'].shape[1:]} but x_test images are "
                          f"{data['x_test'].shape[1:]}; both splits must hold images of one shape for one model")
    out = []
    for split in ("train", "test"):
        x, y = data[f"x_{split}"], data[f"y_{split}"]
        if x.dtype == np.uint8:
            c = x.shape[1]
            out.append(ImageDataset(x, y, _norm(c, mean, 0.0, "mean"), _norm(c, std, 1.0, "std"),
                                    name=f"tensors:{path}", split=split))
        elif np.issubdtype(x.dtype, np.floating):
            if mean is not None or std is not None:
                raise LowbitError(f"{path}: x_{split} is float (taken as already normalised); --mean/--std "
                                  "apply to uint8 pixels only")
            bad = x.size - int(np.isfinite(x).sum())
            if bad:  # a NaN image gives NaN logits, scored as class 0, and NaN training losses
                raise LowbitError(f"{path}: x_{split} holds {bad} NaN or infinite pixel value(s) (in "
                                  f"{int((~np.isfinite(x)).reshape(len(x), -1).any(axis=1).sum())} image(s)); "
                                  "every pixel must be a finite number")
            out.append(TensorDataset(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long)))
        else:
            raise LowbitError(f"{path}: x_{split} must be uint8 pixels or floats, got {x.dtype}")
    return out[0], out[1]


def load_factory(spec: str) -> nn.Module:
    """``pkg.module:factory`` → ``factory()``, checked to be an ``nn.Module``."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise LowbitError(f"--model {spec!r}: write a zoo name or pkg.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise LowbitError(f"--model {spec!r}: cannot import {module_name!r} ({err}); is it on PYTHONPATH?") from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise LowbitError(f"--model {spec!r}: module {module_name!r} has no {attr!r}")
    if not callable(factory):
        raise LowbitError(f"--model {spec!r}: {attr!r} is not callable")
    model = factory()
    if not isinstance(model, nn.Module):
        raise LowbitError(f"--model {spec!r}: {attr}() returned {type(model).__name__}, not a torch.nn.Module")
    return model
