"""``AnnDataset``: a map-style torch ``Dataset`` over the cells of an AnnData."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import anndata as ad
import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from ._batch import SparseBatch, for_fetcher
from ._counts import RAW_OPTION, check_counts, reader_values
from ._fields import CategoryEncoder, MatrixField, ObsField
from ._kernels import share_cores, warm_up
from ._source import FieldKeyError, Source
from .collection import Join, open_source
from .genes import FilledReader, GeneAlignment, align_genes

Batch = torch.Tensor | dict[str, Any]


class AnnDataset(Dataset):
    """Cells of an AnnData as batches of tensors, gathered one batch per call.

    Parameters
    ----------
    adata
        An AnnData (in memory, or opened with ``backed="r"``; views like ``adata[mask]`` are
        read through their parent, without copying the matrix) or a path to an ``.h5ad`` file.
        Or a collection read as one dataset, cells one source after the other: a list of
        AnnData objects and/or paths, a mapping ``{name: AnnData or path}``, a folder (its
        ``*.h5ad`` files, sorted by name) or a glob pattern such as ``"atlas/*.h5ad"`` (see
        :class:`~torch_adata.collection.SourceCollection`; ``dataset.source`` is then the
        collection).
    layer
        Batch ``adata.layers[layer]`` instead of ``adata.X`` (the batch key stays ``"X"``).
        ``layer="raw"`` batches ``adata.raw.X`` when there is no layer named ``"raw"``.
    use_raw
        Batch ``adata.raw.X`` (as scanpy spells it; often the counts or log-normalised data
        kept before scaling), with ``adata.raw.var_names`` as the genes.
    var_names
        Genes to batch, in this order (e.g. those a model was trained on): the AnnData's
        genes are matched by name (:func:`~torch_adata.genes.align_genes`), reordered, extra
        ones dropped. The alignment is in ``dataset.gene_alignment``.
    fill_missing
        With ``var_names``: fill genes the AnnData lacks with zeros (a warning gives their
        number) instead of raising.
    obs_keys
        ``obs`` columns to add to each batch.
    obsm_keys
        ``obsm`` entries (dense or sparse, numeric) to add to each batch.
    X
        Whether the batch carries the expression matrix. ``False`` batches only obs/obsm fields.
    dtype
        dtype of the expression field (default float32).
    obsm_dtype
        dtype of obsm fields (default float32).
    obs_dtypes
        Per-column dtype overrides for numeric/bool obs columns, e.g. ``{"size": torch.float64}``.
    encoders
        Category encoders to reuse (for example ``other_dataset.encoders``), keyed by obs column;
        columns without one get an encoder fitted on the whole column.
    na
        What a missing value in an obs column does: ``"raise"`` (default, naming the column,
        the count and the fixes) or ``"code"`` (a label is encoded as -1, a float stays NaN).
    sparse
        Return the expression field as a :class:`~torch_adata.SparseBatch` (CSR tensors that
        cross worker processes) to densify on the target device with
        :func:`~torch_adata.densify`. Meant for GPU training (only the non-zeros travel to the
        device); on a CPU, sparse batches densified there reach 0.76x the cells/s of dense
        batches at 2,000 genes and 0.69x at 20,000 (10 % non-zeros, in memory,
        ``benchmarks/plain_vs_fast.py``), so ask for dense batches there.
    return_index
        Add an ``"index"`` field: the int64 position of each cell in ``adata``. For a
        collection the positions are global; ``dataset.source.locate(batch["index"])`` gives
        each cell's source and row there (``dataset.source.source_of(...)`` its source name).
    backed
        For a path: read rows from the file on demand (``True``, the default: opening costs
        nothing whatever the file's size) or load into memory the matrices this dataset
        batches (``False``; layers and obsm entries it does not batch stay on disk, unlike
        with ``anndata.read_h5ad``). Note that
        :class:`~torch_adata.AnnDataModule` defaults to loading a path into memory instead.
    engine
        Gather kernels: ``"auto"`` (numba if installed), ``"numba"`` or ``"numpy"``.
    join
        A collection's genes, matched by ``var_names``: ``"inner"`` (the genes of every
        source), ``"outer"`` (of any source; absent genes read as 0) or a list of genes that
        fixes the columns and their order. Unused for one source.
    source_key
        A collection's obs column naming each cell's source (file name or the key given),
        batched like any obs column (``obs_keys=["source"]``). Unused for one source.
    io_threads
        Backed files: how many reads a batch whose rows are not in the page cache has in flight
        at once (``None``, the default: up to 32, so an SSD sees a queue of reads; ``1``: one
        read after another, on the calling thread, e.g. for a disk that seeks, or to keep
        threads out of a process). Batches found in the page cache are always read on the
        calling thread. No effect in memory.

    Batches
    -------
    With the expression field alone (the default), ``dataset[idx]`` is one tensor of shape
    ``(len(idx), n_vars)``. With more fields it is a ``dict``:

    ``"X"``
        ``(batch, n_vars)`` float32 (or a :class:`~torch_adata.SparseBatch`).
    ``<obs column>``
        ``(batch,)``: float32 for floats, int64 for integers, bool for booleans, int64 codes for
        categorical and string columns (decode with :meth:`decode`).
    ``<obsm key>``
        ``(batch, k)`` float32.
    ``"index"``
        ``(batch,)`` int64 positions, with ``return_index=True``.

    ``dataset[i]`` for an int ``i`` gives one cell (shapes without the batch dimension; a
    :class:`~torch_adata.SparseBatch` of one row).

    Any ``DataLoader`` works, with PyTorch's default ``collate_fn``: each batch is gathered
    in one vectorised read (``__getitems__``) and collated back without re-stacking.
    ``collate_fn=torch_adata.collate`` (the fast path) skips the per-cell samples a default
    collate walks through; it is faster for small batches and narrow fields (see
    :doc:`/tutorials/engine`).
    """

    # keys of a batch that are batch-level, not per cell (kept once, never stacked)
    _batch_keys: frozenset[str] = frozenset()
    # __getitems__ of a subclass returns what this one does (see _compat.fetcher_collate)
    _getitems_passes_through = True

    def __init__(
        self,
        adata: Source | Sequence[Source] | Mapping[str, Source],
        *,
        layer: str | None = None,
        use_raw: bool = False,
        var_names: Sequence[str] | None = None,
        fill_missing: bool = False,
        obs_keys: Sequence[str] | str = (),
        obsm_keys: Sequence[str] | str = (),
        X: bool = True,
        dtype: torch.dtype = torch.float32,
        obsm_dtype: torch.dtype = torch.float32,
        obs_dtypes: Mapping[str, torch.dtype] | None = None,
        encoders: Mapping[str, CategoryEncoder] | None = None,
        na: Literal["raise", "code"] = "raise",
        sparse: bool = False,
        return_index: bool = False,
        backed: bool = True,
        engine: Literal["auto", "numba", "numpy"] = "auto",
        join: Join = "inner",
        source_key: str = "source",
        io_threads: int | None = None,
    ):
        self.source = open_source(
            adata,
            backed=backed,
            engine=engine,
            join=join,
            source_key=source_key,
            io_threads=io_threads,
        )
        if self.source.n_obs == 0:
            raise ValueError(
                "The AnnData has no cells (n_obs == 0): check the selection that produced it."
            )
        obs_keys = [obs_keys] if isinstance(obs_keys, str) else list(obs_keys)
        obsm_keys = [obsm_keys] if isinstance(obsm_keys, str) else list(obsm_keys)
        self.fields: dict[str, MatrixField | ObsField] = {}
        if layer == "raw" and "raw" not in self.source.layer_keys:
            layer, use_raw = None, True
        if use_raw and layer is not None:
            raise ValueError(
                f"Pass either layer={layer!r} or use_raw=True: both name the matrix to batch."
            )
        self.use_raw = bool(use_raw)
        self.layer = layer
        self.gene_alignment: GeneAlignment | None = None
        if X:
            kind = "raw" if use_raw else "layer" if layer else "X"
            columns, n_cols = None, None
            if var_names is not None:
                data_genes = self.source.raw_var_names if use_raw else self.source.var_names
                alignment = align_genes(var_names, data_genes, fill_missing=fill_missing)
                self.gene_alignment = alignment
                if not alignment.identity:
                    columns, n_cols = alignment.columns, len(alignment.reference)
            reader = self.source.matrix_reader(kind, layer, columns=columns)
            if n_cols is not None and len(columns) < n_cols:
                reader = FilledReader(reader, self.gene_alignment.targets, n_cols)
            self._add("X", MatrixField("X", reader, dtype, sparse))
        elif layer is not None or sparse or use_raw or var_names is not None:
            raise ValueError(
                "layer=, use_raw=, var_names= and sparse= apply to the expression field; they "
                "need X=True."
            )
        encoders = dict(encoders or {})
        obs_dtypes = dict(obs_dtypes or {})
        for key in obs_keys:
            self.source.require_obs(key, na=na)
            self._add(
                key,
                ObsField.from_column(
                    key,
                    self.source.obs[key],
                    dtype=obs_dtypes.pop(key, None),
                    encoder=encoders.pop(key, None),
                    na=na,
                ),
            )
        for key in obsm_keys:
            self._add(key, MatrixField(key, self.source.matrix_reader("obsm", key), obsm_dtype))
        if return_index:
            self._add("index", ObsField("index", np.arange(self.source.n_obs, dtype=np.int64)))
        for leftover, what in ((obs_dtypes, "obs_dtypes"), (encoders, "encoders")):
            if leftover:
                raise ValueError(
                    f"{what} names columns that are not in obs_keys: {sorted(leftover)}. "
                    "Add them to obs_keys or remove them."
                )
        if not self.fields:
            raise ValueError("Nothing to batch: X=False and no obs_keys or obsm_keys were given.")
        # before any DataLoader forks workers, which then inherit the kernels and file layouts
        warm_up(engine)
        for field in self.fields.values():
            if isinstance(field, MatrixField):
                field.reader.prepare()

    def _add(self, name: str, field) -> None:
        if name in self.fields:
            raise ValueError(
                f"Two fields are named {name!r} (an obs column and an obsm key, or 'X'/'index'). "
                "Rename one of them in the AnnData."
            )
        self.fields[name] = field

    # -- the Dataset protocol ---------------------------------------------------------------

    def __len__(self) -> int:
        return self.source.n_obs

    def __getitem__(self, index) -> Batch:
        stage_pools(self, index)
        if (isinstance(index, (int, np.integer)) and not isinstance(index, bool)) or (
            isinstance(index, torch.Tensor)
            and index.ndim == 0
            and not (index.is_floating_point() or index.is_complex() or index.dtype == torch.bool)
        ):
            return _first_row(self._gather(self._rows([int(index)])), self._batch_keys)
        return self._gather(self._rows(index))

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        """The cells at ``indices`` as a list of per-cell samples, gathered in one vectorised
        read (what ``DataLoader`` calls once per batch).

        Each sample is a view of the gathered batch, shaped like ``dataset[i]``; PyTorch's
        default ``collate_fn`` and :func:`~torch_adata.collate` turn the unchanged list back
        into that batch without re-stacking it. A ``DataLoader`` with
        ``collate_fn=torch_adata.collate`` gets the batch itself, without samples.
        """
        stage_pools(self, indices)
        return for_fetcher(self._gather(fetched_positions(indices, len(self))), self._batch_keys)

    def gather(self, rows) -> Batch:
        """The batch of the cells at ``rows``, in that order (duplicates allowed).

        The same as ``dataset[rows]`` for an array of positions, and checked the same way.

        Parameters
        ----------
        rows
            Row positions in ``[-len(self), len(self))`` (array, list or tensor of ints, or a
            boolean mask of length ``len(self)``).

        Raises
        ------
        IndexError
            A position out of range, or a mask of the wrong length.
        TypeError
            Positions that are not integers.
        """
        return self._gather(self._rows(rows))

    def prefetch(self, rows) -> None:
        """Start reading the cells at ``rows`` into the page cache, for batches to come.

        Returns at once; the disk reads them while earlier batches are gathered, and the batch
        that asks for them later finds them in memory. Only backed files read directly
        (uncompressed) on Linux do anything; in memory it does nothing. Rows announced together
        form a pool: once this process reads a batch from a pool, the pool is read whole into
        memory (one read per run of consecutive rows) and the next pool announced after it by
        a background thread, so its batches are gathered from memory while the next pool is
        read (at most two pools held, a pool over 256 MB left to the page cache). In
        DataLoader workers the sampler's batches bring their pools along, and each worker
        reads its share of them.
        :class:`~torch_adata.samplers.BlockShuffleSampler` given ``read_ahead=dataset`` calls
        it with its pools of batches, two pools ahead of the one being read (the data module
        passes its split for ``Loader(sampler="block")``).

        Parameters
        ----------
        rows
            Row positions, as for :meth:`gather`.
        """
        rows = self._rows(rows)
        for field in self.fields.values():
            if isinstance(field, MatrixField):
                field.reader.prefetch(rows)

    def _gather(self, rows: np.ndarray) -> Batch:
        """The batch of int64 positions already checked to lie in ``[0, len(self))``."""
        worker = get_worker_info()
        if worker is not None:  # kernels and batch memory are told, not left to find out
            share_cores(worker.num_workers)
        in_worker = worker is not None
        batch = {name: field.take(rows, in_worker) for name, field in self.fields.items()}
        if len(batch) == 1:
            return next(iter(batch.values()))
        return batch

    def _rows(self, index) -> np.ndarray:
        return positions(index, len(self))

    def check_counts(
        self, *, integer: bool = True, needed_by: str = "This model", n_rows: int = 2000
    ) -> None:
        """Raise a clear error unless ``"X"`` holds non-negative (integer) counts.

        Reads up to ``n_rows`` cells spread over the dataset (at most two million non-zero
        values). The message names the layers or ``.raw`` of the AnnData that would pass
        (see :func:`~torch_adata.check_counts`).

        Parameters
        ----------
        integer
            Require whole numbers (a count likelihood); ``False`` only requires finite
            non-negative values (before ``log1p``).
        needed_by
            Who needs counts, for the message.
        n_rows
            Number of cells read for the check.
        """
        if "X" not in self.fields:
            raise ValueError("check_counts: this dataset has no expression field (X=False).")
        rows = np.unique(np.linspace(0, len(self) - 1, min(n_rows, len(self))).astype(np.int64))
        sample = reader_values(self.fields["X"].reader, rows)  # the non-zeros, in pieces
        if self.use_raw:
            current, name = RAW_OPTION, "adata.raw.X"
        elif self.layer:
            current, name = f"layer={self.layer!r}", f"adata.layers[{self.layer!r}]"
        else:
            current, name = "adata.X", "adata.X"
        check_counts(
            sample,
            integer=integer,
            name=name,
            needed_by=needed_by,
            source=self.source,
            current=current,
        )

    # -- labels and introspection -----------------------------------------------------------

    @property
    def encoders(self) -> dict[str, CategoryEncoder]:
        """The category encoder of each categorical obs field."""
        return {
            name: f.encoder
            for name, f in self.fields.items()
            if isinstance(f, ObsField) and f.encoder is not None
        }

    def decode(self, key: str, codes) -> np.ndarray:
        """Turn int codes of the categorical obs field ``key`` back into labels.

        Parameters
        ----------
        key
            A categorical obs field of this dataset (a key of :attr:`encoders`).
        codes
            Codes from a batch (tensor, array or list); -1 (``na="code"``) decodes to ``None``.
        """
        if key not in self.encoders:
            raise FieldKeyError(
                f"{key!r} is not a categorical obs field; encoded fields: {list(self.encoders)}."
            )
        return self.encoders[key].decode(codes)

    @property
    def obs_names(self):
        """The cells' names (``adata.obs_names``)."""
        return self.source.obs_names

    @property
    def var_names(self):
        """The genes' names, the columns of ``"X"``: ``adata.var_names``,
        ``adata.raw.var_names`` with ``use_raw``, or the ``var_names`` given."""
        if self.gene_alignment is not None:
            return self.gene_alignment.reference
        return self.source.raw_var_names if self.use_raw else self.source.var_names

    @property
    def obs(self):
        """The cells' ``obs`` table, read-only (never modify it through the dataset)."""
        return self.source.obs

    @property
    def adata(self) -> ad.AnnData | None:
        """The AnnData given.

        ``None`` when the dataset was opened from a path, and in a copy of a dataset
        over a backed AnnData unpickled in another process (a DataLoader worker under spawn).
        """
        return self.source.adata

    @property
    def n_vars(self) -> int:
        """Number of genes, the width of ``"X"``."""
        if self.gene_alignment is not None:
            return len(self.gene_alignment.reference)
        return len(self.source.raw_var_names) if self.use_raw else self.source.n_vars

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} of {len(self)} cells"]
        lines += [f"    {name!r}: {f.describe()}" for name, f in self.fields.items()]
        return "\n".join(lines)


