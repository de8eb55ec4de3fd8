"""Batch containers: sparse rows that cross worker processes, densified on the target device,
the allocation of dense batches (in shared memory inside DataLoader workers), and the per-cell
samples a DataLoader's collate function sees."""

from __future__ import annotations

import math
import multiprocessing
import operator
import os
import secrets
import sys
import weakref
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import scipy.sparse as sp
import torch
from torch.utils.data import get_worker_info

from ._kernels import get_kernels

# Batches smaller than this are not worth a ring slot (obs/obsm fields, tiny gene panels).
_RING_MIN_BYTES = 1 << 20
# Slots per buffer size in each worker: the DataLoader keeps at most ``prefetch_factor`` (2 by
# default) batches of a worker in flight and the training loop holds one more; a ring that runs
# dry (a caller that keeps its batches) falls back to fresh shared memory.
_RING_SLOTS = 4
# Ownerless rings (their worker has ended) the main process keeps for the next workers it forks.
_KEPT_RINGS = 8
# Rows of a ring's shared flags: BUSY[slot] (the slot holds a batch the main process may still
# read), MAPPED[slot] (the main process holds the slot's memory), KNOWN[0] (it holds the flags),
# OWNER[0] (pid of the worker that writes into the ring).
_BUSY, _MAPPED, _KNOWN, _OWNER = 0, 1, 2, 3


class _SharedRing:
    """Shared-memory buffers that a worker writes batches into and reuses.

    Fresh shared memory costs a page fault per 4 KiB page on first write (measured 38 ms for a
    20 MB batch, against 2 ms to write memory already mapped), and every shared tensor sent
    through a DataLoader queue passes a file descriptor over a socket, with an authentication
    handshake, on each send (measured 10 ms of the main process per batch). A ring avoids both:
    its slots are mapped once on each side, the main process's batch *is* the slot's memory (no
    copy), and after the first sends a batch crosses as a few integers. The slot stays busy until
    the main process has dropped every tensor that views it; the worker never writes a busy slot.

    A ring outlives its worker: the main process keeps it, and a worker forked later (the next
    epoch's, when workers are not persistent) adopts it instead of mapping fresh memory.
    """

    def __init__(self, nbytes: int, key=None, flags=None, slots=None):
        self.nbytes = nbytes
        self.key = key or (os.getpid(), secrets.token_hex(8))
        if flags is None:
            flags = torch.zeros((4, _RING_SLOTS), dtype=torch.int64).share_memory_()
        self.flags = flags
        self.flags[_OWNER, 0] = os.getpid()
        self.slots: list[torch.UntypedStorage | None] = slots or [None] * _RING_SLOTS

    def claim(self) -> int | None:
        """A free slot (now marked busy), or ``None`` when the main process holds all."""
        free = (self.flags[_BUSY] == 0).nonzero()
        if len(free) == 0:
            return None
        slot = int(free[0])
        if self.slots[slot] is None:
            self.slots[slot] = torch.UntypedStorage._new_shared(self.nbytes)
        self.flags[_BUSY, slot] = 1
        return slot


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - a pid reused by another user's process
        return True
    return True


def _adopt(nbytes: int) -> _SharedRing | None:
    """A ring of ``nbytes`` slots that the parent process kept from an ended worker, now owned
    by this worker; ``None`` when there is none (or this process was not forked from one)."""
    kept = [(key, ring) for key, ring in _RECEIVED.items() if ring.nbytes == nbytes]
    if not kept or not _ADOPTION or not _ADOPTION.acquire(timeout=1.0):
        return None
    try:  # under the parent's lock: two workers (of one loader or two) never share a ring
        for key, received in kept:
            if _alive(int(received.flags[_OWNER, 0])):
                continue
            slots = [received.slots.get(i) for i in range(_RING_SLOTS)]
            return _SharedRing(nbytes, key, received.flags, slots)
        return None
    finally:
        _ADOPTION.release()


_RINGS: dict[int, _SharedRing] = {}
_RINGS_PID: int | None = None


