"""The public batch types: sparse rows that cross worker processes (:class:`SparseBatch`),
densified on the target device (:func:`densify`), the per-cell samples a DataLoader's collate
function sees, and the :func:`collate` of the fast path.

Where a batch's memory comes from (shared-memory rings in DataLoader workers, recycled buffers
in the training process) is :mod:`torch_adata._transport`'s concern.
"""

from __future__ import annotations

import operator
import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import scipy.sparse as sp
import torch

from ._compat import fetcher_collate, torch_collate_module
from ._kernels import get_kernels
from ._transport import RingBatch, empty_batch, identity

# dtypes the CSR kernels densify on a CPU; others take the torch path of SparseBatch.to_dense
_SCIPY_DTYPES = (torch.float32, torch.float64, torch.int32, torch.int64, torch.int16, torch.int8)


class SparseBatch(NamedTuple):
    """Rows of a sparse matrix as plain CSR tensors.

    Plain tensors pickle across DataLoader worker processes (sparse torch tensors do not), pin,
    and move to a device with Lightning's batch transfer. Call :meth:`to_dense` (or
    :func:`densify` on a whole batch) after the transfer, e.g. in
    ``LightningModule.on_after_batch_transfer``, so only the non-zeros travel to the GPU.

    Attributes
    ----------
    indptr
        Shape ``(batch + 1,)``: row ``i`` owns ``values[indptr[i]:indptr[i + 1]]``.
    indices
        Column of each stored value. ``indptr`` and ``indices`` are int32 where the columns and
        the batch's non-zeros fit (as scipy chooses; half the bytes to send), int64 otherwise.
    values
        The stored values (the field's dtype).
    n_cols
        Number of columns of the dense form.
    """

    indptr: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor
    n_cols: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.indptr.shape[0] - 1, self.n_cols)

    @property
    def device(self) -> torch.device:
        return self.values.device

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SparseBatch:
        """A copy on ``device``.

        Parameters
        ----------
        device
            Target device, e.g. ``"cuda"``.
        non_blocking
            Copy asynchronously from pinned memory (as :meth:`torch.Tensor.to`).
        """
        return SparseBatch(
            *(
                t.to(device, non_blocking=non_blocking)
                for t in (self.indptr, self.indices, self.values)
            ),
            self.n_cols,
        )

    def to_dense(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The dense ``(batch, n_cols)`` tensor, built on ``device`` (default: where it is).

        Duplicate ``(row, column)`` entries of a non-canonical CSR are summed, as in scipy.

        Parameters
        ----------
        device
            Where to build the dense tensor; ``None`` keeps the batch's device. Moving the
            sparse batch first and densifying there sends only the non-zeros.
        """
        batch = self if device is None else self.to(device)
        n_rows = batch.indptr.shape[0] - 1
        if batch.device.type == "cpu" and batch.values.dtype in _SCIPY_DTYPES:
            # one pass of a CSR kernel into a recycled buffer (see empty_batch): torch.zeros
            # faults fresh pages in on every batch, and the index arithmetic of the general
            # path below costs more than the scatter itself on a CPU
            out = empty_batch((n_rows, batch.n_cols), batch.values.dtype, in_worker=False)
            indptr, indices, values = (t.as_subclass(torch.Tensor).numpy() for t in batch[:3])
            kernels = get_kernels()
            if kernels.name == "numba" and values.dtype.kind == "f":
                # the dense gather's kernel: zeroes each row right before filling it, in
                # parallel, and sums duplicate (row, column) entries as scipy does
                rows = np.arange(n_rows, dtype=np.int64)
                kernels.csr_to_dense(
                    indptr, indices, values, rows, None, out.as_subclass(torch.Tensor).numpy()
                )
                return out
            if indptr.dtype != indices.dtype:  # scipy wants one index dtype
                indptr, indices = indptr.astype(np.int64), indices.astype(np.int64)
            matrix = sp.csr_matrix(
                (values, indices, indptr), shape=(n_rows, batch.n_cols), copy=False
            )
            # summing duplicate (row, column) entries of a non-canonical CSR, as scipy does
            matrix.toarray(out=out.as_subclass(torch.Tensor).numpy())
            return out
        out = torch.zeros((n_rows, batch.n_cols), dtype=batch.values.dtype, device=batch.device)
        if batch.values.numel():
            counts = batch.indptr[1:] - batch.indptr[:-1]
            rows = torch.repeat_interleave(
                torch.arange(n_rows, device=batch.device), counts, output_size=batch.values.numel()
            )
            # index_add_, not assignment: duplicate (row, column) entries of a non-canonical
            # CSR add up, as in scipy and anndata
            out.view(-1).index_add_(0, rows * batch.n_cols + batch.indices, batch.values)
        return out

    def to_sparse_csr(self) -> torch.Tensor:
        """A ``torch.sparse_csr_tensor`` view of the rows (for sparse matmul in the model)."""
        return torch.sparse_csr_tensor(self.indptr, self.indices, self.values, self.shape)


def densify(batch: Any, device: torch.device | str | None = None) -> Any:
    """Replace every :class:`SparseBatch` inside ``batch`` (tensor, dict, list) by a dense tensor.

    Meant for ``LightningModule.on_after_batch_transfer``::

        def on_after_batch_transfer(self, batch, dataloader_idx):
            return torch_adata.densify(batch)

    Parameters
    ----------
    batch
        A batch as the loader yields it: a tensor, a :class:`SparseBatch`, or a dict, list or
        tuple of them (nested). Other values pass through unchanged.
    device
        Device to densify on (and to move plain tensors to); ``None`` keeps each one where it
        is.

    Returns
    -------
    Any
        The same structure with every :class:`SparseBatch` replaced by a dense tensor.
    """
    if isinstance(batch, SparseBatch):
        return batch.to_dense(device)
    if isinstance(batch, dict):
        return {k: densify(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
        return type(batch)(densify(v, device) for v in batch)
    if isinstance(batch, torch.Tensor) and device is not None:
        return batch.to(device)
    return batch


# -- per-cell samples: what a DataLoader's collate function receives ------------------------
#
# torch's map-style fetcher calls ``dataset.__getitems__(indices)`` and hands the result to the
# loader's ``collate_fn``, which by default expects a list of samples. The datasets gather a
# batch in one vectorised read and return it as such a list: per-cell views of that batch, of
# small private types that torch's ``default_collate`` (and :func:`collate`) turn back into the
# very batch, without re-stacking, when they receive the list unchanged.


class _Row(torch.Tensor):
    """One cell of a batch in a worker's shared-memory ring (see :class:`_SharedRing`), as a
    collate function receives it: a view of the slot that keeps the batch alive (so the slot
    is not reused while the row exists) and pickles as a copy (never as the slot's memory).
    Operations on it return plain tensors."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __reduce_ex__(self, protocol):
        return (identity, (self.as_subclass(torch.Tensor).clone(),))


class _SparseRow(SparseBatch):
    """One cell of a :class:`SparseBatch`: a one-row ``SparseBatch`` over the batch's memory
    (kept alive by a row of a worker's ring batch); pickles as a copy."""

    def __reduce__(self):
        pieces = (t.as_subclass(torch.Tensor).clone() for t in self[:3])
        return (SparseBatch, (*pieces, self.n_cols))


class _Sample(dict):
    """One cell of a dict batch: its fields, as a collate function receives it.

    The keys in ``_shared`` are batch-level (the same tensor in every cell's sample, e.g. a
    time-resolved batch's ``"t_eval"``): collating keeps one of them instead of stacking.
    """

    __slots__ = ("_shared",)

    def __reduce__(self):
        return (dict, (dict(self),))


class _Samples(list):
    """The list of per-cell samples ``__getitems__`` returns, and the batch they view."""

    __slots__ = ("_made", "batch")

    def __reduce__(self):
        return (list, (list(self),))


def _rows(values: Any) -> Sequence[Any]:
    """The per-cell views of one field of a batch: plain tensors, one-row sparse batches, or
    :class:`_Row` for a batch in a worker's shared-memory ring."""
    if isinstance(values, SparseBatch):
        return _sparse_rows(values)
    if not isinstance(values, RingBatch):
        return values.unbind(0)
    rows = [row.as_subclass(_Row) for row in values.as_subclass(torch.Tensor).unbind(0)]
    for row in rows:  # the slot stays busy while any row of it exists
        row._batch = values
    return rows


def _sparse_rows(batch: SparseBatch) -> list[_SparseRow]:
    indptr, indices, values = (
        t if type(t) is torch.Tensor else t.as_subclass(torch.Tensor) for t in batch[:3]
    )
    counts = indptr[1:] - indptr[:-1]
    start, end = int(indptr[0]), int(indptr[-1])
    pieces = zip(
        torch.stack([torch.zeros_like(counts), counts], 1).unbind(0),
        indices[start:end].split(counts.tolist()),
        values[start:end].split(counts.tolist()),
        strict=True,
    )
    new, n_cols = tuple.__new__, batch.n_cols
    rows = [new(_SparseRow, (*piece, n_cols)) for piece in pieces]
    if any(isinstance(t, RingBatch) for t in batch[:3]):
        for row in rows:  # the slot stays busy while any row of it exists
            row._batch = batch
    return rows


def for_fetcher(batch: Any, shared: frozenset[str] = frozenset()) -> Any:
    """What a dataset's ``__getitems__`` returns for ``batch``: the per-cell samples
    (:func:`per_cell`), or ``batch`` itself when the caller is torch's fetcher with
    ``collate_fn=torch_adata.collate``, which would only take the batch back out of them
    (making the samples costs about a microsecond per cell and field)."""
    if fetcher_collate(sys._getframe(2)) is collate:
        return batch
    return per_cell(batch, shared)


def per_cell(batch: Any, shared: frozenset[str] = frozenset()) -> list[Any]:
    """``batch`` as the list of its cells' samples, the form a DataLoader's ``collate_fn``
    expects from ``__getitems__``; collating the list unchanged gives back ``batch`` itself.

    Parameters
    ----------
    batch
        A batch: a tensor, a :class:`SparseBatch` or a dict of them, cells along dim 0.
    shared
        Keys of a dict batch that are batch-level (not per cell): every sample carries the
        same value, and collating keeps it once.
    """
    if isinstance(batch, dict):
        keys = list(batch)
        n = next(
            len(v) if isinstance(v, torch.Tensor) else v.shape[0]
            for k, v in batch.items()
            if k not in shared
        )
        columns = [[batch[k]] * n if k in shared else _rows(batch[k]) for k in keys]
        samples = []
        for values in zip(*columns, strict=True):
            sample = _Sample(zip(keys, values, strict=True))
            sample._shared = shared
            samples.append(sample)
    else:
        samples = _rows(batch)
    out = _Samples(samples)
    out.batch = batch
    out._made = tuple(out)
    return out


def _whole(samples: list) -> bool:
    """Whether ``samples`` is the list :func:`per_cell` made, unchanged (not reordered,
    filtered or extended)."""
    return (
        type(samples) is _Samples
        and len(samples) == len(samples._made)
        and all(map(operator.is_, samples, samples._made))
    )


def _collate_rows(samples, *, collate_fn_map=None):
    if _whole(samples):
        return samples.batch
    out = _torch_collate.collate_tensor_fn(samples, collate_fn_map=collate_fn_map)
    return out if type(out) is torch.Tensor else out.as_subclass(torch.Tensor)


def _collate_sparse(samples, *, collate_fn_map=None):
    """:class:`SparseBatch` pieces (rows or batches) joined into one, in the list's order."""
    if _whole(samples):
        return samples.batch
    n_cols = {s.n_cols for s in samples}
    if len(n_cols) != 1:
        raise ValueError(
            f"Sparse rows of different widths {sorted(n_cols)} cannot be collated into one "
            "batch: they come from datasets with different genes. Batch each dataset apart, "
            "or select the same var_names in every AnnData first."
        )
    wide = any(s.indices.dtype == torch.int64 for s in samples)
    index_dtype = torch.int64 if wide else torch.int32
    indptr, offset = [torch.zeros(1, dtype=index_dtype)], 0
    for s in samples:
        ptr = s.indptr.to(index_dtype)
        indptr.append(ptr[1:] - ptr[0] + offset)
        offset += int(ptr[-1] - ptr[0])
    parts = [(int(s.indptr[0]), int(s.indptr[-1])) for s in samples]
    indices = torch.cat(
        [
            s.indices[a:b].as_subclass(torch.Tensor).to(index_dtype)
            for s, (a, b) in zip(samples, parts, strict=True)
        ]
    )
    values = torch.cat(
        [s.values[a:b].as_subclass(torch.Tensor) for s, (a, b) in zip(samples, parts, strict=True)]
    )
    return SparseBatch(torch.cat(indptr), indices, values, n_cols.pop())


def _collate_dicts(samples, *, collate_fn_map=None):
    if _whole(samples):
        return samples.batch
    first = samples[0]
    shared = getattr(first, "_shared", frozenset())
    return {
        key: first[key]
        if key in shared
        else _torch_collate.collate([s[key] for s in samples], collate_fn_map=collate_fn_map)
        for key in first
    }


def _register_sample_types() -> Any:
    """Teach torch's ``default_collate`` the samples (through ``default_collate_fn_map``, its
    documented extension point); returns torch's collate module (reached through
    :func:`torch_adata._compat.torch_collate_module`), or ``None`` where it has not the expected
    form (then samples are stacked as any, which still gives the batch).

    Rows of a plain tensor are plain tensors (a subclass per row would cost twice as much as
    the views themselves), so the map's tensor entry is wrapped: a list of samples that
    :func:`per_cell` made and nobody changed gives back its batch; any other list goes to the
    entry it wraps, unchanged.
    """
    module = torch_collate_module()
    if module is None:  # pragma: no cover - another torch layout
        return None
    registry = module.default_collate_fn_map
    wrapped = registry.get(torch.Tensor, module.collate_tensor_fn)
    wrapped = getattr(wrapped, "_torch_adata_wraps", wrapped)  # once, also on a reload

    def collate_tensors(batch, *, collate_fn_map=None):
        if type(batch) is _Samples and _whole(batch):
            return batch.batch
        return wrapped(batch, collate_fn_map=collate_fn_map)

    collate_tensors._torch_adata_wraps = wrapped
    registry[torch.Tensor] = collate_tensors
    registry[_Row] = _collate_rows
    registry[_Sample] = _collate_dicts
    registry[_SparseRow] = _collate_sparse
    registry[SparseBatch] = _collate_sparse
    return module


_torch_collate = _register_sample_types()


def collate(batch: Any) -> Any:
    """Collate function for the fast path: gives back the batch the dataset gathered.

    Use it with ``DataLoader(dataset, batch_size=B, shuffle=True, collate_fn=collate)``: the
    loader calls ``dataset.__getitems__(indices)`` once per batch, which gathers the batch in
    one vectorised read and, seeing this collate function, hands over the batch itself instead
    of per-cell samples (PyTorch's default ``collate_fn`` gives the same batch, through a
    little more work per cell). Given the per-cell samples (called from another collate
    function), it returns their batch, or collates them as ``default_collate`` does when the
    list was reordered or filtered; anything else passes through unchanged (a whole batch from
    a batch sampler with ``batch_size=None``).

    Parameters
    ----------
    batch
        What the dataset returned for one batch.

    Returns
    -------
    Any
        The batch.
    """
    if type(batch) is _Samples:
        return batch.batch if _whole(batch) else torch.utils.data.default_collate(batch)
    return batch
