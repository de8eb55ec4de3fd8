"""``AnnDataModule``: a ``LightningDataModule`` over an AnnData, an ``.h5ad`` file or a named dataset."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import anndata as ad
import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Subset

from . import samplers
from ._batch import collate
from ._fields import CategoryEncoder, UnknownCategoryError
from ._source import FieldKeyError
from .dataset import AnnDataset, positions
from .splits import fingerprint, make_splits
from .time_resolved import TimeResolvedAnnDataset

log = logging.getLogger("torch_adata")

SPLITS = ("train", "val", "test", "predict")


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

    def __init__(self, dataset: AnnDataset, indices: Sequence[int] | np.ndarray, name: str):
        super().__init__(dataset, positions(indices, len(dataset)))
        self.name = name

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)) and not isinstance(index, bool):
            return self.dataset[int(self.indices[positions(index, len(self.indices))[0]])]
        return self.dataset._gather(self.indices[positions(index, len(self.indices))])

    def __getitems__(self, indices: Sequence[int]):
        """Fetch a whole batch in one vectorised call (used by ``DataLoader``)."""
        return self.dataset._gather(self.indices[positions(indices, len(self.indices))])

    def __repr__(self) -> str:
        return f"SplitDataset {self.name!r}: {len(self)} of the {len(self.dataset)} cells"


class AnnDataModule(pl.LightningDataModule):
    """Loaders over an AnnData for ``Trainer.fit/validate/test/predict``.

    Parameters
    ----------
    source
        An AnnData (never modified), a path to an ``.h5ad`` file, or a dataset name from
        :func:`torch_adata.datasets.available_datasets` (``"simulated"``, ``"larry"``).
    load_kwargs
        Keyword arguments of the named dataset's loader (e.g. ``{"n_cells": 4000}``).
    backed
        For a path: load the file into memory (``False``, the default: training reads every
        cell many times, fastest from memory) or read rows from the file on demand (``True``,
        for files larger than memory). Note that :class:`~torch_adata.AnnDataset` defaults
        to reading a path on demand instead.
    preprocess
        Keyword arguments of :func:`torch_adata.datasets.preprocess` to run after loading
        (e.g. ``{"n_pcs": 50}`` to batch ``obsm["X_pca"]``); ``None`` for none.
    layer, obs_keys, obsm_keys, X, sparse, return_index, na
        What each batch carries: see :class:`~torch_adata.AnnDataset`.
    dtype, obsm_dtype, obs_dtypes
        dtypes of the expression field, of obsm fields, and per obs column: see
        :class:`~torch_adata.AnnDataset`.
    encoders
        Category encoders to reuse, keyed by obs column (e.g. ``AnnDataset(...).encoders``);
        other categorical columns get one fitted on this data. A checkpoint's encoders
        (restored by :meth:`load_state_dict`) replace these.
    time_key
        obs column of time points: batches then come from
        :class:`~torch_adata.TimeResolvedAnnDataset`, sampled per ``sampling`` in training.
    sampling
        With ``time_key``: ``"populations"``, ``"initial"`` or ``"lineage"``.
    cells_per_time, clone_key, clones_per_batch, cells_per_clone, time_kwargs
        Options of the time-resolved dataset and its samplers.
    val_size, test_size, stratify_key, holdout, holdout_split, split_indices
        The split: see :func:`torch_adata.splits.make_splits`. Predict covers every cell.
    batch_size, shuffle, drop_last, num_workers, persistent_workers, pin_memory
        DataLoader options. Shuffle and drop_last apply to training only.
        ``persistent_workers`` defaults to ``True`` whenever there are workers: they then
        start once, not every epoch (each start forks, re-maps the batch buffers and, under
        ``spawn``, re-reads the file's layout).
    sampler
        Training order of plain datasets: ``"uniform"`` (default) or ``"block"``
        (:class:`~torch_adata.samplers.BlockShuffleSampler`, faster on disk, less diverse).
    block_size, pool_batches
        Options of the block sampler.
    multiprocessing_context
        ``"fork"``, ``"spawn"`` or ``None`` (the platform default) for worker processes.
    seed
        Seeds the split, every sampler and the worker generators.

    Notes
    -----
    Distributed training: every sampler is a ``DistributedSampler`` (Lightning keeps it). Each
    epoch, every cell of the train split is seen exactly once across ranks, and every rank gets
    the same number of batches: batches are cut a little smaller rather than padded with repeats
    (``drop_last=True`` drops the remainder instead, for fixed batch sizes).
    """

    def __init__(
        self,
        source: str | os.PathLike | ad.AnnData = "simulated",
        *,
        load_kwargs: dict[str, Any] | None = None,
        backed: bool = False,
        preprocess: dict[str, Any] | None = None,
        layer: str | None = None,
        obs_keys: Sequence[str] = (),
        obsm_keys: Sequence[str] = (),
        X: bool = True,
        dtype: torch.dtype = torch.float32,
        obsm_dtype: torch.dtype = torch.float32,
        obs_dtypes: Mapping[str, torch.dtype] | None = None,
        encoders: Mapping[str, CategoryEncoder] | None = None,
        sparse: bool = False,
        return_index: bool = False,
        na: Literal["raise", "code"] = "raise",
        time_key: str | None = None,
        sampling: Literal["populations", "initial", "lineage"] = "populations",
        cells_per_time: int = 128,
        clone_key: str | None = None,
        clones_per_batch: int = 16,
        cells_per_clone: int | None = None,
        time_kwargs: dict[str, Any] | None = None,
        val_size: float | int = 0.1,
        test_size: float | int = 0.1,
        stratify_key: str | None = None,
        holdout: dict[str, Any] | None = None,
        holdout_split: Literal["test", "val"] = "test",
        split_indices: dict[str, Sequence[int]] | None = None,
        batch_size: int = 256,
        shuffle: bool = True,
        drop_last: bool = False,
        num_workers: int = 0,
        persistent_workers: bool | None = None,
        pin_memory: bool = False,
        sampler: Literal["uniform", "block"] = "uniform",
        block_size: int = 64,
        pool_batches: int = 16,
        multiprocessing_context: str | None = None,
        seed: int = 0,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if sampler not in ("uniform", "block"):
            raise ValueError(f"sampler must be 'uniform' or 'block', got {sampler!r}.")
        self.source = source
        self.load_kwargs = dict(load_kwargs or {})
        self.backed = backed
        self.preprocess = preprocess
        self.dataset_kwargs = {
            "layer": layer,
            "obs_keys": list(obs_keys),
            "obsm_keys": list(obsm_keys),
            "X": X,
            "dtype": dtype,
            "obsm_dtype": obsm_dtype,
            "obs_dtypes": dict(obs_dtypes or {}),
            "sparse": sparse,
            "return_index": return_index,
            "na": na,
        }
        self.time_key = time_key
        self.sampling = sampling
        self.cells_per_time = cells_per_time
        self.clone_key = clone_key
        self.clones_per_batch = clones_per_batch
        self.cells_per_clone = cells_per_clone
        self.time_kwargs = dict(time_kwargs or {})
        self.split_kwargs = {
            "val_size": val_size,
            "test_size": test_size,
            "stratify_key": stratify_key,
            "holdout": holdout,
            "holdout_split": holdout_split,
            "indices": split_indices,
        }
        self.loader_kwargs = {
            "num_workers": num_workers,
            "pin_memory": pin_memory,
            "persistent_workers": num_workers > 0 and persistent_workers is not False,
            "multiprocessing_context": multiprocessing_context if num_workers > 0 else None,
        }
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.sampler_kind = sampler
        self.block_size = block_size
        self.pool_batches = pool_batches
        self.seed = seed
        self._given_encoders = dict(encoders or {})
        self._checkpoint_encoders: dict[str, CategoryEncoder] = {}
        self._adata: ad.AnnData | None = None
        self._data: ad.AnnData | str | None = None
        self.dataset: AnnDataset | None = None
        self._splits: dict[str, np.ndarray] | None = None
        self._fingerprint: dict[str, int | str] | None = None
        self._checkpoint_split: dict[str, Any] | None = None  # restored once data is loaded
        self._stage: str | None = None  # Lightning's stage between setup and teardown
        # Encoders travel in state_dict (plain lists, loadable with weights_only=True).
        ignore = ["encoders", "source"] if isinstance(source, ad.AnnData) else ["encoders"]
        self.save_hyperparameters(ignore=ignore, logger=False)

    # -- data -------------------------------------------------------------------------------

    def _is_registry_name(self) -> bool:
        return (
            isinstance(self.source, str)
            and not str(self.source).endswith(".h5ad")
            and not (os.path.exists(self.source))
        )

    def prepare_data(self) -> None:
        """Download a named dataset into its cache (Lightning calls this on one process only)."""
        if self._is_registry_name() and self.source != "simulated":
            from .datasets import load_dataset

            load_dataset(self.source, **self.load_kwargs)

    def _load(self) -> ad.AnnData | str:
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
        """
        self._stage = stage
        if self.dataset is None:
            self._data = self._load()
            self._adata = self._data if isinstance(self._data, ad.AnnData) else None
            self.dataset = self._build_dataset()
            self._fingerprint = None
        if self._checkpoint_split is not None:
            self._restore_split()
        if self._splits is None:
            self._splits = make_splits(self.dataset.obs, seed=self.seed, **self.split_kwargs)
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
        """What identifies the cells of this module's data (their number and names, in order).

        Computed by :func:`torch_adata.splits.fingerprint` and saved with the split in
        checkpoints; a checkpoint's split is restored only onto data with the same fingerprint.
        """
        if self.dataset is None:
            self.setup()
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.dataset.obs_names)
        return self._fingerprint

    def _build_dataset(self) -> AnnDataset:
        encoders = dict(self._given_encoders)
        for key, restored in self._checkpoint_encoders.items():
            if key not in self.dataset_kwargs["obs_keys"]:
                continue  # kept in self.encoders, to decode a model's outputs
            if key in encoders and encoders[key] != restored:
                raise ValueError(
                    f"encoders= gives obs column {key!r} other categories than the checkpoint "
                    f"the model was trained with ({encoders[key]} vs {restored}). Drop it from "
                    "encoders= to use the checkpoint's codes."
                )
            encoders[key] = restored
        options = {**self.dataset_kwargs, "encoders": encoders, "backed": self.backed}
        try:
            if self.time_key is None:
                return AnnDataset(self._data, **options)
            return TimeResolvedAnnDataset(
                self._data,
                self.time_key,
                mode=self.sampling,
                clone_key=self.clone_key,
                **self.time_kwargs,
                **options,
            )
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
            Codes from a batch or a model's predictions (tensor, array or list).
        """
        encoders = self.encoders
        if key not in encoders:
            raise FieldKeyError(
                f"No encoder for {key!r}; encoders exist for {sorted(encoders)}. Add the "
                "column to obs_keys, or load a checkpoint that has it."
            )
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

    def _sampler(self, rows: np.ndarray, train: bool):
        """The batch sampler of a split: yields positions into ``rows`` (its SplitDataset)."""
        n = len(rows)
        common = {"seed": self.seed}
        if isinstance(self.dataset, TimeResolvedAnnDataset) and train:
            return self.dataset.batch_sampler(
                indices=rows,
                batch_size=self.batch_size,
                cells_per_time=self.cells_per_time,
                clones_per_batch=self.clones_per_batch,
                cells_per_clone=self.cells_per_clone,
                shuffle=self.shuffle,
                drop_last=self.drop_last,
                **common,
            )
        if train and self.sampler_kind == "block":
            return samplers.BlockShuffleSampler(
                n,
                self.batch_size,
                block_size=self.block_size,
                pool_batches=self.pool_batches,
                drop_last=self.drop_last,
                **common,
            )
        return samplers.UniformBatchSampler(
            n,
            self.batch_size,
            shuffle=train and self.shuffle,
            drop_last=train and self.drop_last,
            **common,
        )

    def loader(self, split: str) -> DataLoader:
        """The DataLoader of ``split`` (``"train"``, ``"val"``, ``"test"`` or ``"predict"``).

        Parameters
        ----------
        split
            Which split. ``"train"`` is shuffled (per ``sampler``/``sampling``); the others
            are read in row order.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
        rows = self.splits[split]
        if len(rows) == 0:
            raise ValueError(
                f"The {split} split is empty; set its size (val_size/test_size) or holdout."
            )
        dataset = SplitDataset(self.dataset, rows, split)
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            dataset,
            sampler=self._sampler(rows, split == "train"),
            batch_size=None,
            collate_fn=collate,
            generator=generator,
            **self.loader_kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        """The training loader: ``loader("train")``."""
        return self.loader("train")

    def val_dataloader(self) -> DataLoader:
        """The validation loader: ``loader("val")``."""
        return self.loader("val")

    def test_dataloader(self) -> DataLoader:
        """The test loader: ``loader("test")``."""
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
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the split and the label encoders of a checkpoint.

        Lightning calls this with ``ckpt_path=`` (after :meth:`setup`). The label encoders are
        always restored: a model resumed or used for prediction, even on another file, gets
        each label with the code it was trained on (the dataset's categorical fields are
        re-encoded with the checkpoint's encoders). The split is restored only onto the data
        it was drawn on (same cells in the same order, see :attr:`data_fingerprint`), so a
        resumed run trains on the same cells. On other data, prediction covers every cell of
        that data, and resuming ``fit``, ``validate`` or ``test`` raises unless
        ``split_indices=`` gives that data's split. Called by hand before ``setup``, it takes
        effect there.

        Parameters
        ----------
        state_dict
            What :meth:`state_dict` returned (Lightning passes the checkpoint's entry).

        Raises
        ------
        ValueError
            ``fit``, ``validate`` or ``test`` with a checkpoint whose split was drawn on other
            cells (and no ``split_indices=``).
        UnknownCategoryError
            The data has labels the checkpoint's encoders do not know.

        Warns
        -----
        UserWarning
            Called outside a Lightning stage with a checkpoint of other cells: its split is
            not applied.
        """
        if "encoders" in state_dict:
            self._checkpoint_encoders = {
                k: CategoryEncoder.from_dict(v) for k, v in state_dict["encoders"].items()
            }
            if self.dataset is not None and any(
                self.dataset.encoders.get(k, e) != e for k, e in self._checkpoint_encoders.items()
            ):
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
            same = all(drawn_on.get(k) == v for k, v in ours.items())
            if drawn_on.get("n_obs") == n:
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
        if self.split_kwargs["indices"] is not None:
            log.info("torch_adata: the checkpoint's split is of %s; using split_indices.", theirs)
            return
        message = (
            f"The checkpoint's train/val/test split was drawn on {theirs}, so its row "
            "positions do not apply to this data. Fix: "
            "resume, validate or test with the same AnnData as the checkpoint (same cells in "
            "the same order), or pass split_indices={'train': [...], 'val': [...], "
            "'test': [...]} to choose this data's split explicitly. Predicting on new data "
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

    def write_predictions(
        self,
        predictions: Sequence[Any],
        key: str | Mapping[str, str],
        *,
        adata: ad.AnnData | None = None,
        split: str = "predict",
    ) -> ad.AnnData:
        """Put ``trainer.predict`` outputs into a copy of the AnnData, in the original cell order.

        Parameters
        ----------
        predictions
            What ``trainer.predict(model, datamodule=dm)`` returned: one tensor (or dict of
            tensors) per batch, in loader order (single process).
        key
            Where to write: for tensor outputs, the obsm key (2-D) or obs column (1-D); for dict
            outputs, ``{output name: key}``.
        adata
            Target AnnData (default: a copy of the module's AnnData). It is modified and returned.
        split
            The split that was predicted (default ``"predict"``: every cell).

        Returns
        -------
        anndata.AnnData
            The AnnData with the predictions; cells outside the split get NaN.
        """
        rows = self._loader_rows(split)
        if adata is None:
            if self.adata is None:
                raise ValueError("This module reads a backed file: pass adata= to write into.")
            adata = self.adata.copy()
        if len(predictions) == 0:
            raise ValueError("No predictions to write (trainer.predict returned nothing).")
        first = predictions[0]
        if isinstance(first, Mapping):
            if not isinstance(key, Mapping):
                key = {name: name for name in first}
            outputs = {key[name]: torch.cat([p[name] for p in predictions]) for name in key}
        else:
            if not isinstance(key, str):
                raise TypeError("key must be a string when predictions are tensors.")
            outputs = {key: torch.cat(list(predictions))}
        for name, values in outputs.items():
            values = values.detach().cpu().numpy()
            if len(values) != len(rows):
                raise ValueError(
                    f"{len(values)} predictions for {len(rows)} cells of the {split} split: "
                    "predict with this module's predict loader, in one process."
                )
            if values.ndim == 1:
                column = np.full(adata.n_obs, np.nan, dtype=np.float64)
                if values.dtype.kind in "iub":
                    column = pd.array([pd.NA] * adata.n_obs, dtype="Int64")
                column[rows] = values
                adata.obs[name] = column
            else:
                block = np.full((adata.n_obs, *values.shape[1:]), np.nan, dtype=np.float32)
                block[rows] = values
                adata.obsm[name] = block
        return adata

    def _loader_rows(self, split: str) -> np.ndarray:
        """AnnData rows in the order the (unshuffled) loader of ``split`` yields them."""
        loader_sampler = self._sampler(self.splits[split], train=False)
        order = np.concatenate(list(iter(loader_sampler)))
        return self.splits[split][order]
