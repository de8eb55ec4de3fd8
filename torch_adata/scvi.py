"""scvi-tools models trained on batches served by torch_adata (optional extra ``scvi``).

:class:`SCVIDataModule` is an :class:`~torch_adata.AnnDataModule` that also provides what
scvi-tools (1.4) reads from a custom Lightning data module: a ``registry`` to build the model
from (``scvi.model.SCVI(registry=dm.registry)``), the sizes (``n_obs``, ``n_vars``,
``n_batch``, ``n_labels``), batches under scvi's keys (``"X"``, ``"batch"``, ``"labels"``,
``"extra_categorical_covs"``, ``"extra_continuous_covs"``) and an inference loader for
``get_latent_representation(dataloader=dm.inference_dataloader())``. Splits, workers, samplers
and DDP are those of the data module. A collection of files (a list, folder or glob, see
:class:`~torch_adata.collection.SourceCollection`) trains as one dataset, each file a batch
unless ``batch_key`` names another column.

scvi-tools is imported only when a :class:`SCVIDataModule` is built, never by
``import torch_adata`` nor by importing this module.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import torch

from ._batch import densify
from ._source import FieldKeyError
from .collection import is_collection
from .datamodule import AnnDataModule
from .options import Fields, Loader, Split

__all__ = ["SCVI_VERSIONS", "SCVIDataModule", "require_scvi"]

#: The scvi-tools versions this route is tested with: ``>=1.4,<1.5``.
SCVI_VERSIONS = ((1, 4), (1, 5))
_INSTALL = "pip install 'torch-adata[scvi]'"
_MODELS = ("SCVI", "SCANVI")


def require_scvi() -> Any:
    """Import scvi-tools, checking that its version is supported.

    Returns
    -------
    Any
        The ``scvi`` package (a module).

    Raises
    ------
    ImportError
        scvi-tools is missing, or its version is outside ``torch_adata.scvi.SCVI_VERSIONS``.
    """
    low, high = (".".join(map(str, v)) for v in SCVI_VERSIONS)
    try:
        import scvi
    except ImportError as err:
        raise ImportError(
            f"SCVIDataModule needs scvi-tools (>={low},<{high}), which is not installed: "
            f"{_INSTALL}."
        ) from err
    found = tuple(int(p) for p in scvi.__version__.split(".")[:2] if p.isdigit())
    if not SCVI_VERSIONS[0] <= found < SCVI_VERSIONS[1]:
        raise ImportError(
            f"SCVIDataModule supports scvi-tools >={low},<{high}; found {scvi.__version__}. "
            f"Install a supported version: {_INSTALL}."
        )
    return scvi


class SCVIDataModule(AnnDataModule):
    """An :class:`~torch_adata.AnnDataModule` that scvi-tools models train from.

    ::

        dm = SCVIDataModule(adata, batch_key="batch", layer="counts", split=Split(val_size=0.1))
        model = scvi.model.SCVI(registry=dm.registry)
        model.train(max_epochs=20, datamodule=dm)
        adata.obsm["X_scVI"] = model.get_latent_representation(
            dataloader=dm.inference_dataloader()
        )

    Batches carry scvi's keys: ``"X"`` (counts, dense float32), ``"batch"`` and ``"labels"``
    (int64 codes, ``(B, 1)``), ``"extra_categorical_covs"`` (int64 codes, ``(B, k)``) and
    ``"extra_continuous_covs"`` (float32, ``(B, k)``); absent ones are ``None``. Codes follow
    scvi's ``setup_anndata``: a categorical column's own order, sorted labels otherwise, and
    for ``labels_key`` the ``unlabeled_category`` last.

    Parameters
    ----------
    source
        An AnnData, a path to an ``.h5ad`` file, or a dataset name (as for
        :class:`~torch_adata.AnnDataModule`). Or a collection read as one dataset, cells
        source after source: a list of paths and/or AnnData objects, a mapping ``{name: path
        or AnnData}``, a folder (its ``*.h5ad`` files, sorted by name) or a glob such as
        ``"atlas/*.h5ad"`` (see :class:`~torch_adata.collection.SourceCollection`).
    batch_key
        obs column of the batches to correct for. ``None``: one batch, or for a collection
        its ``source_key`` column, so that each file is a batch.
    labels_key
        obs column of the cell labels (required by ``SCANVI``).
    unlabeled_category
        The label of unlabeled cells in ``labels_key`` (``SCANVI``).
    categorical_covariate_keys, continuous_covariate_keys
        Extra obs columns the model conditions on.
    layer
        Layer with the counts (``None``: ``adata.X``).
    join, source_key
        For a collection: how the files' genes are matched (``"inner"``, ``"outer"`` or a list
        of genes) and the obs column naming each cell's file (see
        :class:`~torch_adata.Fields`).
    model_name
        ``"SCVI"`` or ``"SCANVI"``: the model the registry is for. With ``"SCANVI"``, each
        training and validation batch is passed as ``(batch, its labelled cells)``, so the
        classifier learns from labelled cells only.
    split, batch_size, num_workers, loader, seed, backed, load_kwargs
        As for :class:`~torch_adata.AnnDataModule`. ``split`` gives scvi its validation cells
        (``validation_loss``, early stopping).
    sparse
        Send the counts as sparse batches and densify them once on the device.

    Raises
    ------
    ImportError
        scvi-tools is missing or of an unsupported version (see ``torch_adata.scvi.SCVI_VERSIONS``).
    ValueError
        An unknown ``model_name``, or ``SCANVI`` without ``labels_key``.
    """

    def __init__(
        self,
        source: str | os.PathLike | ad.AnnData | Sequence | Mapping,
        *,
        batch_key: str | None = None,
        labels_key: str | None = None,
        unlabeled_category: str | None = None,
        categorical_covariate_keys: Sequence[str] | None = None,
        continuous_covariate_keys: Sequence[str] | None = None,
        layer: str | None = None,
        join: str | Sequence[str] = "inner",
        source_key: str = "source",
        model_name: str = "SCVI",
        split: Split | dict[str, Any] | None = None,
        batch_size: int = 256,
        num_workers: int = 0,
        loader: Loader | dict[str, Any] | None = None,
        seed: int = 0,
        backed: bool = False,
        load_kwargs: dict[str, Any] | None = None,
        sparse: bool = False,
    ):
        self._scvi_version = require_scvi().__version__
        if model_name not in _MODELS:
            raise ValueError(f"model_name must be one of {_MODELS}, got {model_name!r}.")
        if model_name == "SCANVI" and labels_key is None:
            raise ValueError(
                "SCANVI learns from labels: pass labels_key= (the obs column of cell labels) "
                "and unlabeled_category= (the label of unlabeled cells)."
            )
        if batch_key is None and is_collection(source):
            batch_key = source_key  # each file its own batch
        self.batch_key = batch_key
        self.labels_key = labels_key
        self.unlabeled_category = unlabeled_category
        self.categorical_covariate_keys = list(categorical_covariate_keys or [])
        self.continuous_covariate_keys = list(continuous_covariate_keys or [])
        self.model_name = model_name
        categorical = [k for k in (batch_key, labels_key) if k is not None]
        categorical += self.categorical_covariate_keys
        keys = list(dict.fromkeys(categorical + self.continuous_covariate_keys))
        super().__init__(
            source,
            fields=Fields(
                layer=layer,
                obs_keys=keys,
                sparse=sparse,
                densify=sparse,
                join=join if isinstance(join, str) else list(join),
                source_key=source_key,
            ),
            split=split,
            batch_size=batch_size,
            num_workers=num_workers,
            loader=loader,
            seed=seed,
            backed=backed,
            load_kwargs=load_kwargs,
        )
        self._categories: dict[str, np.ndarray] | None = None
        self._lookups: dict[str, tuple[torch.Tensor | None, torch.Tensor]] = {}

    # -- data ------------------------------------------------------------------------------

    def _build_dataset(self):
        try:
            dataset = super()._build_dataset()
        except FieldKeyError as err:
            raise FieldKeyError(f"{err} (SCVIDataModule: {self._roles()})") from err
        self._categories = None
        self._lookups = {}
        return dataset

    def _roles(self) -> str:
        roles = {
            "batch_key": self.batch_key,
            "labels_key": self.labels_key,
            "categorical_covariate_keys": self.categorical_covariate_keys or None,
            "continuous_covariate_keys": self.continuous_covariate_keys or None,
        }
        return ", ".join(f"{k}={v!r}" for k, v in roles.items() if v is not None)

    def _scvi_categories(self) -> dict[str, np.ndarray]:
        """scvi's ``categorical_mapping`` of every categorical column, and code lookups."""
        if self._categories is not None:
            return self._categories
        if self.dataset is None:
            self.setup()
        keys = [k for k in (self.batch_key, self.labels_key) if k is not None]
        keys += self.categorical_covariate_keys
        categories, lookups = {}, {}
        for key in dict.fromkeys(keys):
            encoder = self.dataset.encoders.get(key)
            if encoder is not None:
                ours = np.asarray(encoder.categories, dtype=object)
                values = None
            else:
                column = pd.Series(self.dataset.obs[key])
                if column.dtype.kind not in "iub":
                    raise TypeError(
                        f"obs column {key!r} ({self._roles()}) holds {column.dtype} values, not "
                        "categories: scvi needs labels. Make it categorical: "
                        f"adata.obs[{key!r}] = adata.obs[{key!r}].astype(str).astype('category')."
                    )
                values = np.unique(column.to_numpy())
                ours = values.astype(object)
                values = torch.as_tensor(values.astype(np.int64))
            theirs = ours
            if key == self.labels_key and self.unlabeled_category is not None:
                theirs = np.asarray(
                    [c for c in ours if c != self.unlabeled_category] + [self.unlabeled_category],
                    dtype=object,
                )
            order = pd.Index(theirs).get_indexer(ours)  # our code -> scvi's code
            categories[key] = theirs
            lookups[key] = (values, torch.as_tensor(order, dtype=torch.int64))
        self._categories, self._lookups = categories, lookups
        return categories

    def _codes(self, key: str, values: torch.Tensor) -> torch.Tensor:
        """scvi's codes ``(B, 1)`` of a categorical field of a batch."""
        raw, order = self._lookups[key]
        if raw is not None:  # integer or bool column: its values are sorted into codes
            values = torch.searchsorted(raw.to(values.device), values.to(torch.int64))
        return order.to(values.device)[values.long()][:, None]

    # -- what scvi-tools reads -------------------------------------------------------------

    @property
    def n_obs(self) -> int:
        """Number of cells."""
        if self.dataset is None:
            self.setup()
        return len(self.dataset)

    @property
    def n_vars(self) -> int:
        """Number of genes."""
        if self.dataset is None:
            self.setup()
        return len(self.dataset.var_names)

    @property
    def n_batch(self) -> int:
        """Number of batches (``1`` without ``batch_key``)."""
        return 1 if self.batch_key is None else len(self._scvi_categories()[self.batch_key])

    @property
    def n_labels(self) -> int:
        """Number of labels, the unlabeled category included (``1`` without ``labels_key``)."""
        return 1 if self.labels_key is None else len(self._scvi_categories()[self.labels_key])

    @property
    def n_samples(self) -> int:
        """Number of samples (always ``0``: no ``sample_key``)."""
        return 0

    @property
    def n_cats_per_cov(self) -> list[int] | None:
        """Categories of each categorical covariate."""
        cats = self._scvi_categories()
        return [len(cats[k]) for k in self.categorical_covariate_keys] or None

    @property
    def n_continuous_cov(self) -> int:
        """Number of continuous covariates."""
        return len(self.continuous_covariate_keys)

    @property
    def batch_labels(self) -> np.ndarray | None:
        """The batches, in code order."""
        return None if self.batch_key is None else self._scvi_categories()[self.batch_key]

    @property
    def label_keys(self) -> np.ndarray | None:
        """The labels, in code order (the unlabeled category last)."""
        return None if self.labels_key is None else self._scvi_categories()[self.labels_key]

    @property
    def labels_(self) -> np.ndarray | None:
        """Every cell's label, as strings (read by ``SCANVI``)."""
        if self.labels_key is None:
            return None
        if self.dataset is None:
            self.setup()
        return pd.Series(self.dataset.obs[self.labels_key]).astype(str).to_numpy(dtype=object)

    @property
    def n_train(self) -> int:
        """Cells of the training split."""
        return len(self.splits["train"])

    @property
    def n_val(self) -> int:
        """Cells of the validation split."""
        return len(self.splits.get("val", ()))

    @property
    def train_idx(self) -> np.ndarray:
        """AnnData rows of the training split (scvi keeps them as ``model.train_indices``)."""
        return self.splits["train"]

    @property
    def val_idx(self) -> np.ndarray:
        """AnnData rows of the validation split."""
        return self.splits.get("val", np.empty(0, dtype=np.int64))

    @property
    def test_idx(self) -> np.ndarray:
        """AnnData rows of the test split."""
        return self.splits.get("test", np.empty(0, dtype=np.int64))

    @property
    def registry(self) -> dict[str, Any]:
        """The registry to build a model from, as in ``scvi.model.SCVI(registry=dm.registry)``.

        Laid out as the registry of scvi's own ``setup_anndata`` (``setup_args``,
        ``field_registries`` with their ``state_registry`` and ``summary_stats``), with
        ``setup_method_name`` ``"setup_datamodule"``, as scvi-tools expects of a data module.
        """
        cats = self._scvi_categories()
        empty = {"data_registry": {}, "state_registry": {}, "summary_stats": {}}
        if self.categorical_covariate_keys:
            keys = self.categorical_covariate_keys
            cat_covs = {
                "data_registry": {"attr_key": "_scvi_extra_categorical_covs", "attr_name": "obsm"},
                "state_registry": {
                    "field_keys": keys,
                    "mapping": {k: cats[k] for k in keys},
                    "n_cats_per_key": [len(cats[k]) for k in keys],
                },
                "summary_stats": {"n_extra_categorical_covs": len(keys)},
            }
        else:
            cat_covs = {**empty, "summary_stats": {"n_extra_categorical_covs": 0}}
        if self.continuous_covariate_keys:
            keys = self.continuous_covariate_keys
            cont_covs = {
                "data_registry": {"attr_key": "_scvi_extra_continuous_covs", "attr_name": "obsm"},
                "state_registry": {"columns": np.asarray(keys, dtype=object)},
                "summary_stats": {"n_extra_continuous_covs": len(keys)},
            }
        else:
            cont_covs = {**empty, "summary_stats": {"n_extra_continuous_covs": 0}}
        labels_state: dict[str, Any] = {
            "categorical_mapping": cats.get(self.labels_key, np.asarray([0])),
            "original_key": self.labels_key or "_scvi_labels",
        }
        if self.labels_key is not None:
            labels_state["unlabeled_category"] = self.unlabeled_category
        return {
            "scvi_version": self._scvi_version,
            "model_name": self.model_name,
            "setup_args": {
                "layer": self.fields.layer,
                "batch_key": self.batch_key,
                "labels_key": self.labels_key,
                "size_factor_key": None,
                "categorical_covariate_keys": self.categorical_covariate_keys or None,
                "continuous_covariate_keys": self.continuous_covariate_keys or None,
                **({"unlabeled_category": self.unlabeled_category} if self.labels_key else {}),
            },
            "field_registries": {
                "X": {
                    "data_registry": {
                        "attr_name": "X" if self.fields.layer is None else "layers",
                        "attr_key": self.fields.layer,
                    },
                    "state_registry": {
                        "n_obs": self.n_obs,
                        "n_vars": self.n_vars,
                        "column_names": np.asarray(self.dataset.var_names, dtype=object),
                    },
                    "summary_stats": {"n_vars": self.n_vars, "n_cells": self.n_obs},
                },
                "batch": {
                    "data_registry": {"attr_name": "obs", "attr_key": "_scvi_batch"},
                    "state_registry": {
                        "categorical_mapping": cats.get(self.batch_key, np.asarray([0])),
                        "original_key": self.batch_key or "_scvi_batch",
                    },
                    "summary_stats": {"n_batch": self.n_batch},
                },
                "labels": {
                    "data_registry": {"attr_name": "obs", "attr_key": "_scvi_labels"},
                    "state_registry": labels_state,
                    "summary_stats": {"n_labels": self.n_labels},
                },
                "size_factor": empty,
                "extra_categorical_covs": cat_covs,
                "extra_continuous_covs": cont_covs,
            },
            "setup_method_name": "setup_datamodule",
        }

    # -- batches under scvi's keys ---------------------------------------------------------

    def to_scvi(self, batch: dict[str, Any] | torch.Tensor) -> dict[str, torch.Tensor | None]:
        """A torch_adata batch under scvi's keys (see the class docstring).

        Parameters
        ----------
        batch
            A batch of this module's loaders.

        Returns
        -------
        dict
            ``"X"``, ``"batch"``, ``"labels"``, ``"extra_categorical_covs"``,
            ``"extra_continuous_covs"``, in that order (scvi-tools reads the order).
        """
        self._scvi_categories()
        if not isinstance(batch, dict):  # only X: the dataset yields a plain tensor
            batch = {"X": batch}
        x = batch["X"]
        n = len(x) if isinstance(x, torch.Tensor) else x.shape[0]
        zeros = torch.zeros((n, 1), dtype=torch.int64)
        cat = [self._codes(k, batch[k]) for k in self.categorical_covariate_keys]
        cont = [batch[k].float()[:, None] for k in self.continuous_covariate_keys]
        return {
            "X": x,
            "batch": zeros
            if self.batch_key is None
            else self._codes(self.batch_key, batch[self.batch_key]),
            "labels": zeros
            if self.labels_key is None
            else self._codes(self.labels_key, batch[self.labels_key]),
            "extra_categorical_covs": torch.cat(cat, dim=1) if cat else None,
            "extra_continuous_covs": torch.cat(cont, dim=1) if cont else None,
        }

    def _semisupervised(self, tensors: dict[str, Any]):
        """SCANVI's training input: ``(batch, its labelled cells)``.

        scvi's semi-supervised training plan takes a pair as (all cells, labelled cells) and
        computes its classification loss on the second; a batch without labelled cells is
        passed alone, with ``"labels"`` not third, which the plan reads as "no labelled cells".
        """
        if self.unlabeled_category is None:
            return tensors
        unlabeled = len(self._scvi_categories()[self.labels_key]) - 1
        keep = tensors["labels"][:, 0] != unlabeled
        if not bool(keep.any()):
            order = ("X", "labels", "batch", "extra_categorical_covs", "extra_continuous_covs")
            return {k: tensors[k] for k in order}
        labelled = {
            k: None if v is None else densify(v)[keep] if k == "X" else v[keep]
            for k, v in tensors.items()
        }
        return tensors, labelled

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Lightning's hook: batches under scvi's keys (:meth:`to_scvi`) for every loader.

        Parameters
        ----------
        batch
            A batch of this module's loaders.
        dataloader_idx
            Lightning's loader index (unused).
        """
        tensors = self.to_scvi(batch)
        trainer = getattr(self, "trainer", None)
        fitting = trainer is not None and (trainer.training or trainer.sanity_checking)
        fitting = fitting or (trainer is not None and trainer.validating)
        if self.model_name == "SCANVI" and fitting:
            return self._semisupervised(tensors)
        return tensors

    def inference_dataloader(
        self, split: str = "predict", device: torch.device | str | None = None
    ) -> _InferenceLoader:
        """Batches for a trained model's ``get_latent_representation(dataloader=...)``.

        Parameters
        ----------
        split
            The cells (default ``"predict"``: every cell, in AnnData row order).
        device
            The model's device (``model.device``); ``None`` keeps batches on the CPU.

        Returns
        -------
        Iterable
            Dense batches under scvi's keys, in row order, so the model's outputs line up with
            ``adata.obs_names[dm.splits[split]]``.
        """
        return _InferenceLoader(self, self.loader(split), device)


class _InferenceLoader:
    """A loader whose batches are under scvi's keys, dense, on ``device``."""

    def __init__(self, dm: SCVIDataModule, loader, device):
        self.dm, self.loader, self.device = dm, loader, device

    def __iter__(self) -> Iterator[dict[str, torch.Tensor | None]]:
        for batch in self.loader:
            tensors = self.dm.to_scvi(batch)
            yield {k: densify(v, self.device) for k, v in tensors.items()}

    def __len__(self) -> int:
        return len(self.loader)
