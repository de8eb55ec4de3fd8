"""The public batch types: sparse rows that cross worker processes (:class:`SparseBatch`),
densified on the target device (:func:`densify`), and the pass-through :func:`collate`.

Where a batch's memory comes from (shared-memory rings in DataLoader workers, recycled buffers
in the training process) is :mod:`torch_adata._transport`'s concern.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch


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


def collate(batch: Any) -> Any:
    """Collate function for a dataset that already returns whole batches: returns it unchanged.

    Use it with ``DataLoader(dataset, batch_size=B, shuffle=True, collate_fn=collate)``: the
    loader then calls ``dataset.__getitems__(indices)`` once per batch and passes the result
    through, instead of splitting and re-stacking rows.

    Parameters
    ----------
    batch
        What the dataset's ``__getitems__`` returned for one batch.

    Returns
    -------
    Any
        ``batch``, unchanged.
    """
    return batch
