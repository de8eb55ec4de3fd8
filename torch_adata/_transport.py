"""Where a batch's memory comes from, and how it crosses from a DataLoader worker to the
training process.

- In a worker, large batches are written into a small ring of shared-memory buffers that the
  worker reuses (:class:`_SharedRing`); the training process receives a tensor over the same
  memory (no copy) and frees the slot when it drops the batch.
- In the training process, large batches reuse freed batch buffers (:meth:`Transport.pooled`).

All of this state (the worker's rings, the rings received from workers, the lock under which a
worker adopts a ring, the recycled buffers) belongs to one :class:`Transport`, ``TRANSPORT``.
Callers say whether they run in a worker (``in_worker``): the dataset layer knows, this module
does not ask.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import secrets
import weakref

import numpy as np
import torch

from ._compat import new_shared_storage

# Batches smaller than this are not worth a ring slot (obs/obsm fields, tiny gene panels).
RING_MIN_BYTES = 1 << 20
# Slots per buffer size in each worker: the DataLoader keeps at most ``prefetch_factor`` (2 by
# default) batches of a worker in flight and the training loop holds one more; a ring that runs
# dry (a caller that keeps its batches) falls back to fresh shared memory.
RING_SLOTS = 4
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
            flags = torch.zeros((4, RING_SLOTS), dtype=torch.int64).share_memory_()
        self.flags = flags
        self.flags[_OWNER, 0] = os.getpid()
        self.slots: list[torch.UntypedStorage | None] = slots or [None] * RING_SLOTS

    def claim(self) -> int | None:
        """A free slot (now marked busy), or ``None`` when the main process holds all."""
        free = (self.flags[_BUSY] == 0).nonzero()
        if len(free) == 0:
            return None
        slot = int(free[0])
        if self.slots[slot] is None:
            self.slots[slot] = new_shared_storage(self.nbytes)
        self.flags[_BUSY, slot] = 1
        return slot


class _ReceivedRing:
    """The main process's side of a worker's ring: its flags and the slots' memory."""

    def __init__(self, nbytes: int, flags: torch.Tensor):
        self.nbytes = nbytes
        self.flags = flags
        self.slots: dict[int, torch.UntypedStorage] = {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - a pid reused by another user's process
        return True
    return True


class RingBatch(torch.Tensor):
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
            return (identity, (plain.clone(),))
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


def identity(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself: how a copy of a ring batch or row unpickles (a module-level name,
    so pickle finds it)."""
    return tensor


def _receive(key, nbytes, slot, shape, dtype, flags, storage) -> torch.Tensor:
    """Unpickling a ring batch in the main process (a module-level name, so pickle finds it)."""
    return TRANSPORT.receive(key, nbytes, slot, shape, dtype, flags, storage)


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


class _PooledBuffer:
    """Owns a recycled buffer while a batch uses it (numpy's array interface, as
    :class:`_SlotLease`); when the last tensor viewing it is gone, the buffer goes back to its
    pool instead of to the allocator."""

    def __init__(self, buffer: np.ndarray, pool: dict[int, list[np.ndarray]], keep: int):
        self._buffer = buffer
        self._pool = pool
        self._keep = keep
        self.__array_interface__ = buffer.__array_interface__

    def __del__(self):
        free = self._pool.get(self._buffer.nbytes)
        if free is not None and len(free) < self._keep:
            free.append(self._buffer)


class Transport:
    """The owner of every piece of batch-memory state of this process.

    Attributes
    ----------
    rings
        This worker's rings, by slot size (reset in each new process).
    received
        The main process's side of the rings that workers sent batches from, by ring key.
    adoption
        The lock a forked worker takes while it adopts a ring from ``received`` (made by the main
        process when it first receives a ring, so every worker forked afterwards shares it;
        ``False`` where the platform has no shared semaphores).
    pool
        Freed batch buffers of the training process, by size class (most recently used last).
    """

    #: Ownerless rings (their worker has ended) the main process keeps for the next workers.
    kept_rings = 8
    #: Recycled buffers kept per size class, and size classes kept.
    pool_keep = 1
    pool_classes = 8

    def __init__(self) -> None:
        self.rings: dict[int, _SharedRing] = {}
        self._rings_pid: int | None = None
        self.received: dict[tuple[int, str], _ReceivedRing] = {}
        self.adoption = None
        self.pool: dict[int, list[np.ndarray]] = {}

    # -- the worker's side ---------------------------------------------------------------------

    def worker_batch(self, shape: tuple[int, ...], dtype: torch.dtype, size: int) -> torch.Tensor:
        """A tensor in a free slot of this worker's ring of ``size``-byte slots (fresh shared
        memory when every slot is busy)."""
        if self._rings_pid != os.getpid():  # a forked worker does not reuse its parent's rings
            self.rings, self._rings_pid = {}, os.getpid()
        ring = self.rings.get(size)
        if ring is None:
            ring = self.rings[size] = self._adopt(size) or _SharedRing(size)
        slot = ring.claim()
        if slot is None:
            return torch.empty(0, dtype=dtype).set_(new_shared_storage(size), 0, shape)
        out = torch.empty(0, dtype=dtype).set_(ring.slots[slot], 0, shape)
        out = out.as_subclass(RingBatch)
        out._ring_state = state = [ring, slot, False]  # ring, slot, sent to the main process
        weakref.finalize(out, _release_unsent, state)
        return out

    def _adopt(self, nbytes: int) -> _SharedRing | None:
        """A ring of ``nbytes`` slots that the parent process kept from an ended worker, now
        owned by this worker; ``None`` when there is none (or this process was not forked from
        one)."""
        kept = [(key, ring) for key, ring in self.received.items() if ring.nbytes == nbytes]
        if not kept or not self.adoption or not self.adoption.acquire(timeout=1.0):
            return None
        try:  # under the parent's lock: two workers (of one loader or two) never share a ring
            for key, received in kept:
                if _alive(int(received.flags[_OWNER, 0])):
                    continue
                slots = [received.slots.get(i) for i in range(RING_SLOTS)]
                return _SharedRing(nbytes, key, received.flags, slots)
            return None
        finally:
            self.adoption.release()

    # -- the main process's side ---------------------------------------------------------------

    def receive(self, key, nbytes, slot, shape, dtype, flags, storage) -> torch.Tensor:
        """The main process's tensor over a worker's ring slot (see :class:`RingBatch`)."""
        ring = self.received.get(key)
        if ring is None:
            if flags is None:  # pragma: no cover - the worker only omits them once told
                raise RuntimeError("torch_adata: a batch arrived from a worker ring never seen.")
            if self.adoption is None:
                try:
                    self.adoption = multiprocessing.Lock()
                except (ImportError, OSError):  # pragma: no cover - no shared semaphores here
                    self.adoption = False
            self._forget_ownerless_rings()
            ring = self.received[key] = _ReceivedRing(nbytes, flags)
            flags[_KNOWN, 0] = 1
        if storage is not None:
            ring.slots[slot] = storage
            ring.flags[_MAPPED, slot] = 1
        size = math.prod(shape) * dtype.itemsize
        memory = torch.empty(0, dtype=torch.uint8).set_(ring.slots[slot], 0, (size,))
        owned = torch.from_numpy(np.asarray(_SlotLease(memory, ring.flags, slot)))
        return owned.view(dtype).view(shape)

    def _forget_ownerless_rings(self) -> None:
        """Drop all but the newest ``kept_rings`` rings whose worker has ended (batches still in
        use keep their memory alive)."""
        received = self.received
        ownerless = [k for k, ring in received.items() if not _alive(int(ring.flags[_OWNER, 0]))]
        for key in ownerless[: max(0, len(ownerless) - self.kept_rings)]:
            del received[key]

    def pooled(self, nbytes: int, size: int) -> torch.Tensor:
        """``nbytes`` uninitialised bytes (uint8) of a recycled buffer of ``size`` bytes.

        Fresh memory costs a page fault per 4 KiB page on first write, and glibc hands a freed
        block back to the kernel when the free memory at the top of its heap passes a threshold
        that follows the block sizes seen: 2 MB sparse pieces were returned and faulted in again
        on every batch (measured 128k cells/s against 359k in a process whose heap was not
        trimmed). torch's aligned 20 MB allocations came back as fresh pages each time as well.
        """
        pool = self.pool
        free = pool.pop(size, None)
        if free is None:
            free = []
            while len(pool) >= self.pool_classes:  # forget the size class used least recently
                try:
                    del pool[next(iter(pool))]
                except (StopIteration, KeyError, RuntimeError):  # another thread changed it
                    break
        pool[size] = free  # (re)inserted last: the most recently used class
        buffer = free.pop() if free else np.empty(size, dtype=np.uint8)
        return torch.from_numpy(np.asarray(_PooledBuffer(buffer, pool, self.pool_keep))[:nbytes])


#: The one owner of this process's batch-memory state.
TRANSPORT = Transport()


def empty_batch(
    shape: tuple[int, ...], dtype: torch.dtype, *, in_worker: bool, variable: bool = False
) -> torch.Tensor:
    """An uninitialised tensor for a batch; inside a DataLoader worker, in shared memory.

    A worker sends its batches to the main process by pickling them; a tensor not already in
    shared memory is first copied there (20 MB for 256 cells x 20,000 genes in float32), into
    freshly allocated pages, and its file descriptor is handed over on every send. Large
    batches are instead written into a small ring of shared buffers that each worker reuses
    (see :class:`_SharedRing`); the main process receives a tensor over the same memory.

    Parameters
    ----------
    shape, dtype
        Of the tensor.
    in_worker
        Whether this runs in a DataLoader worker process (the dataset layer knows).
    variable
        The size changes from batch to batch (sparse rows), so slots are rounded up to a power
        of two and one ring serves every size up to it. Outside a worker, batches of 1 MiB and
        more reuse freed batch buffers (the same rounding applies to their size classes).
    """
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < RING_MIN_BYTES:
        return torch.empty(shape, dtype=dtype)
    size = 1 << (nbytes - 1).bit_length() if variable else nbytes
    if not in_worker:  # the training process: a recycled buffer
        return TRANSPORT.pooled(nbytes, size).view(dtype).view(shape)
    return TRANSPORT.worker_batch(shape, dtype, size)


class BatchArrays:
    """The numpy arrays a kernel writes one batch into, allocated as views of batch tensors
    (:func:`empty_batch`: reused shared slots in a worker, recycled buffers otherwise), so the
    kernel writes where the batch will live and no copy follows.

    Parameters
    ----------
    in_worker
        Whether this runs in a DataLoader worker process.
    """

    def __init__(self, in_worker: bool) -> None:
        self.in_worker = in_worker
        self._made: dict[int, tuple[np.ndarray, torch.Tensor]] = {}

    def empty(self, n: int, dtype: np.dtype) -> np.ndarray:
        """An uninitialised 1-d array of ``n`` elements of ``dtype``."""
        torch_dtype = torch.from_numpy(np.empty(0, dtype)).dtype
        tensor = empty_batch((n,), torch_dtype, in_worker=self.in_worker, variable=True)
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
        if not self.in_worker:
            return tensor
        shape = tuple(tensor.shape)
        out = empty_batch(shape, tensor.dtype, in_worker=True, variable=True)
        out.copy_(tensor)
        return out
