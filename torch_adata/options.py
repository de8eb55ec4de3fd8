"""Options of :class:`~torch_adata.AnnDataModule`, one small dataclass per concern.

:class:`Fields` says what a batch carries, :class:`TimeSampling` how a time course is sampled,
:class:`Split` which cells train, validate and test, and :class:`Loader` how the DataLoaders
run. Each is documented once here; the data module takes them as ``fields=``, ``time=``,
``split=`` and ``loader=`` (a dataclass or a dict of its fields), and LightningCLI YAML nests
them under ``data:`` by the same names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import torch

from ._fields import CategoryEncoder
from ._gather import check_io_threads

__all__ = ["Fields", "Loader", "Split", "TimeSampling", "as_options"]


def _names(value: Sequence[str] | str, what: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{what} must be a list of names, got {value!r}.")
    return list(value)


@dataclass
class Fields:
    """What each batch carries: the keyword arguments of :class:`~torch_adata.AnnDataset`.

    Parameters
    ----------
    layer
        Layer to batch as ``"X"`` instead of ``adata.X`` (e.g. ``"counts"``; ``"raw"``, where
        no layer has that name, is ``adata.raw.X`` as scanpy spells it).
    use_raw
        Batch ``adata.raw.X`` (with ``adata.raw.var_names``) as ``"X"``.
    var_names
        Genes to batch, in this order, matched by name (:func:`torch_adata.genes.align_genes`);
        ``None`` for the data's own. A checkpoint's genes are used when this is ``None``, so a
        model predicts on data whose genes are stored in another order.
    fill_missing
        With ``var_names`` (or a checkpoint's genes): genes the data lacks are zeros (counted in
        a warning) instead of an error.
    obs_keys
        obs columns to batch (categorical ones as int64 codes, see ``encoders``).
    obsm_keys
        obsm entries to batch (e.g. ``["X_pca"]``).
    X
        Batch the expression matrix (``False``: only obs/obsm fields).
    sparse
        Sparse expression batches (:class:`~torch_adata.SparseBatch`): only the non-zeros
        cross worker processes and the host-device link.
    densify
        With ``sparse``: the data module densifies each batch once it is on the device (its
        ``on_after_batch_transfer``, :func:`~torch_adata.densify`), so the model gets dense
        tensors and needs no hook of its own.
    return_index
        Add ``"index"``, each cell's AnnData row position.
    na
        Missing labels in categorical obs columns: ``"raise"`` or ``"code"`` (code ``-1``).
    dtype, obsm_dtype, obs_dtypes
        dtypes of the expression field, of obsm fields, and per obs column.
    encoders
        Category encoders to reuse, keyed by obs column (e.g. ``AnnDataset(...).encoders``);
        other categorical columns get one fitted on the data. A checkpoint's encoders replace
        these.
    engine
        Gather engine: ``"auto"``, ``"numba"`` or ``"numpy"``.
    join
        For a collection of files: their genes matched by name, ``"inner"`` (in every file),
        ``"outer"`` (in any; absent genes read as 0) or a list of genes fixing the columns
        (see :class:`~torch_adata.collection.SourceCollection`).
    source_key
        For a collection: the obs column naming each cell's source (batch it with
        ``obs_keys``).
    io_threads
        Backed files: reads in flight at once for a batch not in the page cache (``None``: up
        to 32; ``1``: one after another), see :class:`~torch_adata.AnnDataset`.
    """

    layer: str | None = None
    use_raw: bool = False
    var_names: list[str] | None = None
    fill_missing: bool = False
    obs_keys: list[str] = field(default_factory=list)
    obsm_keys: list[str] = field(default_factory=list)
    X: bool = True
    sparse: bool = False
    densify: bool = False
    return_index: bool = False
    na: Literal["raise", "code"] = "raise"
    dtype: torch.dtype = torch.float32
    obsm_dtype: torch.dtype = torch.float32
    obs_dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    encoders: dict[str, CategoryEncoder] = field(default_factory=dict)
    engine: Literal["auto", "numba", "numpy"] = "auto"
    join: str | list[str] = "inner"
    source_key: str = "source"
    io_threads: int | None = None

    def __post_init__(self):
        if self.densify and not self.sparse:
            raise ValueError(
                "Fields(densify=True) densifies sparse batches on the device: it needs "
                "sparse=True (dense batches need no densifying)."
            )
        self.io_threads = check_io_threads(self.io_threads)
        self.obs_keys = _names(self.obs_keys, "Fields.obs_keys")
        if self.var_names is not None:
            self.var_names = _names(self.var_names, "Fields.var_names")
        self.obsm_keys = _names(self.obsm_keys, "Fields.obsm_keys")
        if isinstance(self.join, str) and self.join not in ("inner", "outer"):
            raise ValueError(
                f"Fields.join must be 'inner', 'outer' or a list of genes, got {self.join!r}."
            )
        if not isinstance(self.join, str):
            self.join = _names(self.join, "Fields.join")
        self.obs_dtypes = dict(self.obs_dtypes or {})
        self.encoders = dict(self.encoders or {})

    def dataset_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :class:`~torch_adata.AnnDataset` these fields stand for."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "densify"}


@dataclass
class TimeSampling:
    """A time course: batches from :class:`~torch_adata.TimeResolvedAnnDataset`.

    Training batches are drawn per ``mode``; evaluation and prediction read every cell in row
    order, with the time-resolved keys (``"t"``, ``"t_eval"``, ``"clone"``). ``"t_eval"`` has
    one entry per time point, not per cell, so Lightning cannot infer the batch size from a
    batch: log with ``self.log(..., batch_size=len(batch["t"]))``.

    Parameters
    ----------
    time_key
        obs column with each cell's time point (required: no column is assumed), or for a
        collection whose files are one time point each, ``{source key or file name: time}``.
    mode
        ``"populations"``: ``cells_per_time`` cells of every time point per batch (``T *
        cells_per_time`` cells, rows ``[k*n:(k+1)*n]`` of time point ``k``); ``"initial"``:
        ``batch_size`` cells of the start time point (full batches but the last);
        ``"lineage"``: ``clones_per_batch`` whole clones (or ``cells_per_clone`` sisters per
        time point) per batch, full batches but the last.
    cells_per_time
        ``"populations"``: cells of every time point per batch.
    clone_key
        Clone assignment: an obs column or an obsm cells x clones matrix (e.g. ``"X_clone"``).
    clones_per_batch
        ``"lineage"``: clones per batch.
    cells_per_clone
        ``"lineage"``: at most this many cells per clone and time point; ``None`` for whole
        clones.
    start_time
        The start time point of ``"initial"`` (default: the earliest).
    multi_clone
        Cells in several clones: ``"raise"``, ``"drop"`` or ``"first"``.
    drop_single_time_clones
        Clones seen at one time point: ``True`` drops them, ``False`` keeps them, ``None``
        keeps them and warns.
    time_ranks
        Use the rank of each time label (0, 1, 2...) instead of the number it names.
    """

    time_key: str | dict[str, float]
    mode: Literal["populations", "initial", "lineage"] = "populations"
    cells_per_time: int = 128
    clone_key: str | None = None
    clones_per_batch: int = 16
    cells_per_clone: int | None = None
    start_time: float | None = None
    multi_clone: Literal["raise", "drop", "first"] = "raise"
    drop_single_time_clones: bool | None = None
    time_ranks: bool = False

    def __post_init__(self):
        if isinstance(self.time_key, Mapping) and self.time_key:
            self.time_key = dict(self.time_key)
        elif not isinstance(self.time_key, str) or not self.time_key:
            raise TypeError(
                f"TimeSampling.time_key must name the obs column of time points (or map each "
                f"source of a collection to its time), got {self.time_key!r}."
            )
        if self.mode not in ("populations", "initial", "lineage"):
            raise ValueError(
                f"TimeSampling.mode must be 'populations', 'initial' or 'lineage', got "
                f"{self.mode!r}."
            )

    def dataset_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~torch_adata.TimeResolvedAnnDataset`."""
        return {
            "time_key": self.time_key,
            "mode": self.mode,
            "clone_key": self.clone_key,
            "start_time": self.start_time,
            "multi_clone": self.multi_clone,
            "drop_single_time_clones": self.drop_single_time_clones,
            "time_ranks": self.time_ranks,
        }


