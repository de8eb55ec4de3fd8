"""Datasets: the embedded simulated time course, LARRY, and a registry of names.

``load_dataset(name_or_path)`` is what :class:`~torch_adata.AnnDataModule` calls when its
source is a string. Every public name lives here; the modules behind them are private.
"""

from ._fetch import DownloadError
from ._larry import BASE_URL, GEO_MIRROR, KNOWN_HASHES, larry, larry_filenames
from ._preprocess import preprocess
from ._registry import available_datasets, load_dataset, register_dataset
from ._simulated import simulated

__all__ = [
    "BASE_URL",
    "GEO_MIRROR",
    "KNOWN_HASHES",
    "DownloadError",
    "available_datasets",
    "larry",
    "larry_filenames",
    "load_dataset",
    "preprocess",
    "register_dataset",
    "simulated",
]
