"""``AnnDataModule``: a ``LightningDataModule`` over an AnnData, an ``.h5ad`` file or a named dataset."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import anndata as ad
import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Subset

from . import samplers
from ._batch import collate, densify, for_fetcher
from ._fields import CategoryEncoder, UnknownCategoryError
from ._source import FieldKeyError
from .collection import SourceCollection, is_collection
from .dataset import AnnDataset, fetched_positions, positions, stage_pools
from .options import Fields, Loader, Split, TimeSampling, as_options
from .splits import fingerprint, make_splits
from .time_resolved import TimeResolvedAnnDataset

log = logging.getLogger("torch_adata")

SPLITS = ("train", "val", "test", "predict")

# Collections first: the command line (jsonargparse) tries the types in this order, and a
# string would otherwise take a list written in YAML as its text.
DataSource = (
    list[str | os.PathLike | ad.AnnData]
    | dict[str, str | os.PathLike | ad.AnnData]
    | str
    | os.PathLike
    | ad.AnnData
)


class SplitDataset(Subset):
    """The cells of one split of an :class:`~torch_adata.AnnDataModule`, as a torch ``Dataset``.

    Every loader of the data module reads one (``dm.loader("val").dataset``). Position ``i``
    is the cell at row ``indices[i]`` of the AnnData; batches have the keys and shapes of the
    wrapped dataset. Indexing is vectorised and checked like
    :class:`~torch_adata.AnnDataset`'s: ``split[positions]`` reads
    ``dataset[indices[positions]]`` in one gather.

    Parameters
    ----------
    dataset
        The dataset of every cell (an :class:`~torch_adata.AnnDataset` or
        :class:`~torch_adata.TimeResolvedAnnDataset`).
    indices
        Row positions of the split's cells in ``dataset``, in the order of the split.
    name
        The split's name: ``"train"``, ``"val"``, ``"test"`` or ``"predict"``.

    Attributes
    ----------
    dataset
        The dataset of every cell.
    indices
        The split's row positions (int64).
    name
        The split's name.
    """

    _getitems_passes_through = True  # see torch_adata._compat.fetcher_collate

    def __init__(self, dataset: AnnDataset, indices: Sequence[int] | np.ndarray, name: str):
        super().__init__(dataset, positions(indices, len(dataset)))
        self.name = name

    def __getitem__(self, index):
        stage_pools(self, index)
        if isinstance(index, (int, np.integer)) and not isinstance(index, bool):
            return self.dataset[int(self.indices[positions(index, len(self.indices))[0]])]
        return self.dataset.gather(self.indices[positions(index, len(self.indices))])

    def prefetch(self, indices) -> None:
        """Start reading the split's cells at ``indices`` into the page cache (see
        :meth:`AnnDataset.prefetch <torch_adata.AnnDataset.prefetch>`).

        Parameters
        ----------
        indices
            Positions in the split, as for ``split[indices]``.
        """
        self.dataset.prefetch(self.indices[positions(indices, len(self.indices))])

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        """The cells at ``indices`` as per-cell samples of one vectorised read (see
        :meth:`AnnDataset.__getitems__ <torch_adata.AnnDataset.__getitems__>`)."""
        stage_pools(self, indices)
        batch = self.dataset.gather(self.indices[fetched_positions(indices, len(self.indices))])
        return for_fetcher(batch, self.dataset._batch_keys)

    def __repr__(self) -> str:
        return f"SplitDataset {self.name!r}: {len(self)} of the {len(self.dataset)} cells"


_FIELDS = (
    "layer obs_keys obsm_keys X dtype obsm_dtype obs_dtypes encoders sparse return_index na"
).split()
_TIME = ("time_key", "sampling", "cells_per_time", "clone_key", "clones_per_batch")
_SPLIT = ("val_size", "test_size", "stratify_key", "holdout", "holdout_split", "split_indices")
_LOADER = "shuffle drop_last persistent_workers pin_memory sampler block_size pool_batches".split()


def _new_spelling(name: str) -> str:
    """Where a keyword of the 0.2 development data module went (for the TypeError)."""
    if name in _FIELDS:
        return f"fields=Fields({name}=...)"
    if name == "sampling":
        return "time=TimeSampling(time_key=..., mode=...)"
    if name in _TIME or name == "cells_per_clone":
        return f"time=TimeSampling(time_key=..., {name}=...)"
    if name == "time_kwargs":
        return "time=TimeSampling(time_key=..., start_time=..., multi_clone=...)"
    if name == "split_indices":
        return "split=Split(indices=...)"
    if name in _SPLIT:
        return f"split=Split({name}=...)"
    if name in _LOADER or name == "multiprocessing_context":
        return f"loader=Loader({name}=...)"
    return ""


class AnnDataModule(pl.LightningDataModule):
    """Loaders over an AnnData for ``Trainer.fit/validate/test/predict``.

    Parameters
    ----------
    source
        An AnnData (never modified), a path to an ``.h5ad`` file, or a dataset name from
        :func:`torch_adata.datasets.available_datasets` (e.g. ``"simulated"``, ``"larry"``).
        Or a collection read as one dataset (cells source after source, see
        :class:`~torch_adata.collection.SourceCollection`): a list of paths and/or AnnData
        objects, a mapping ``{name: path or AnnData}``, a folder (its ``*.h5ad`` files, sorted)
        or a glob such as ``"atlas/*.h5ad"``. Its genes are joined per ``Fields(join=...)``,
        and ``obs`` gains the column ``Fields(source_key=...)`` (default ``"source"``) naming
        each cell's source, usable in ``split=`` (e.g. ``Split(holdout={"source":
        ["donor3.h5ad"]})``) and ``obs_keys``.
    fields
        What each batch carries (:class:`~torch_adata.Fields`, or a dict of its fields).
    time
        For a time course: how batches are sampled (:class:`~torch_adata.TimeSampling`, or a
        dict); batches then come from :class:`~torch_adata.TimeResolvedAnnDataset`.
    split
        Which cells validate and test (:class:`~torch_adata.Split`, or a dict). Default: every
        cell trains, no validation or test loader.
    batch_size
        Cells per batch: every batch has ``batch_size`` cells except the last of an epoch (of
        each rank under DDP), unless ``loader.drop_last``. With ``time``, see
        :class:`~torch_adata.TimeSampling` for the sizes of each mode.
    num_workers
        DataLoader worker processes (``0``: load in the training process).
    loader
        The other DataLoader options (:class:`~torch_adata.Loader`, or a dict).
    seed
        Seeds the split, every sampler and the worker generators.
    load_kwargs
        Keyword arguments of the named dataset's loader (e.g. ``{"n_cells": 4000}``).
    backed
        For a path: load the file into memory (``False``, the default) or read rows from the
        file on demand (``True``, for files larger than memory). For a collection, the same
        for each of its files: ``False`` loads the matrices batched (not the whole AnnData)
        of every file into memory, ``True`` reads rows from the files; AnnData objects in
        the collection are read as they are.
    preprocess
        Keyword arguments of :func:`torch_adata.datasets.preprocess` to run after loading
        (e.g. ``{"n_pcs": 50}`` to batch ``obsm["X_pca"]``); ``None`` for none.
    **legacy
        Keywords of the former flat signature (``obs_keys=``, ``val_size=``, ...): refused.

    Raises
    ------
    TypeError
        A keyword of the former flat signature: the message gives its new spelling.

    Notes
    -----
    Distributed training: every sampler is a ``DistributedSampler`` (Lightning keeps it), and
    every rank gets the same number of batches; the exact rule, including the rare case where
    a few cells repeat, is in :mod:`torch_adata.samplers`.
    """

    def __init__(
        self,
        source: DataSource,
        *,
        fields: Fields | dict[str, Any] | None = None,
        time: TimeSampling | dict[str, Any] | None = None,
        split: Split | dict[str, Any] | None = None,
        batch_size: int = 256,
        num_workers: int = 0,
        loader: Loader | dict[str, Any] | None = None,
        seed: int = 0,
        load_kwargs: dict[str, Any] | None = None,
        backed: bool = False,
        preprocess: dict[str, Any] | None = None,
        **legacy: Any,
    ):
        super().__init__()
        if legacy:
            moves = [f"{name}= -> {_new_spelling(name)}" for name in legacy if _new_spelling(name)]
            unknown = [name for name in legacy if not _new_spelling(name)]
            raise TypeError(
                "AnnDataModule takes its options grouped: "
                + "; ".join(moves + [f"unknown keyword {name!r}" for name in unknown])
                + " (Fields, TimeSampling, Split and Loader are in torch_adata)."
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}.")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers!r}.")
        self.source = source
        self.load_kwargs = dict(load_kwargs or {})
        self.backed = backed
        self.preprocess = preprocess
        self.fields = as_options(fields, Fields, "fields")
        self.time = None if time is None else as_options(time, TimeSampling, "time")
        self.split = as_options(split, Split, "split")
        self.loader_options = as_options(loader, Loader, "loader")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self._checkpoint_encoders: dict[str, CategoryEncoder] = {}
        self._checkpoint_genes: list[str] | None = None
        self._adata: ad.AnnData | None = None
        self._data: ad.AnnData | str | None = None
        self.dataset: AnnDataset | None = None
        self._splits: dict[str, np.ndarray] | None = None
        self._fingerprint: dict[str, int | str] | None = None
        self._checkpoint_split: dict[str, Any] | None = None  # restored once data is loaded
        self._stage: str | None = None  # Lightning's stage between setup and teardown
        # Plain values only (loadable with weights_only=True); encoders travel in state_dict.
        in_memory = not _plain_source(source)
        hparams = {
            "source": None if in_memory else _plain_source(source),
            "fields": {k: v for k, v in asdict(self.fields).items() if k != "encoders"},
            "time": None if self.time is None else asdict(self.time),
            "split": asdict(self.split),
            "batch_size": batch_size,
            "num_workers": num_workers,
            "loader": asdict(self.loader_options),
            "seed": seed,
            "load_kwargs": self.load_kwargs,
            "backed": backed,
            "preprocess": preprocess,
        }
        self.save_hyperparameters(hparams, ignore=["source"] if in_memory else [], logger=False)

    @property
    def _given_encoders(self) -> dict[str, CategoryEncoder]:
        return self.fields.encoders

    # -- data -------------------------------------------------------------------------------

    def _is_registry_name(self) -> bool:
        return (
            isinstance(self.source, str)
            and not str(self.source).endswith(".h5ad")
            and not (os.path.exists(self.source))
            and not is_collection(self.source)
        )

    @property
    def is_collection(self) -> bool:
        """Whether the source is a collection (a list, mapping, folder or glob of sources)."""
        return is_collection(self.source)

    @property
    def collection(self) -> SourceCollection | None:
        """The dataset's :class:`~torch_adata.collection.SourceCollection` (``keys``,
        ``offsets``, ``paths``, ``locate``), or ``None`` for one AnnData or file."""
        if self.dataset is None:
            self.setup()
        source = self.dataset.source
        return source if isinstance(source, SourceCollection) else None

    def prepare_data(self) -> None:
        """Download a named dataset into its cache (Lightning calls this on one process only)."""
        if self._is_registry_name() and self.source != "simulated":
            from .datasets import load_dataset

            load_dataset(self.source, **self.load_kwargs)

    def _load(self) -> ad.AnnData | str | Any:
        if self.is_collection:
            if self.preprocess is not None:
                raise ValueError(
                    "preprocess= runs on one AnnData, and this data module reads a collection "
                    "of sources: preprocess each file first (e.g. with "
                    "torch_adata.datasets.preprocess and adata.write_h5ad), then pass the "
                    "preprocessed files."
                )
            return self.source  # each file opened by the dataset, backed or loaded
        if isinstance(self.source, ad.AnnData):
            adata = self.source
        elif self._is_registry_name():
            from .datasets import load_dataset

            adata = load_dataset(self.source, **self.load_kwargs)
        else:
            if self.backed and self.preprocess is None:
                return os.fspath(self.source)
            adata = ad.read_h5ad(self.source)
        if self.preprocess is not None:
            from .datasets import preprocess

            adata = preprocess(adata, **self.preprocess)  # returns a new AnnData
        return adata

    def setup(self, stage: str | None = None) -> None:
        """Build the dataset and the split once (every rank computes the same split).

        Parameters
        ----------
        stage
            Lightning's stage (``"fit"``, ``"validate"``, ``"test"``, ``"predict"``); every
            stage builds the same dataset and split. A checkpoint's split restored before
            (see :meth:`load_state_dict`) is applied here.

        Raises
        ------
        ValueError
            ``"validate"`` or ``"test"`` without a split of that name in ``split=Split(...)``.
        """
        self._stage = stage
        stage = getattr(stage, "value", stage)  # Lightning passes a TrainerFn (a str enum)
        needs = {"validate": "val", "test": "test"}.get(stage or "")
        if needs is not None and not self.split.has(needs):
            size = "val_size" if needs == "val" else "test_size"
            raise ValueError(
                f"trainer.{stage} needs a {needs} split, and this data module has none (the "
                f"default split holds nothing out): pass split=Split({size}=0.1) (or a "
                "holdout, or indices)."
            )
        if self.dataset is None:
            self._data = self._load()
            self._adata = self._data if isinstance(self._data, ad.AnnData) else None
            self.dataset = self._build_dataset()
            self._fingerprint = None
        if self._checkpoint_split is not None:
            self._restore_split()
        if self._splits is None:
            split = asdict(self.split)
            self._splits = make_splits(self.dataset.obs, seed=self.seed, **split)
            sizes = ", ".join(f"{k} {len(v)}" for k, v in self._splits.items())
            log.info("torch_adata splits (seed %d): %s cells", self.seed, sizes)

    def teardown(self, stage: str) -> None:
        """Lightning's end of a stage: the next checkpoint restored is no longer part of it.

        Parameters
        ----------
        stage
            The stage that ended.
        """
        self._stage = None

    def on_exception(self, exception: BaseException) -> None:
        """Lightning's end of a stage that raised: as :meth:`teardown`.

        Parameters
        ----------
        exception
            What the stage raised.
        """
        self._stage = None

    @property
    def data_fingerprint(self) -> dict[str, int | str]:
        """What identifies the cells of this module's data (their number and names, in order;
        for a collection also its sources' keys and sizes, in order).

        Computed by :func:`torch_adata.splits.fingerprint` and saved with the split in
        checkpoints; a checkpoint's split is restored only onto data with the same fingerprint.
        """
        if self.dataset is None:
            self.setup()
        if self._fingerprint is None:
            source = self.dataset.source
            sources = None
            if isinstance(source, SourceCollection):
                sources = list(zip(source.keys, np.diff(source.offsets).tolist(), strict=True))
            self._fingerprint = fingerprint(self.dataset.obs_names, sources)
        return self._fingerprint

    def _build_dataset(self) -> AnnDataset:
        encoders = dict(self._given_encoders)
        for key, restored in self._checkpoint_encoders.items():
            if key not in self.fields.obs_keys:
                continue  # kept in self.encoders, to decode a model's outputs
            if key in encoders and encoders[key] != restored:
                raise ValueError(
                    f"encoders= gives obs column {key!r} other categories than the checkpoint "
                    f"the model was trained with ({encoders[key]} vs {restored}). Drop it from "
                    "encoders= to use the checkpoint's codes."
                )
            encoders[key] = restored
        options = {**self.fields.dataset_kwargs(), "encoders": encoders, "backed": self.backed}
        if options["var_names"] is None and self.fields.X:
            options["var_names"] = self._checkpoint_genes  # the genes the model was trained on
        try:
            if self.time is None:
                return AnnDataset(self._data, **options)
            return TimeResolvedAnnDataset(self._data, **self.time.dataset_kwargs(), **options)
        except UnknownCategoryError as err:
            if err.column not in self._checkpoint_encoders:
                raise
            raise UnknownCategoryError(
                f"The data has labels the checkpoint's encoders do not know, so the model "
                f"cannot be given their codes. {err}",
                column=err.column,
                labels=err.labels,
            ) from err

    @property
    def encoders(self) -> dict[str, CategoryEncoder]:
        """The category encoders of the obs columns, keyed by column.

        Those of the dataset once :meth:`setup` has run, and those restored from a checkpoint
        (also for columns this module does not batch, so a model's predicted codes decode).
        """
        encoders = {**self._given_encoders, **self._checkpoint_encoders}
        if self.dataset is not None:
            encoders.update(self.dataset.encoders)
        return encoders

    def decode(self, key: str, codes) -> np.ndarray:
        """Turn int codes of obs column ``key`` back into labels (see :attr:`encoders`).

        Parameters
        ----------
        key
            An obs column with an encoder, e.g. the label column the model was trained on.
        codes
            Codes from a batch or a model's predictions (tensor, array, list or pandas
            column). Missing codes (``-1``, NaN, ``<NA>``, ``None``: cells without a
            prediction) decode to ``None``.

        Returns
        -------
        numpy.ndarray
            The labels (object array), ``None`` where a code is missing.
        """
        encoders = self.encoders
        if key not in encoders:
            raise FieldKeyError(
                f"No encoder for {key!r}; encoders exist for {sorted(encoders)}. Add the "
                "column to fields=Fields(obs_keys=[...]), or load a checkpoint that has it."
            )
        if isinstance(codes, torch.Tensor):
            codes = codes.detach().cpu().numpy()
        missing = pd.isna(pd.Series(np.asarray(codes, dtype=object).reshape(-1))).to_numpy()
        if missing.any():
            filled = np.asarray(codes, dtype=object).reshape(-1).copy()
            filled[missing] = -1
            codes = filled.astype(np.int64).reshape(np.shape(codes))
        return encoders[key].decode(codes)

    @property
    def adata(self) -> ad.AnnData | None:
        """The AnnData the batches come from (``None`` for a backed path before/without load)."""
        return (
            self._adata
            if self._adata is not None
            else (self.dataset.adata if self.dataset else None)
        )

    @property
    def splits(self) -> dict[str, np.ndarray]:
        """``{"train", "val", "test", "predict"}`` -> sorted AnnData row positions."""
        if self._splits is None:
            self.setup()
        return self._splits

    # -- loaders ----------------------------------------------------------------------------

    def _sampler(self, rows: np.ndarray, train: bool, dataset: SplitDataset | None = None):
        """The batch sampler of a split: yields positions into ``rows`` (its SplitDataset,
        ``dataset``, which block shuffling reads ahead)."""
        n = len(rows)
        common = {"seed": self.seed}
        options = self.loader_options
        if isinstance(self.dataset, TimeResolvedAnnDataset) and train:
            return self.dataset.batch_sampler(
                indices=rows,
                batch_size=self.batch_size,
                cells_per_time=self.time.cells_per_time,
                clones_per_batch=self.time.clones_per_batch,
                cells_per_clone=self.time.cells_per_clone,
                shuffle=options.shuffle,
                drop_last=options.drop_last,
                **common,
            )
        if train and options.sampler == "block":
            boundaries = None
            source = self.dataset.source
            if isinstance(source, SourceCollection):
                # where each source starts among the split's (sorted) rows: blocks of the
                # split's positions never span two files
                boundaries = np.searchsorted(rows, source.offsets)
            return samplers.BlockShuffleSampler(
                n,
                self.batch_size,
                block_size=options.block_size,
                pool_batches=options.pool_batches,
                boundaries=boundaries,
                read_ahead=dataset,
                drop_last=options.drop_last,
                **common,
            )
        return samplers.UniformBatchSampler(
            n,
            self.batch_size,
            shuffle=train and options.shuffle,
            drop_last=train and options.drop_last,
            **common,
        )

    def loader(self, split: str) -> DataLoader:
        """The DataLoader of ``split`` (``"train"``, ``"val"``, ``"test"`` or ``"predict"``).

        Parameters
        ----------
        split
            Which split. ``"train"`` is shuffled (per ``loader.sampler`` or ``time.mode``);
            the others are read in row order.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
        rows = self.splits[split]
        if len(rows) == 0:
            size = "val_size" if split == "val" else "test_size"
            raise ValueError(
                f"The {split} split is empty: ask for one with split=Split({size}=0.1) (or a "
                "holdout, or indices)."
            )
        dataset = SplitDataset(self.dataset, rows, split)
        generator = torch.Generator().manual_seed(self.seed)
        options, workers = self.loader_options, self.num_workers
        return DataLoader(
            dataset,
            sampler=self._sampler(rows, split == "train", dataset),
            batch_size=None,
            collate_fn=collate,
            generator=generator,
            num_workers=workers,
            pin_memory=options.pin_memory,
            persistent_workers=workers > 0 and options.persistent_workers is not False,
            multiprocessing_context=options.multiprocessing_context if workers > 0 else None,
        )

    def train_dataloader(self) -> DataLoader:
        """The training loader: ``loader("train")``."""
        return self.loader("train")

    # Lightning runs (and warns about) a loop whose loader method the data module has. A
    # split that the options leave empty therefore has no loader method (the property is
    # None), so a model without validation_step meets no "val_dataloader but no
    # validation_step" warning unless a validation split was asked for.
    @property
    def val_dataloader(self):
        """The validation loader method, ``loader("val")``; ``None`` without a val split."""
        return self._val_dataloader if self.split.has("val") else None

    @property
    def test_dataloader(self):
        """The test loader method, ``loader("test")``; ``None`` without a test split."""
        return self._test_dataloader if self.split.has("test") else None

    # Likewise, the hook exists only with Fields(densify=True): a model's own
    # on_after_batch_transfer then runs without Lightning's "overridden in LightningModule but
    # a LightningDataModule was passed" warning.
    @property
    def on_after_batch_transfer(self):
        """Densify batches on the device (:func:`~torch_adata.densify`); ``None`` unless
        ``Fields(sparse=True, densify=True)``."""
        return self._densify if self.fields.densify and self.fields.sparse else None

    @staticmethod
    def _densify(batch: Any, dataloader_idx: int) -> Any:
        return densify(batch)

    def _val_dataloader(self) -> DataLoader:
        return self.loader("val")

    def _test_dataloader(self) -> DataLoader:
        return self.loader("test")

    def predict_dataloader(self) -> DataLoader:
        """The prediction loader over every cell, in row order: ``loader("predict")``."""
        return self.loader("predict")

    # -- checkpoints ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The split, seed and label encoders, saved by Lightning in every checkpoint."""
        state: dict[str, Any] = {"seed": self.seed}
        if self._splits is not None:
            state["splits"] = {k: v.tolist() for k, v in self._splits.items()}
            state["data"] = dict(self.data_fingerprint)
        elif self._checkpoint_split is not None:  # restored before setup: pass it on
            state.update(self._checkpoint_split)
        encoders = self.encoders
        if encoders:
            state["encoders"] = {k: e.to_dict() for k, e in encoders.items()}
        if self.dataset is not None and "X" in self.dataset.fields:
            state["var_names"] = [str(g) for g in self.dataset.var_names]
        elif self._checkpoint_genes is not None:
            state["var_names"] = list(self._checkpoint_genes)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the split and the label encoders of a checkpoint.

        Lightning calls this with ``ckpt_path=`` (after :meth:`setup`). The genes are matched
        by name to those the model was trained on (unless ``Fields(var_names=...)`` names
        them): data whose genes are stored in another order is reordered, and genes it lacks
        raise unless ``Fields(fill_missing=True)``. The label encoders are
        always restored: a model resumed or used for prediction, even on another file, gets
        each label with the code it was trained on (the dataset's categorical fields are
        re-encoded with the checkpoint's encoders). The split is restored only onto the data
        it was drawn on (same cells in the same order, see :attr:`data_fingerprint`), so a
        resumed run trains on the same cells. On other data, prediction covers every cell of
        that data, and resuming ``fit``, ``validate`` or ``test`` raises unless
        ``split=Split(indices=...)`` gives that data's split. Called by hand before ``setup``, it takes
        effect there.

        Parameters
        ----------
        state_dict
            What :meth:`state_dict` returned (Lightning passes the checkpoint's entry).

        Raises
        ------
        ValueError
            ``fit``, ``validate`` or ``test`` with a checkpoint whose split was drawn on other
            cells (and no ``Split(indices=...)``).
        UnknownCategoryError
            The data has labels the checkpoint's encoders do not know.

        Warns
        -----
        UserWarning
            Called outside a Lightning stage with a checkpoint of other cells: its split is
            not applied.
        """
        rebuild = False
        if "var_names" in state_dict and self.fields.var_names is None:
            self._checkpoint_genes = list(state_dict["var_names"])
            rebuild = (
                self.dataset is not None
                and "X" in self.dataset.fields
                and list(self.dataset.var_names) != self._checkpoint_genes
            )
        if "encoders" in state_dict:
            self._checkpoint_encoders = {
                k: CategoryEncoder.from_dict(v) for k, v in state_dict["encoders"].items()
            }
            rebuild = rebuild or (
                self.dataset is not None
                and any(
                    self.dataset.encoders.get(k, e) != e
                    for k, e in self._checkpoint_encoders.items()
                )
            )
        if rebuild:
            with warnings.catch_warnings():  # reported when the dataset was first built
                warnings.filterwarnings("ignore", message=".*single time point")
                self.dataset = self._build_dataset()
        self.seed = state_dict.get("seed", self.seed)
        if "splits" in state_dict:
            self._checkpoint_split = {"splits": state_dict["splits"]}
            if "data" in state_dict:
                self._checkpoint_split["data"] = state_dict["data"]
            if self.dataset is not None:
                self._restore_split()

    def _restore_split(self) -> None:
        """Apply the checkpoint's split if it was drawn on this data; otherwise see the stage."""
        saved, self._checkpoint_split = self._checkpoint_split, None
        splits = {k: np.asarray(v, dtype=np.int64) for k, v in saved["splits"].items()}
        n = len(self.dataset)
        drawn_on = saved.get("data")
        if drawn_on is None:  # a checkpoint without a fingerprint: trusted when it fits
            same = all(len(v) == 0 or v.max() < n for v in splits.values())
            theirs = f"more cells than the {n} this data module holds"
        else:
            ours = self.data_fingerprint
            # both ways: one AnnData vs a collection of the same cells differ too
            same = all(drawn_on.get(k) == ours.get(k) for k in {*ours, *drawn_on})
            if drawn_on.get("n_obs") == n and drawn_on.get("sources_sha256") != ours.get(
                "sources_sha256"
            ):
                theirs = (
                    f"other sources ({n} cells too, but "
                    + (
                        f"a collection of {drawn_on['n_sources']} sources with other names, "
                        "order or sizes"
                        if "n_sources" in drawn_on
                        else "one AnnData"
                    )
                    + (
                        f"; this data is a collection of {ours['n_sources']} sources)"
                        if "n_sources" in ours
                        else "; this data is one AnnData)"
                    )
                )
            elif drawn_on.get("n_obs") == n:
                theirs = f"other cells ({n} cells too, but other obs_names or another order)"
            else:
                theirs = f"other cells ({drawn_on.get('n_obs')} cells; this data has {n})"
        if same:
            splits["predict"] = np.arange(n, dtype=np.int64)  # every cell, whatever was saved
            self._splits = splits
            return
        if self._stage == "predict":
            log.info("torch_adata: the checkpoint's split is of %s; predicting every cell.", theirs)
            return
        if self.split.indices is not None:
            log.info("torch_adata: the checkpoint's split is of %s; using Split(indices=).", theirs)
            return
        message = (
            f"The checkpoint's train/val/test split was drawn on {theirs}, so its row "
            "positions do not apply to this data. Fix: "
            "resume, validate or test with the same AnnData as the checkpoint (same cells in "
            "the same order), or pass split=Split(indices={'train': [...], 'val': [...], "
            "'test': [...]}) to choose this data's split explicitly. Predicting on new data "
            "needs neither: trainer.predict(..., ckpt_path=) covers every cell."
        )
        if self._stage in ("fit", "validate", "test"):
            raise ValueError(message)
        warnings.warn(
            f"{message} The split was not applied: train/val/test are this data's own split "
            f"(seed {self.seed}).",
            UserWarning,
            stacklevel=3,
        )

    # -- results back to the AnnData --------------------------------------------------------

    def prediction_arrays(
        self, predictions: Sequence[Any], *, split: str = "predict"
    ) -> np.ndarray | tuple[np.ndarray, ...] | dict[str, np.ndarray]:
        """``trainer.predict`` outputs as numpy arrays, one row per cell of ``split``.

        Rows follow ``dm.splits[split]`` (AnnData order), so with the default split row ``i``
        is cell ``adata.obs_names[i]``.

        Parameters
        ----------
        predictions
            What ``trainer.predict(model, datamodule=dm)`` returned: per batch, a tensor, a
            tuple of tensors or a dict of tensors (the same structure every batch), in loader
            order (single process).
        split
            The split that was predicted (default ``"predict"``: every cell).

        Returns
        -------
        numpy.ndarray or tuple or dict
            The outputs concatenated over batches, in the structure of one batch's output.
        """
        rows = self._loader_rows(split)
        order = np.argsort(rows, kind="stable")
        outputs = _concatenate(predictions)
        items = outputs.items() if isinstance(outputs, dict) else enumerate(_as_tuple(outputs))
        for name, values in items:
            if len(values) != len(rows):
                what = f"Output {name!r} has" if isinstance(outputs, dict) else "There are"
                raise ValueError(
                    f"{what} {len(values)} predictions for {len(rows)} cells of the {split} "
                    "split: predict with this module's predict loader, in one process."
                )
        if isinstance(outputs, dict):
            return {name: values[order] for name, values in outputs.items()}
        if isinstance(outputs, tuple):
            return tuple(values[order] for values in outputs)
        return outputs[order]

    def write_predictions(
        self,
        predictions: Sequence[Any],
        key: str | Sequence[str] | Mapping[str, str] | None = None,
        *,
        labels: str | Mapping[str, str] | None = None,
        adata: ad.AnnData | Mapping[str, ad.AnnData] | None = None,
        split: str = "predict",
        per_source: bool = False,
    ) -> ad.AnnData | dict[str, ad.AnnData]:
        """Put ``trainer.predict`` outputs into a copy of the AnnData, in the original cell order.

        Where each output goes (``key``), by what ``predict_step`` returns:

        - a tensor: ``key`` is its name (a string, required);
        - a tuple of tensors: ``key`` is a sequence of names, one per element;
        - a dict of tensors: ``key=None`` writes every entry under its own name;
          ``{output name: key}`` writes only the entries it names, under those keys. A string
          ``key`` is refused (it cannot name several outputs).

        A 1-D output becomes an obs column, one of more dimensions an obsm entry. Cells outside
        ``split`` have no prediction: NaN in float columns and obsm entries, ``<NA>`` in
        integer and boolean columns, a missing category in label columns.

        Parameters
        ----------
        predictions
            What ``trainer.predict(model, datamodule=dm)`` returned (see
            :meth:`prediction_arrays`).
        key
            Names of the outputs in the AnnData (see above).
        labels
            Class predictions to write as labels: ``{written key: obs column of the labels}``
            (a string: the labels of the one output written). A 1-D output holds label codes
            and becomes a categorical obs column with the label names (the categories of
            :attr:`encoders`); a 2-D output holds per-class scores (e.g. probabilities), kept in
            ``obsm[key]``, and its arg-max label is written to ``obs[key]`` as well.
        adata
            Target AnnData (default: a copy of the module's AnnData). It is modified and
            returned. For a collection, the default is one AnnData of every cell in the
            collection's order (source after source): the sources' ``obs`` concatenated with
            the source column (``Fields(source_key=...)``, default ``"source"``), the
            dataset's genes as ``var``, and no ``X`` (the matrices stay in the sources); with
            ``per_source=True``, ``{source key: AnnData}`` to write into instead.
        split
            The split that was predicted (default ``"predict"``: every cell).
        per_source
            For a collection: write each source's cells into that source's own AnnData and
            return ``{source key: AnnData}`` (in the collection's order). Each is a copy of
            the source given as an AnnData in memory; for a file, the file opened again as
            this module reads it: with ``backed=True`` an AnnData opened with
            ``backed="r"`` (its ``X`` stays on disk, the predictions go into its ``obs`` and
            ``obsm`` in memory, and the file is never modified; ``adata.write_h5ad(new
            path)`` saves a copy), with ``backed=False`` the whole file read into memory.
            ``adata=`` may instead map each key to an AnnData of that source's cells (e.g.
            of its ``obs`` alone) to write into.

        Returns
        -------
        anndata.AnnData or dict
            The AnnData with the predictions; with ``per_source=True``, ``{source key:
            AnnData}``.

        Raises
        ------
        TypeError
            ``key`` of the wrong kind for the outputs (the message says which kind).
        ValueError
            No predictions, a count that does not match the split, or label codes or score
            columns that do not fit the label column's categories; ``per_source=True``
            without a collection, or ``adata=`` that does not match the sources.
        """
        collection = self.collection
        if per_source and collection is None:
            raise ValueError(
                "per_source=True writes each source of a collection into its own AnnData; "
                "this data module reads one AnnData: drop per_source."
            )
        if isinstance(adata, Mapping) and not per_source:
            raise TypeError(
                "adata= maps sources to AnnData objects, which only per_source=True writes "
                "into: pass per_source=True, or one AnnData of every cell."
            )
        if len(predictions) == 0:
            raise ValueError("No predictions to write (trainer.predict returned nothing).")
        arrays = self.prediction_arrays(predictions, split=split)
        outputs = _name_outputs(arrays, key)
        if isinstance(labels, str):
            if len(outputs) != 1:
                raise TypeError(
                    f"labels={labels!r} names one label column, but {len(outputs)} outputs are "
                    f"written ({list(outputs)}): pass labels={{written key: label column}}."
                )
            labels = {next(iter(outputs)): labels}
        labels = dict(labels or {})
        unknown = sorted(set(labels) - set(outputs))
        if unknown:
            raise KeyError(
                f"labels= names {unknown}, which are not written; the outputs are written as "
                f"{list(outputs)}."
            )
        if per_source:
            targets = self._source_targets(collection, adata)
            adata = None
        if adata is None and collection is not None:
            adata = self._collection_frame(collection)
        elif adata is None:
            if self.adata is None:
                raise ValueError("This module reads a backed file: pass adata= to write into.")
            adata = self.adata.copy()
        rows = self.splits[split]
        for name, values in outputs.items():
            if name in labels:
                self._write_labels(adata, name, values, labels[name], rows)
            elif values.ndim == 1:
                adata.obs[name] = _missing_elsewhere(values, rows, adata.n_obs)
            else:
                adata.obsm[name] = _missing_elsewhere(values, rows, adata.n_obs)
        if per_source:
            return _split_by_source(adata, list(outputs), collection, targets)
        return adata

    def _collection_frame(self, collection: SourceCollection) -> ad.AnnData:
        """An AnnData of every cell of the collection, in order: obs (with the source
        column) and var, no matrix."""
        var = pd.DataFrame(index=pd.Index(self.dataset.var_names).astype(str))
        with warnings.catch_warnings():  # cell names may repeat across sources
            warnings.filterwarnings("ignore", message=".*names are not unique")
            return ad.AnnData(obs=collection.obs.copy(), var=var)

    def _source_copy(self, source) -> ad.AnnData:
        """A new AnnData of one source's cells, to write its predictions into."""
        given = source.adata
        if given is None:  # a path: read backed or into memory, as this module reads it
            return ad.read_h5ad(source.path, backed="r" if self.backed else None)
        if not given.isbacked:
            return given.copy()
        if given.is_view:
            return given.to_memory()
        return ad.read_h5ad(given.filename, backed="r")

    def _source_targets(
        self, collection: SourceCollection, given: Mapping[str, ad.AnnData] | ad.AnnData | None
    ) -> dict[str, ad.AnnData]:
        """Where ``per_source=True`` writes each source's cells (see write_predictions)."""
        keys, sizes = collection.keys, np.diff(collection.offsets)
        if given is not None:
            if not isinstance(given, Mapping):
                raise TypeError(
                    "With per_source=True, adata= maps each source key to the AnnData to write "
                    f"its cells into ({keys[:5]}...), not one AnnData."
                )
            if list(given) != list(keys) and set(given) != set(keys):
                raise ValueError(
                    f"adata= has the sources {sorted(given)[:10]} but the collection has "
                    f"{keys[:10]}: give one AnnData per source key."
                )
            targets = {k: given[k] for k in keys}
        else:
            targets = {
                key: self._source_copy(source)
                for key, source in zip(keys, collection.sources, strict=True)
            }
        for key, size in zip(keys, sizes, strict=True):
            if targets[key].n_obs != size:
                raise ValueError(
                    f"adata[{key!r}] has {targets[key].n_obs} cells but source {key!r} has "
                    f"{size}: pass that source's AnnData (same cells, same order)."
                )
        return targets

    def _write_labels(self, adata, name: str, values: np.ndarray, column: str, rows) -> None:
        """Label codes (1-D) or per-class scores (2-D) of obs ``column`` as a categorical."""
        encoder = self.encoders.get(column)
        if encoder is None:
            raise FieldKeyError(
                f"labels: no encoder for obs column {column!r}; encoders exist for "
                f"{sorted(self.encoders)}. Add it to Fields(obs_keys=[...])."
            )
        n_classes = len(encoder.categories)
        if values.ndim == 2:
            if values.shape[1] != n_classes:
                raise ValueError(
                    f"Output {name!r} has {values.shape[1]} columns but {column!r} has "
                    f"{n_classes} labels: per-class scores need one column per label."
                )
            adata.obsm[name] = _missing_elsewhere(values, rows, adata.n_obs)
            values = values.argmax(axis=1)
        if values.ndim != 1 or values.dtype.kind not in "iu":
            raise ValueError(
                f"Output {name!r} written with labels of {column!r} must be integer label codes "
                f"(1-D) or per-class scores (2-D); got {values.dtype} of shape {values.shape}."
            )
        if len(values) and (values.min() < 0 or values.max() >= n_classes):
            raise ValueError(
                f"Output {name!r} has codes {values.min()}..{values.max()}, outside the "
                f"{n_classes} labels of {column!r} (0..{n_classes - 1})."
            )
        codes = np.full(adata.n_obs, -1, dtype=np.int64)
        codes[rows] = values
        adata.obs[name] = pd.Categorical.from_codes(codes, categories=encoder.categories)

    def _loader_rows(self, split: str) -> np.ndarray:
        """AnnData rows in the order the (unshuffled) loader of ``split`` yields them."""
        loader_sampler = self._sampler(self.splits[split], train=False)
        order = np.concatenate(list(iter(loader_sampler)))
        return self.splits[split][order]


def _split_by_source(
    written: ad.AnnData,
    names: list[str],
    collection: SourceCollection,
    targets: dict[str, ad.AnnData],
) -> dict[str, ad.AnnData]:
    """Copy the obs columns and obsm entries ``names`` of ``written`` (every cell of the
    collection) into each source's target, that source's rows."""
    offsets = collection.offsets
    for s, target in enumerate(targets.values()):
        rows = slice(int(offsets[s]), int(offsets[s + 1]))
        for name in names:
            if name in written.obsm:
                target.obsm[name] = np.asarray(written.obsm[name][rows])
            if name in written.obs.columns:  # dtype kept (categorical labels, Int64 with <NA>)
                target.obs[name] = written.obs[name].iloc[rows].set_axis(target.obs.index)
    return targets


def _plain_source(source) -> str | list[str] | dict[str, str] | None:
    """``source`` as plain values for the saved hyperparameters (a path, or a list or dict of
    paths), or ``None`` when it holds AnnData objects (those are not saved)."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, Mapping):
        values = {str(k): _plain_source(v) for k, v in source.items()}
        plain = all(isinstance(v, str) for v in values.values())
        return values if plain and values else None
    if isinstance(source, (list, tuple)):
        items = [_plain_source(v) for v in source]
        return items if items and all(isinstance(v, str) for v in items) else None
    return None


def _concatenate(predictions: Sequence[Any]):
    """Per-batch outputs (tensor, tuple or dict of tensors) concatenated into numpy arrays."""
    if len(predictions) == 0:
        raise ValueError("No predictions (trainer.predict returned nothing).")
    first = predictions[0]
    if isinstance(first, Mapping):
        return {name: _cat([p[name] for p in predictions], name) for name in first}
    if isinstance(first, (tuple, list)):
        return tuple(_cat([p[i] for p in predictions], i) for i in range(len(first)))
    return _cat(list(predictions), None)


def _cat(pieces: list, name) -> np.ndarray:
    if not all(isinstance(p, torch.Tensor) for p in pieces):
        kinds = sorted({type(p).__name__ for p in pieces})
        where = "" if name is None else f" (output {name!r})"
        raise TypeError(
            f"predict_step must return a tensor, a tuple of tensors or a dict of tensors; "
            f"got {kinds}{where}."
        )
    values = torch.cat([p.detach().cpu() for p in pieces])
    if values.dtype in (torch.float16, torch.bfloat16):
        values = values.float()
    return values.numpy()


def _as_tuple(outputs) -> tuple:
    return outputs if isinstance(outputs, tuple) else (outputs,)


def _name_outputs(arrays, key) -> dict[str, np.ndarray]:
    """``{AnnData key: array}`` from the outputs and the ``key`` rule of write_predictions."""
    if isinstance(arrays, dict):
        if key is None:
            return dict(arrays)
        if isinstance(key, Mapping):
            missing = sorted(set(key) - set(arrays))
            if missing:
                raise KeyError(
                    f"key= names outputs {missing} that predict_step does not return; it "
                    f"returns {list(arrays)}."
                )
            return {key[name]: arrays[name] for name in key}
        raise TypeError(
            f"predict_step returns a dict ({list(arrays)}), so key={key!r} cannot name it: pass "
            "key=None to write every entry under its own name, or {output name: key}."
        )
    if isinstance(arrays, tuple):
        if isinstance(key, str) or not isinstance(key, Sequence) or len(key) != len(arrays):
            raise TypeError(
                f"predict_step returns a tuple of {len(arrays)} tensors: pass key= a list of "
                f"{len(arrays)} names, one per element (got {key!r})."
            )
        if len(set(key)) != len(key):
            raise ValueError(f"key= has repeated names: {list(key)}.")
        return dict(zip(key, arrays, strict=True))
    if not isinstance(key, str):
        raise TypeError(
            f"predict_step returns a tensor: pass key= a string, the obs column (1-D output) "
            f"or obsm key (2-D) to write it to (got {key!r})."
        )
    return {key: arrays}


def _missing_elsewhere(values: np.ndarray, rows: np.ndarray, n_obs: int):
    """``values`` at ``rows`` of an ``n_obs``-long column or block, missing elsewhere."""
    if len(rows) == n_obs:
        return values
    if values.ndim == 1 and values.dtype.kind in "iub":
        column = pd.array([pd.NA] * n_obs, dtype="boolean" if values.dtype.kind == "b" else "Int64")
        column[rows] = values
        return column
    dtype = values.dtype if values.dtype.kind in "fc" else np.float64
    block = np.full((n_obs, *values.shape[1:]), np.nan, dtype=dtype)
    block[rows] = values
    return block
