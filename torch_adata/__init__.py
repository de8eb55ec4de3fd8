"""Train PyTorch and Lightning models directly on AnnData.

The batching engine lives in :mod:`torch_adata.dataset` (with :mod:`torch_adata._gather` doing
the row reads), samplers in :mod:`torch_adata.samplers`, the Lightning data module in
:mod:`torch_adata.datamodule`, and datasets (simulated, LARRY) in :mod:`torch_adata.datasets`.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._batch import SparseBatch, collate, densify
from ._fields import CategoryEncoder
from .dataset import AnnDataset

__version__ = "0.2.0.dev0"

__all__ = [
    "AnnDataset",
    "CategoryEncoder",
    "SparseBatch",
    "collate",
    "datasets",
    "densify",
]

_LAZY = {"datasets": "torch_adata.datasets"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return importlib.import_module(_LAZY[name])
    raise AttributeError(f"module 'torch_adata' has no attribute {name!r}")