@dataclass
class Split:
    """Which cells train, validate and test (:func:`torch_adata.splits.make_splits`).

    Prediction always covers every cell. Only the splits asked for exist: with the defaults
    every cell trains, and the module has no validation or test loader (so Lightning neither
    runs nor warns about them).

    Parameters
    ----------
    val_size, test_size
        Fractions (``0.1``) or numbers of cells (``500``) of the validation and test splits.
    stratify_key
        obs column whose label proportions each split keeps.
    holdout
        ``{obs column: [values]}``: cells with these values form the ``holdout_split`` split.
    holdout_split
        ``"test"`` or ``"val"``.
    indices
        Explicit row positions, ``{"train": [...], "val": [...], "test": [...]}``.
    """

    val_size: float | int = 0.0
    test_size: float | int = 0.0
    stratify_key: str | None = None
    holdout: dict[str, Any] | None = None
    holdout_split: Literal["test", "val"] = "test"
    indices: dict[str, list[int]] | None = None

    def __post_init__(self):
        if self.holdout_split not in ("test", "val"):
            raise ValueError(
                f"Split.holdout_split must be 'test' or 'val', got {self.holdout_split!r}."
            )

    def has(self, name: str) -> bool:
        """Whether split ``name`` can hold cells, from these options alone.

        Parameters
        ----------
        name
            ``"train"``, ``"val"``, ``"test"`` or ``"predict"``.
        """
        if name in ("train", "predict"):
            return True
        if self.indices is not None:
            return len(self.indices.get(name, ())) > 0
        if self.holdout and self.holdout_split == name:
            return True
        size = self.val_size if name == "val" else self.test_size
        return bool(size)