class _RingBatch(torch.Tensor):
    """A batch living in a ring slot of a worker; unpickles in the main process as a plain
    tensor over the slot's memory (see :class:`_SharedRing`).

    A batch used up inside the worker and never sent frees its slot when it is
    garbage-collected. Tensors derived from it (views, results of operations) are sent as
    copies, never as the slot's memory, which the worker will overwrite.
    """

    def __reduce_ex__(self, protocol):
        state = getattr(self, "_ring_state", None)
        plain = self.as_subclass(torch.Tensor)
        if state is None or state[2]:  # derived from a batch, or sent already: a copy
            return (_identity, (plain.clone(),))
        ring, slot, _ = state
        state[2] = True  # from now on the main process frees the slot
        # the flags and the slot's memory travel (as file descriptors) until the main process
        # says it holds them; then only integers do
        flags = None if ring.flags[_KNOWN, 0] else ring.flags
        storage = None if ring.flags[_MAPPED, slot] else ring.slots[slot]
        args = (ring.key, ring.nbytes, slot, tuple(plain.shape), plain.dtype, flags, storage)
        return (_receive, args)


def _release_unsent(state: list) -> None:
    ring, slot, sent = state
    if not sent:
        ring.flags[_BUSY, slot] = 0


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


class _ReceivedRing:
    """The main process's side of a worker's ring: its flags and the slots' memory."""

    def __init__(self, nbytes: int, flags: torch.Tensor):
        self.nbytes = nbytes
        self.flags = flags
        self.slots: dict[int, torch.UntypedStorage] = {}


_RECEIVED: dict[tuple[int, str], _ReceivedRing] = {}
# Taken by a forked worker while it adopts a ring from _RECEIVED; made by the main process
# when it first receives a ring, so that every worker forked afterwards shares it.
_ADOPTION = None


def _forget_ownerless_rings() -> None:
    """Drop all but the newest ``_KEPT_RINGS`` rings whose worker has ended (batches still in
    use keep their memory alive)."""
    ownerless = [key for key, ring in _RECEIVED.items() if not _alive(int(ring.flags[_OWNER, 0]))]
    for key in ownerless[: max(0, len(ownerless) - _KEPT_RINGS)]:
        del _RECEIVED[key]


class _SlotLease:
    """Owns a slot while the main process uses it: numpy's array interface over the slot's
    bytes, so that ``torch.from_numpy`` ties the batch's storage to this object; the slot is
    marked free only when the last tensor viewing that storage is gone (in this process: a
    forked child's copy of the lease does not free it)."""

    def __init__(self, memory: torch.Tensor, flags: torch.Tensor, slot: int):
        self._memory = memory
        self._flags = flags
        self._slot = slot
        self._pid = os.getpid()
        self.__array_interface__ = {
            "shape": (memory.numel(),),
            "typestr": "|u1",
            "data": (memory.data_ptr(), False),
            "version": 3,
        }

    def __del__(self):
        if os.getpid() != self._pid:
            return
        try:
            self._flags[_BUSY, self._slot] = 0
        except Exception:  # pragma: no cover - interpreter shutdown
            pass


def _receive(key, nbytes, slot, shape, dtype, flags, storage) -> torch.Tensor:
    global _ADOPTION
    ring = _RECEIVED.get(key)
    if ring is None:
        if flags is None:  # pragma: no cover - the worker only omits them once told
            raise RuntimeError("torch_adata: a batch arrived from a worker ring never seen.")
        if _ADOPTION is None:
            try:
                _ADOPTION = multiprocessing.Lock()
            except (ImportError, OSError):  # pragma: no cover - no shared semaphores here
                _ADOPTION = False
        _forget_ownerless_rings()
        ring = _RECEIVED[key] = _ReceivedRing(nbytes, flags)
        flags[_KNOWN, 0] = 1
    if storage is not None:
        ring.slots[slot] = storage
        ring.flags[_MAPPED, slot] = 1
    size = math.prod(shape) * dtype.itemsize
    memory = torch.empty(0, dtype=torch.uint8).set_(ring.slots[slot], 0, (size,))
    owned = torch.from_numpy(np.asarray(_SlotLease(memory, ring.flags, slot)))
    return owned.view(dtype).view(shape)