_POOLS_SEEN: list = [None]  # [pid, the pool shares last staged in that process...]


def stage_pools(dataset: Any, index: Any) -> None:
    """In a DataLoader worker, hand ``dataset.prefetch`` this worker's share of the pool an
    index carries (a :class:`~torch_adata.samplers.PoolBatch`), and of the next pool, unless
    it was handed before. Elsewhere, and for plain indices, nothing happens.

    The sampler announces its pools in the main process, which a worker's reads never see.
    The DataLoader hands batches to its ``W`` workers in turn, so batches ``j`` and ``j + W``
    of a pool go to the same worker: a worker handed batch ``j`` stages the pool's batches
    ``j mod W, j mod W + W, ...`` (read whole into memory, its batches then gathered from
    there) and those of the next pool that will come to it, in the background. Each worker
    thus reads its own share of every pool once, in large reads. A batch handed otherwise
    (another loader's order) stages its own share as well; only speed depends on the order.
    """
    pool = getattr(index, "pool", None)
    worker = get_worker_info()
    if pool is None or worker is None:
        return
    seen = _POOLS_SEEN
    if seen[0] != os.getpid():
        seen[:] = [os.getpid()]
    w = worker.num_workers
    key, batches, place = pool
    shares = [(key, batches, place % w)]
    if index.next_pool is not None:  # the next pool's batches that come to this worker
        shares.append((*index.next_pool, (place - len(batches)) % w))
    for key, batches, first in shares:
        if (key, first) not in seen and first < len(batches):
            seen.append((key, first))
            del seen[1:-8]
            dataset.prefetch(np.concatenate(batches[first::w]))


