"""Batch containers: sparse rows that cross worker processes, densified on the target device,
and the allocation of dense batches (in shared memory inside DataLoader workers)."""

from __future__ import annotations

import math
import os
import weakref
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import get_worker_info

# Batches smaller than this are not worth a ring slot (obs/obsm fields, tiny gene panels).
_RING_MIN_BYTES = 1 << 20
# Slots per buffer size in each worker: the DataLoader keeps at most ``prefetch_factor`` (2 by
# default) batches of a worker in flight; a ring that runs dry falls back to fresh memory.
_RING_SLOTS = 4


class _SharedRing:
    """Shared-memory buffers that a worker writes batches into and reuses.

    Fresh shared memory costs a page fault per 4 KiB page on first write: measured 38 ms for a
    20 MB batch, against 2 ms to write memory already mapped. The main process copies each
    received batch out of its slot into its own memory and then marks the slot free, so the
    worker can refill it; a slot is never written while the main process may still read it.
    """

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self.busy = torch.zeros(_RING_SLOTS, dtype=torch.uint8).share_memory_()
        self.slots: list[torch.UntypedStorage | None] = [None] * _RING_SLOTS

    def claim(self) -> int | None:
        """A free slot (now marked busy), or ``None`` when the main process holds all."""
        free = (self.busy == 0).nonzero()
        if len(free) == 0:
            return None
        slot = int(free[0])
        if self.slots[slot] is None:
            self.slots[slot] = torch.UntypedStorage._new_shared(self.nbytes)
        self.busy[slot] = 1
        return slot


_RINGS: dict[int, _SharedRing] = {}
_RINGS_PID: int | None = None


class _RingBatch(torch.Tensor):
    """A batch living in a ring slot of a worker; unpickles as a plain tensor (a copy).

    Its slot stays busy until the main process has copied it out; a batch used up inside the
    worker and never sent frees its slot when it is garbage-collected. Tensors derived from it
    (views, results of operations) are sent as copies, never as the slot's memory, which the
    worker will overwrite.
    """

    def __reduce_ex__(self, protocol):
        state = getattr(self, "_ring_state", None)
        plain = self.as_subclass(torch.Tensor)
        if state is None or state[2]:  # derived from a batch, or sent already: a copy
            return (_identity, (plain.clone(),))
        ring, slot, _ = state
        state[2] = True  # from now on the main process frees the slot
        return (_copy_out_of_slot, (plain, ring.busy, (os.getpid(), ring.nbytes, slot)))


def _release_unsent(state: list) -> None:
    ring, slot, sent = state
    if not sent:
        ring.busy[slot] = 0


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


# Main process: the slots received last, kept mapped. torch finds a storage that is still
# alive by its file when the worker sends it again, instead of mapping (and page-faulting) the
# 20 MB afresh: measured 7 ms per batch without this.
_RECEIVED: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
_RECEIVED_MAX = 2 * _RING_SLOTS  # two workers; more only cost a fresh map


def _copy_out_of_slot(tensor: torch.Tensor, busy: torch.Tensor, key: tuple) -> torch.Tensor:
    out = torch.empty_like(tensor, memory_format=torch.contiguous_format)
    out.copy_(tensor)
    busy[key[2]] = 0  # the worker may now refill the slot
    _RECEIVED.pop(key, None)
    _RECEIVED[key] = (tensor, busy)
    while len(_RECEIVED) > _RECEIVED_MAX:  # slots of workers that have ended
        _RECEIVED.pop(next(iter(_RECEIVED)))
    return out


def _private_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    # numpy's allocation, not torch.empty: glibc then reuses the previous batch's freed pages,
    # while torch's aligned allocations of 20 MB came back as fresh pages, faulted in one by
    # one (measured 14 ms vs 3 ms per 20 MB batch written).
    return torch.from_numpy(np.empty(shape, dtype=torch.empty((), dtype=dtype).numpy().dtype))


def empty_batch(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor for a batch; inside a DataLoader worker, in shared memory.

    A worker sends its batches to the main process by pickling them; a tensor not already in
    shared memory is first copied there (20 MB for 256 cells x 20,000 genes in float32), into
    freshly allocated pages. Large batches are instead written into a small ring of shared
    buffers that each worker reuses (see :class:`_SharedRing`); the main process receives a
    plain tensor of its own.
    """
    if get_worker_info() is None:
        return _private_empty(shape, dtype)
    global _RINGS, _RINGS_PID
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < _RING_MIN_BYTES:
        return _private_empty(shape, dtype)
    if _RINGS_PID != os.getpid():  # a forked worker does not reuse its parent's rings
        _RINGS, _RINGS_PID = {}, os.getpid()
    ring = _RINGS.get(nbytes)
    if ring is None:
        ring = _RINGS[nbytes] = _SharedRing(nbytes)
    slot = ring.claim()
    if slot is None:
        storage = torch.UntypedStorage._new_shared(nbytes)
        return torch.empty(0, dtype=dtype).set_(storage, 0, shape)
    out = torch.empty(0, dtype=dtype).set_(ring.slots[slot], 0, shape).as_subclass(_RingBatch)
    out._ring_state = state = [ring, slot, False]  # ring, slot, sent to the main process
    weakref.finalize(out, _release_unsent, state)
    return out


class SparseBatch(NamedTuple):
    """Rows of a sparse matrix as plain CSR tensors.

    Plain tensors pickle across DataLoader worker processes (sparse torch tensors do not), pin,
    and move to a device with Lightning's batch transfer. Call :meth:`to_dense` (or
    :func:`densify` on a whole batch) after the transfer, e.g. in
    ``LightningModule.on_after_batch_transfer``, so only the non-zeros travel to the GPU.

    Attributes
    ----------
    indptr
        int64, shape ``(batch + 1,)``: row ``i`` owns ``values[indptr[i]:indptr[i + 1]]``.
    indices
        int64, column of each stored value.
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