# Freed batch buffers kept for the next batches of the same size class, in a process that
# is not a DataLoader worker: at most _POOL_KEEP per class, _POOL_CLASSES classes (newest kept).
_POOL: dict[int, list[np.ndarray]] = {}
_POOL_KEEP = 1
_POOL_CLASSES = 8


class _PooledBuffer:
    """Owns a recycled buffer while a batch uses it (numpy's array interface, as
    :class:`_SlotLease`); when the last tensor viewing it is gone, the buffer goes back to the
    pool instead of to the allocator."""

    def __init__(self, buffer: np.ndarray):
        self._buffer = buffer
        self.__array_interface__ = buffer.__array_interface__

    def __del__(self):
        free = _POOL.get(self._buffer.nbytes)
        if free is not None and len(free) < _POOL_KEEP:
            free.append(self._buffer)


def _pooled(nbytes: int, size: int) -> torch.Tensor:
    """``nbytes`` uninitialised bytes (uint8) of a recycled buffer of ``size`` bytes.

    Fresh memory costs a page fault per 4 KiB page on first write, and glibc hands a freed
    block back to the kernel when the free memory at the top of its heap passes a threshold
    that follows the block sizes seen: 2 MB sparse pieces were returned and faulted in again
    on every batch (measured 128k cells/s against 359k in a process whose heap was not
    trimmed). torch's aligned 20 MB allocations came back as fresh pages each time as well.
    """
    free = _POOL.pop(size, None)
    if free is None:
        free = []
        while len(_POOL) >= _POOL_CLASSES:  # forget the size class used least recently
            try:
                del _POOL[next(iter(_POOL))]
            except (StopIteration, KeyError, RuntimeError):  # another thread changed it
                break
    _POOL[size] = free  # (re)inserted last: the most recently used class
    buffer = free.pop() if free else np.empty(size, dtype=np.uint8)
    return torch.from_numpy(np.asarray(_PooledBuffer(buffer))[:nbytes])


class BatchArrays:
    """The numpy arrays a kernel writes one batch into, allocated as views of batch tensors
    (:func:`empty_batch`: reused shared slots in a worker, recycled buffers otherwise), so the
    kernel writes where the batch will live and no copy follows."""

    def __init__(self) -> None:
        self._made: dict[int, tuple[np.ndarray, torch.Tensor]] = {}

    def empty(self, n: int, dtype: np.dtype) -> np.ndarray:
        """An uninitialised 1-d array of ``n`` elements of ``dtype``."""
        tensor = empty_batch((n,), torch.from_numpy(np.empty(0, dtype)).dtype, variable=True)
        array = tensor.numpy()
        self._made[id(array)] = (array, tensor)
        return array

    def tensor(self, array: np.ndarray) -> torch.Tensor:
        """The tensor behind ``array`` when :meth:`empty` made it; otherwise ``array`` as a
        tensor (copied into a reused shared slot in a worker, see :func:`empty_batch`)."""
        made = self._made.get(id(array))
        if made is not None and made[0] is array:
            return made[1]
        tensor = torch.from_numpy(array)
        if get_worker_info() is None:
            return tensor
        out = empty_batch(tuple(tensor.shape), tensor.dtype, variable=True)
        out.copy_(tensor)
        return out


