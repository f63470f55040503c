"""Datasets for calibration and evaluation: CIFAR-10, MNIST, Fashion-MNIST.

Images stay uint8 in memory and are normalised on access; files are found in a data dir,
``$LOWBIT_DATA_DIR`` or the cache, or downloaded with checksum verification.
"""

from lowbit.data.dataset import ImageDataset
from lowbit.data.download import download_file, fetch_url, file_hash, safe_extract_tar, verify_file
from lowbit.data.load import load_dataset
from lowbit.data.locate import cache_root, data_cache_dir
from lowbit.data.registry import DATASETS, SPLITS, DatasetInfo, Resource, get_info
from lowbit.data.subsets import EpochSampler, calibration_subset, dataset_tensors, make_loader

__all__ = [
    "DATASETS",
    "SPLITS",
    "DatasetInfo",
    "EpochSampler",
    "ImageDataset",
    "Resource",
    "cache_root",
    "calibration_subset",
    "data_cache_dir",
    "dataset_tensors",
    "download_file",
    "fetch_url",
    "file_hash",
    "get_info",
    "load_dataset",
    "make_loader",
    "safe_extract_tar",
    "verify_file",
]