def positions(index, n: int) -> np.ndarray:
    """Validate an index (int, slice, ints, bool mask, tensor) into int64 positions in [0, n)."""
    if isinstance(index, slice):
        return np.arange(n, dtype=np.int64)[index]
    if isinstance(index, torch.Tensor):
        index = index.detach().cpu().numpy()
    rows = np.asarray(index)
    if rows.ndim == 0:
        rows = rows.reshape(1)
    if rows.ndim != 1:
        raise IndexError(f"Index must be 1-D, got shape {rows.shape}.")
    if rows.dtype == bool:
        if len(rows) != n:
            raise IndexError(f"Boolean mask has length {len(rows)}; the dataset has {n} cells.")
        return np.flatnonzero(rows).astype(np.int64)
    if rows.size == 0:
        return np.empty(0, dtype=np.int64)
    if not np.issubdtype(rows.dtype, np.integer):
        raise TypeError(
            f"Indices must be integers (int, slice, list/array/tensor of ints or a boolean "
            f"mask), got dtype {rows.dtype}. Cast with `.astype(int)` / `.long()`."
        )
    rows = rows.astype(np.int64, copy=False)
    lo, hi = rows.min(), rows.max()
    if lo < -n or hi >= n:
        bad = hi if hi >= n else lo
        raise IndexError(f"Index {bad} is out of range for a dataset of {n} cells.")
    if lo < 0:
        rows = np.where(rows < 0, rows + n, rows)
    return rows


def fetched_positions(indices: Sequence[int], n: int) -> np.ndarray:
    """:func:`positions` of the indices a DataLoader hands to ``__getitems__``, with the fix
    for a batch sampler (yielding whole batches) given as ``sampler=`` next to a batch size."""
    try:
        return positions(indices, n)
    except (IndexError, TypeError, ValueError):
        if any(np.ndim(i) > 0 for i in indices):
            raise TypeError(
                "The DataLoader asked for a list of whole batches: a batch sampler was given as "
                "`sampler=` with a batch size. Pass `batch_size=None` with it "
                "(`DataLoader(dataset, sampler=s, batch_size=None)`) or give it as "
                "`batch_sampler=s`."
            ) from None
        raise


def _first_row(batch: Batch, shared: frozenset[str] = frozenset()) -> Batch:
    if isinstance(batch, dict):
        return {k: v if k in shared else _first_row(v) for k, v in batch.items()}
    if isinstance(batch, SparseBatch):
        return batch
    return batch[0]