@dataclass
class Loader:
    """How the DataLoaders run (``batch_size`` and ``num_workers`` are top-level options).

    Parameters
    ----------
    shuffle
        Shuffle training batches every epoch (evaluation always reads in row order).
    drop_last
        Drop each training epoch's remainder so every training batch is full.
    sampler
        Training order of plain datasets: ``"uniform"`` or ``"block"``
        (:class:`~torch_adata.samplers.BlockShuffleSampler`, faster on disk, less diverse; on
        a backed file its pools are read ahead, ``read_ahead=`` the split).
    block_size, pool_batches
        Options of the block sampler.
    persistent_workers
        Keep workers between epochs (``None``: yes whenever there are workers).
    pin_memory
        Pin batches in page-locked memory.
    multiprocessing_context
        ``"fork"``, ``"spawn"`` or ``None`` (the platform default) for worker processes.
    """

    shuffle: bool = True
    drop_last: bool = False
    sampler: Literal["uniform", "block"] = "uniform"
    block_size: int = 64
    pool_batches: int = 16
    persistent_workers: bool | None = None
    pin_memory: bool = False
    multiprocessing_context: str | None = None

    def __post_init__(self):
        if self.sampler not in ("uniform", "block"):
            raise ValueError(f"sampler must be 'uniform' or 'block', got {self.sampler!r}.")


def as_options(value: Any, cls: type, name: str):
    """``value`` as a ``cls`` dataclass: itself, built from a dict, or the default for None."""
    if isinstance(value, cls):
        return value
    if value is None:
        return cls()
    if isinstance(value, Mapping):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise TypeError(
                f"{name}= has unknown option(s) {unknown}; {cls.__name__} has {sorted(known)}."
            )
        return cls(**value)
    raise TypeError(
        f"{name}= must be a torch_adata.{cls.__name__} or a dict of its fields, got "
        f"{type(value).__name__}."
    )


def plain(options) -> dict[str, Any]:
    """A dataclass as a dict of plain values (for checkpoints' hyperparameters)."""
    return asdict(options)
