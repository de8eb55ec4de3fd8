"""Train PyTorch and Lightning models directly on AnnData.

The batching engine lives in :mod:`torch_adata.dataset` (with :mod:`torch_adata._gather` doing
the row reads), samplers in :mod:`torch_adata.samplers`, the Lightning data module in
:mod:`torch_adata.datamodule`, and datasets (simulated, LARRY) in :mod:`torch_adata.datasets`.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._batch import SparseBatch, collate, densify
from ._counts import check_counts
from ._fields import CategoryEncoder, UnknownCategoryError
from .dataset import AnnDataset
from .options import Fields, Loader, Split, TimeSampling

__version__ = "0.2.0.dev0"

__all__ = [
    "AnnDataModule",
    "AnnDataset",
    "CategoryEncoder",
    "Fields",
    "Loader",
    "SparseBatch",
    "Split",
    "TimeResolvedAnnDataset",
    "TimeSampling",
    "UnknownCategoryError",
    "check_counts",
    "collate",
    "datasets",
    "densify",
    "models",
    "samplers",
    "write_shuffled",
]

# Imported on first use: the data module pulls in Lightning, which DataLoader worker processes
# (they unpickle datasets, not data modules) should not pay for.
_LAZY = {
    "datasets": "torch_adata.datasets",
    "models": "torch_adata.models",
    "samplers": "torch_adata.samplers",
    "AnnDataModule": "torch_adata.datamodule",
    "TimeResolvedAnnDataset": "torch_adata.time_resolved",
    "write_shuffled": "torch_adata.shuffle",
}


def __getattr__(name: str) -> Any:
    if name in ("AnnDataModule", "TimeResolvedAnnDataset", "write_shuffled"):
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _LAZY:
        return importlib.import_module(_LAZY[name])
    raise AttributeError(f"module 'torch_adata' has no attribute {name!r}")
