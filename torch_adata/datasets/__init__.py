"""Datasets: the embedded simulated time course, LARRY, and a registry of names.

``load_dataset(name_or_path)`` is what :class:`~torch_adata.AnnDataModule` calls when its
source is a string.
"""

from ._registry import available_datasets, load_dataset, register_dataset
from .larry import larry
from .preprocess import preprocess
from .simulated import simulated

__all__ = [
    "available_datasets",
    "larry",
    "load_dataset",
    "preprocess",
    "register_dataset",
    "simulated",
]
