"""imagefolder and tensors data that were read wrong without a word: the colour mode taken from the first image,
images in sub-folders of a class skipped, hidden folders read as classes, and empty splits failing later."""
import warnings

import numpy as np
import pytest

from lowbit.data.user import load_user_data
from lowbit.errors import LowbitError


def _save(path, mode: str = "RGB", value: int = 100) -> None:
    """An 8x8 image of one colour at ``path``."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (8, 8), value if mode == "L" else (value, 20, 200)).save(path)


def _folder(root, mode: str = "RGB", classes=("a", "b")):
    """``root/{train,test}/<class>/0.png`` and ``1.png``."""
    for split in ("train", "test"):
        for name in classes:
            for i in range(2):
                _save(root / split / name / f"{i}.png", mode)
    return root


def test_first_grayscale_image_does_not_turn_rgb_folder_gray(tmp_path):
    """The colour mode came from the first image: one grayscale image first made every RGB image 1-channel."""
    root = _folder(tmp_path)
    _save(root / "train" / "a" / "0.png", "L", 77)
    train, test = load_user_data(f"imagefolder:{root}")
    assert train.images.shape == (4, 3, 8, 8) and test.images.shape == (4, 3, 8, 8)
    assert train.images[0].tolist() == np.full((3, 8, 8), 77).tolist()  # the gray image, as RGB
    assert train.images[1, :, 0, 0].tolist() == [100, 20, 200]  # colour kept


def test_all_grayscale_folder_still_gives_one_channel(tmp_path):
    train, test = load_user_data(f"imagefolder:{_folder(tmp_path, 'L')}")
    assert train.images.shape == (4, 1, 8, 8) and test.images.shape == (4, 1, 8, 8)


def test_images_in_subfolders_of_a_class_are_read_in_order(tmp_path):
    """torchvision's ImageFolder reads class folders recursively; imagefolder skipped their sub-folders."""
    root = _folder(tmp_path)
    _save(root / "train" / "a" / "batch2" / "0.png", value=1)
    _save(root / "train" / "a" / "batch2" / "deeper" / "0.png", value=2)
    _save(root / "train" / "a" / ".hidden" / "0.png", value=3)
    _save(root / "train" / "b" / ".9.png", value=4)
    train, _ = load_user_data(f"imagefolder:{root}")
    assert len(train) == 6
    assert train.labels.tolist() == [0, 0, 0, 0, 1, 1]
    assert train.images[:4, 0, 0, 0].tolist() == [100, 100, 1, 2]  # sorted paths: 0.png, 1.png, batch2/...


def test_hidden_class_folders_are_ignored_with_a_warning(tmp_path):
    """A .ipynb_checkpoints folder became class 0 and shifted every label."""
    root = _folder(tmp_path)
    for split in ("train", "test"):
        _save(root / split / ".ipynb_checkpoints" / "x.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train, test = load_user_data(f"imagefolder:{root}")
    assert [str(w.message) for w in caught] == [f"{root / split}: ignoring hidden folder(s) .ipynb_checkpoints "
                                                "(not classes)" for split in ("train", "test")]
    assert train.classes == ("a", "b") and test.classes == ("a", "b")
    assert train.labels.tolist() == [0, 0, 1, 1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no hidden folder, no warning
        load_user_data(f"imagefolder:{_folder(tmp_path / 'plain')}")


def test_only_hidden_class_folders_is_refused(tmp_path):
    root = _folder(tmp_path)
    (root / "test" / "a").rename(root / "test" / ".a")
    (root / "test" / "b").rename(root / "test" / ".b")
    with pytest.warns(UserWarning), pytest.raises(LowbitError, match="test holds no class folders"):
        load_user_data(f"imagefolder:{root}")


@pytest.mark.parametrize("split", ["train", "test"])
def test_empty_npz_split_is_refused_by_file_and_split(tmp_path, split):
    """An empty x_train failed later with a raw IndexError; an empty x_test with an unnamed 'evaluate got no data'."""
    x, y = np.zeros((4, 1, 8, 8), np.uint8), np.arange(4) % 2
    arrays = dict(x_train=x, y_train=y, x_test=x, y_test=y)
    arrays[f"x_{split}"], arrays[f"y_{split}"] = x[:0], y[:0]
    path = tmp_path / "empty.npz"
    np.savez(path, **arrays)
    with pytest.raises(LowbitError, match=rf"empty\.npz: x_{split} holds no images \(shape \(0, 1, 8, 8\)\)"):
        load_user_data(f"tensors:{path}")


def test_imagefolder_split_without_images_is_refused(tmp_path):
    root = _folder(tmp_path)
    (root / "test" / "b" / "0.png").unlink()
    (root / "test" / "b" / "1.png").unlink()
    _save(root / "test" / "b" / ".hidden" / "0.png")  # hidden images do not count
    with pytest.raises(LowbitError, match=r"test/b holds no images"):
        load_user_data(f"imagefolder:{root}")