def empty_batch(shape: tuple[int, ...], dtype: torch.dtype, variable: bool = False) -> torch.Tensor:
    """An uninitialised tensor for a batch; inside a DataLoader worker, in shared memory.

    A worker sends its batches to the main process by pickling them; a tensor not already in
    shared memory is first copied there (20 MB for 256 cells x 20,000 genes in float32), into
    freshly allocated pages, and its file descriptor is handed over on every send. Large
    batches are instead written into a small ring of shared buffers that each worker reuses
    (see :class:`_SharedRing`); the main process receives a tensor over the same memory.
    ``variable``: the size changes from batch to batch (sparse rows), so slots are rounded up
    to a power of two and one ring serves every size up to it. Outside a worker, batches of 1
    MiB and more reuse freed batch buffers (the same rounding applies to their size classes).
    """
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < _RING_MIN_BYTES:
        return torch.empty(shape, dtype=dtype)
    size = 1 << (nbytes - 1).bit_length() if variable else nbytes
    if get_worker_info() is None:  # the training process: a recycled buffer
        return _pooled(nbytes, size).view(dtype).view(shape)
    global _RINGS, _RINGS_PID
    if _RINGS_PID != os.getpid():  # a forked worker does not reuse its parent's rings
        _RINGS, _RINGS_PID = {}, os.getpid()
    ring = _RINGS.get(size)
    if ring is None:
        ring = _RINGS[size] = _adopt(size) or _SharedRing(size)
    slot = ring.claim()
    if slot is None:
        storage = torch.UntypedStorage._new_shared(size)
        return torch.empty(0, dtype=dtype).set_(storage, 0, shape)
    out = torch.empty(0, dtype=dtype).set_(ring.slots[slot], 0, shape).as_subclass(_RingBatch)
    out._ring_state = state = [ring, slot, False]  # ring, slot, sent to the main process
    weakref.finalize(out, _release_unsent, state)
    return out


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
            out = empty_batch((n_rows, batch.n_cols), batch.values.dtype)
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
        return (_identity, (self.as_subclass(torch.Tensor).clone(),))


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
    if not isinstance(values, _RingBatch):
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
    if any(isinstance(t, _RingBatch) for t in batch[:3]):
        for row in rows:  # the slot stays busy while any row of it exists
            row._batch = batch
    return rows


def for_fetcher(batch: Any, shared: frozenset[str] = frozenset()) -> Any:
    """What a dataset's ``__getitems__`` returns for ``batch``: the per-cell samples
    (:func:`per_cell`), or ``batch`` itself when the caller is torch's fetcher with
    ``collate_fn=torch_adata.collate``, which would only take the batch back out of them
    (making the samples costs about a microsecond per cell and field)."""
    if _fetcher_collate(sys._getframe(2)) is collate:
        return batch
    return per_cell(batch, shared)


def _fetcher_collate(frame: Any) -> Any:
    """The ``collate_fn`` of the torch map-style fetcher whose ``fetch`` is ``frame`` or
    reached from it through ``__getitems__`` calls that pass their dataset's result through
    unchanged (``Subset``, and datasets that say so with ``_getitems_passes_through``);
    ``None`` for any other caller, or a torch whose fetcher is not laid out as expected.

    Reads torch's private fetcher frame: the one place that does (see
    :func:`_register_sample_types` for the other private torch use).
    """
    if _FETCH_CODE is None:  # pragma: no cover - another torch layout
        return None
    for _ in range(4):
        if frame is None:
            return None
        if frame.f_code is _FETCH_CODE:
            return getattr(frame.f_locals.get("self"), "collate_fn", None)
        if frame.f_code.co_name != "__getitems__":
            return None
        owner = frame.f_locals.get("self")
        if not (
            type(owner) is torch.utils.data.Subset
            or getattr(owner, "_getitems_passes_through", False)
        ):
            return None
        frame = frame.f_back
    return None


def _fetch_code() -> Any:
    try:
        from torch.utils.data._utils.fetch import _MapDatasetFetcher

        return _MapDatasetFetcher.fetch.__code__
    except (ImportError, AttributeError):  # pragma: no cover - another torch layout
        return None


_FETCH_CODE = _fetch_code()


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
    documented extension point); returns torch's collate module, or ``None`` where it has not
    the expected form (then samples are stacked as any, which still gives the batch).

    Rows of a plain tensor are plain tensors (a subclass per row would cost twice as much as
    the views themselves), so the map's tensor entry is wrapped: a list of samples that
    :func:`per_cell` made and nobody changed gives back its batch; any other list goes to the
    entry it wraps, unchanged.
    """
    try:
        from torch.utils.data._utils import collate as module

        registry = module.default_collate_fn_map
        module.collate, module.collate_tensor_fn  # noqa: B018 - what the fallbacks call
    except (ImportError, AttributeError):  # pragma: no cover - another torch layout
        return None
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
