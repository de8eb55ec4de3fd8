"""Gather rows of a matrix into a batch: the only module that touches X, layers and obsm.

A *reader* wraps one 2-D matrix (dense ndarray, CSR, CSC, or a dense/CSR array inside an
``.h5ad`` file) and answers two questions for an array of row positions:

- :meth:`RowReader.dense`: the rows as a dense ``(len(rows), n_cols)`` numpy array (written
  into ``out`` when given, e.g. a shared-memory batch inside a DataLoader worker), and
- :meth:`RowReader.csr`: the rows as CSR pieces ``(indptr, indices, values)``,

in the requested order, duplicates included. Sparse rows are never densified beyond the batch.

Backed files are opened lazily, read-only, once per process (so readers pickle and work in
DataLoader workers under fork and spawn). Where the file stores ``data``/``indices``
uncompressed (contiguous, or chunked as anndata writes them), runs of rows are read with
``pread`` at their file positions straight into the batch's arrays (positions taken from the
HDF5 layout and checked against h5py when opened; no memory map, so the process's memory does
not grow with the file); otherwise sorted row runs are read as whole chunks with few h5py calls.
"""

from __future__ import annotations

import collections
import os
import threading
import warnings
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from ._kernels import Kernels, get_kernels, index_dtype, read_ranges_threadsafe
from ._page_cache import resident

# Row runs closer than this many stored elements are read as one h5py call (reading the gap).
_RUN_GAP = 4096

# HDF5's chunk cache, per dataset read through h5py (compressed files): large enough to hold
# the chunks of a block-shuffle pool (16 batches x 256 cells from 64-row blocks, ~35 MB of
# chunks per array for 2,000 values per cell), so each chunk is decompressed once per pool
# instead of once per batch. Least recently used chunks go first (w0=0): every chunk is read
# whole, and HDF5's default would evict exactly those first. Memory only fills as chunks are
# read; files read directly (uncompressed) never use it.
_CHUNK_CACHE = {"rdcc_nbytes": 64 << 20, "rdcc_nslots": 10007, "rdcc_w0": 0.0}


@dataclass
class CSRPieces:
    """A batch of sparse rows: ``values[indptr[i]:indptr[i+1]]`` sit at columns ``indices[...]``."""

    indptr: np.ndarray
    indices: np.ndarray
    values: np.ndarray
    n_cols: int

    @classmethod
    def from_scipy(cls, matrix, dtype) -> CSRPieces:
        """The pieces of a scipy CSR matrix, indices as :func:`~torch_adata._kernels.index_dtype`."""
        index = index_dtype(matrix.shape[1], matrix.nnz)
        return cls(
            matrix.indptr.astype(index, copy=False),
            matrix.indices.astype(index, copy=False),
            matrix.data.astype(dtype, copy=False),
            matrix.shape[1],
        )

    def to_scipy(self) -> sp.csr_matrix:
        """The rows as a scipy CSR matrix (sharing the arrays)."""
        n_rows = len(self.indptr) - 1
        return sp.csr_matrix((self.values, self.indices, self.indptr), shape=(n_rows, self.n_cols))


class RowReader:
    """Base class: reads rows of one matrix. Subclasses implement the storage-specific part."""

    shape: tuple[int, int]
    engine: str = "auto"

    @property
    def kernels(self) -> Kernels:
        return get_kernels(self.engine)

    def dense(self, rows: np.ndarray, dtype: np.dtype, out: np.ndarray | None = None) -> np.ndarray:
        """The rows as a dense array of ``dtype``, written into ``out`` when it is given."""
        raise NotImplementedError

    def csr(self, rows: np.ndarray, dtype: np.dtype, alloc: Callable = np.empty) -> CSRPieces:
        """The rows as CSR pieces of ``dtype`` values; ``alloc(n, dtype)`` makes the index and
        value arrays where a reader writes them itself."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Do the one-off set-up of reading (once per file) before workers fork; default none."""

    def prefetch(self, rows: np.ndarray) -> None:
        """Start reading ``rows`` into the page cache in the background, for batches to come;
        returns at once. Only backed files read directly do anything (default: nothing)."""

    def describe(self) -> str:
        """One line that says what this reader reads and how (shown in ``repr(dataset)``)."""
        return type(self).__name__


# --------------------------------------------------------------------------- in memory


class _DenseRowsReader(RowReader):
    """Base of readers whose rows come out dense: column selection and CSR from the dense rows."""

    cols: np.ndarray | None

    def _finish(self, block: np.ndarray, dtype, out: np.ndarray | None) -> np.ndarray:
        if self.cols is not None:
            block = block[:, self.cols]
        if out is None:
            return np.ascontiguousarray(block, dtype=dtype)
        out[...] = block
        return out

    def csr(self, rows, dtype, alloc=np.empty):
        return CSRPieces.from_scipy(sp.csr_matrix(self.dense(rows, dtype)), dtype)


class DenseReader(_DenseRowsReader):
    """Rows of an in-memory dense array (``np.take``; columns selected after the take)."""

    def __init__(self, array: np.ndarray, cols: np.ndarray | None = None):
        self.array = array
        self.cols = cols
        n_cols = array.shape[1] if cols is None else len(cols)
        self.shape = (array.shape[0], n_cols)

    def dense(self, rows, dtype, out=None):
        if out is not None and self.cols is None and out.dtype == self.array.dtype:
            return np.take(self.array, rows, axis=0, out=out)
        return self._finish(np.take(self.array, rows, axis=0), dtype, out)

    def describe(self):
        return f"dense {self.array.dtype} array in memory"


class CSRReader(RowReader):
    """Rows of an in-memory CSR matrix, gathered straight from ``indptr/indices/data``."""

    def __init__(
        self,
        matrix: sp.spmatrix | sp.sparray,
        col_map: np.ndarray | None = None,
        n_cols: int | None = None,
        engine: str = "auto",
    ):
        self.indptr = matrix.indptr
        self.indices = matrix.indices
        self.data = matrix.data
        self.col_map = col_map
        self.engine = engine
        self.shape = (matrix.shape[0], matrix.shape[1] if n_cols is None else n_cols)

    def dense(self, rows, dtype, out=None):
        if out is None:
            out = np.empty((len(rows), self.shape[1]), dtype=dtype)  # the kernel zeroes it
        return self.kernels.csr_to_dense(
            self.indptr, self.indices, self.data, rows, self.col_map, out
        )

    def csr(self, rows, dtype, alloc=np.empty):
        indptr, indices, values = self.kernels.csr_to_csr(
            self.indptr,
            self.indices,
            self.data,
            rows,
            self.col_map,
            np.dtype(dtype),
            self.shape[1],
            alloc,
        )
        return CSRPieces(indptr, indices, values, self.shape[1])

    def describe(self):
        return f"CSR {self.data.dtype} in memory ({self.kernels.name} kernel)"


class ScipyReader(RowReader):
    """Rows of any other in-memory sparse matrix (CSC, COO...) through scipy's own indexing.

    Slower than CSR: row access to a column-compressed matrix has to visit every column.
    """

    def __init__(self, matrix, cols: np.ndarray | None = None):
        self.matrix = matrix.tocsc() if matrix.format not in ("csc", "csr") else matrix
        self.cols = cols
        n_cols = matrix.shape[1] if cols is None else len(cols)
        self.shape = (matrix.shape[0], n_cols)

    def _rows(self, rows):
        block = self.matrix[rows]
        if self.cols is not None:
            block = block[:, self.cols]
        return sp.csr_matrix(block)

    def dense(self, rows, dtype, out=None):
        block = self._rows(rows).toarray()
        if out is None:
            return block.astype(dtype, copy=False)
        out[...] = block
        return out

    def csr(self, rows, dtype, alloc=np.empty):
        m = self._rows(rows)
        m.sort_indices()
        return CSRPieces.from_scipy(m, dtype)

    def describe(self):
        return f"{self.matrix.format.upper()} {self.matrix.dtype} in memory (scipy indexing)"


# --------------------------------------------------------------------------- backed files


class _LazyFile:
    """An h5py file opened read-only on first use in each process, never pickled."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self._pid: int | None = None
        self._file = None

    def get(self):
        import h5py

        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r", **_CHUNK_CACHE)
            self._pid = os.getpid()
        return self._file

    def __getstate__(self):
        return {"path": self.path, "_pid": None, "_file": None}


def _storage_layout(dataset) -> tuple[np.ndarray, int] | None:
    """Where an uncompressed h5py dataset's elements lie in its file, or ``None`` if unknown.

    Returns ``(chunk_base, chunk_len)``: element ``e`` starts at byte ``chunk_base[e //
    chunk_len] + (e % chunk_len) * itemsize`` of the file. Contiguous storage is one chunk.
    """
    if dataset.size == 0 or dataset.compression is not None or dataset.dtype.kind not in "iuf":
        return None
    if dataset.dtype.byteorder not in ("=", "|", "<" if np.little_endian else ">"):
        return None  # stored in the other byte order: let h5py convert it
    if dataset.id.get_create_plist().get_nfilters() > 0:
        return None
    if dataset.chunks is None:
        offset = dataset.id.get_offset()
        if offset is None:
            return None
        return np.array([offset], dtype=np.int64), int(dataset.size)
    chunk_len = int(dataset.chunks[0])
    n_chunks = -(-dataset.size // chunk_len)
    base = np.full(n_chunks, -1, dtype=np.int64)

    def visit(info):
        if info.byte_offset is None or info.filter_mask:
            return
        base[info.chunk_offset[0] // chunk_len] = info.byte_offset

    try:
        dataset.id.chunk_iter(visit)
    except AttributeError:  # older HDF5: one call per chunk
        for c in range(n_chunks):
            visit(dataset.id.get_chunk_info_by_coord((c * chunk_len,)))
    if (base < 0).any():
        return None
    return base, chunk_len


def _verify_layout(dataset, layout, fd: int, kernels: Kernels, n_checks: int = 64) -> bool:
    """Compare elements read at the computed file positions with h5py's reads of them."""
    base, chunk_len = layout
    n = dataset.size
    rng = np.random.default_rng(0)
    probe = np.unique(np.concatenate([[0, n - 1], rng.integers(0, n, n_checks)]))
    ones = np.ones(len(probe), dtype=np.int64)
    direct = np.empty(len(probe), dtype=dataset.dtype)
    try:
        kernels.read_ranges(fd, base, chunk_len, probe, ones, np.arange(len(probe)), direct)
    except OSError:
        return False
    via_h5 = np.array([dataset[int(e)] for e in probe], dtype=dataset.dtype)
    return bool(np.array_equal(direct, via_h5))


class _ReadOnlyDescriptor:
    """An OS file descriptor opened read-only in one process, closed with this object."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))

    def __del__(self):
        try:
            os.close(self.fd)
        except (OSError, TypeError, AttributeError):  # interpreter shutdown
            pass


def _file_id(path: str) -> tuple[int, int, int, int]:
    """Identifies a file's contents: a layout read earlier holds only for the same one."""
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _row_runs(sorted_rows: np.ndarray, starts: np.ndarray, ends: np.ndarray, gap: int):
    """Merge sorted row ranges ``[starts, ends)`` into read runs; return run bounds in elements."""
    if len(sorted_rows) == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    breaks = np.flatnonzero(starts[1:] - ends[:-1] > gap) + 1
    run_first = np.concatenate([[0], breaks])
    run_last = np.concatenate([breaks - 1, [len(sorted_rows) - 1]])
    return starts[run_first], ends[run_last]


def _scratch(local: threading.local, n: int, *dtypes: np.dtype) -> list[np.ndarray]:
    """Arrays of ``n`` elements of each dtype, reused by this thread (grown when too small)."""
    held = getattr(local, "arrays", None)
    if held is None or held[0].shape[0] < n:
        size = max(n, 1) + max(n, 1) // 4  # headroom: batch sizes in non-zeros vary
        held = local.arrays = [np.empty(size, dtype=dt) for dt in dtypes]
    return [a[:n] for a in held]


def read_whole(dataset, path: str, engine: str = "auto", piece: int = 1 << 20) -> np.ndarray:
    """All of a 1-d h5py dataset, in memory.

    Where the file stores it uncompressed, it is read with ``pread`` straight into one array at
    the positions of its HDF5 layout (checked against h5py first), in pieces read in parallel;
    h5py's own chunked read of a 1.5 GB matrix leaves about 35 MB of buffers behind. Otherwise
    h5py reads it. ``piece``: elements per parallel read (at least one chunk).
    """
    out = np.empty(dataset.shape, dtype=dataset.dtype)
    if out.size == 0:
        return out
    layout = _storage_layout(dataset) if dataset.ndim == 1 and hasattr(os, "pread") else None
    if layout is not None:
        kernels = get_kernels(engine)
        descriptor = _ReadOnlyDescriptor(path)
        if _verify_layout(dataset, layout, descriptor.fd, kernels):
            base, chunk_len = layout
            step = max(chunk_len, piece)
            starts = np.arange(0, out.size, step, dtype=np.int64)
            lengths = np.minimum(step, out.size - starts)
            kernels.read_ranges(descriptor.fd, base, chunk_len, starts, lengths, starts, out)
            return out
    dataset.read_direct(out)
    return out


# Read-ahead (direct reads): windows of this many stored elements around rows a batch not found
# in the page cache reads together (a block-shuffle pool nobody announced ahead, see
# BackedCSRReader.prefetch; a window reads about twice a pool's own data, so a batch found in
# the page cache announces none); the last ones announced are remembered so that each is
# announced once per pool.
# Few are kept (256 windows: ~256 MB of a file of float32 values and int32 indices): a window
# remembered long ago may have left the page cache since, and would never be announced again
# (with 1,024, a 1.5 GB file's second cold pass of block shuffling fell from 20k to 10k cells/s).
_WINDOW = 1 << 17
_WINDOWS_KEPT = 256


# Concurrent reads (direct reads, rows not in the page cache): a batch whose rows form at least
# this many separate runs has its reads issued from up to this many threads at once, so the disk
# sees a queue of reads instead of one after another (a file on SSD: 12.6k random 16 KiB
# reads/s at queue depth 1, 39.8k at depth 32). A few runs are first probed without waiting
# (``RWF_NOWAIT``): a batch found in the page cache is read as before, on the calling thread.
_IO_THREADS = 32
_CONCURRENT_MIN_RUNS = 16
_PROBES = 4

_POOLS: dict[str, ThreadPoolExecutor] = {}
_POOLS_PID: int | None = None
_POOL_LOCK = threading.Lock()


def check_io_threads(io_threads: Any) -> int | None:
    """``io_threads`` checked: ``None`` or a whole number >= 1 (at most :data:`_IO_THREADS`
    are used)."""
    if io_threads is not None and (
        not isinstance(io_threads, (int, np.integer))
        or isinstance(io_threads, bool)
        or io_threads < 1
    ):
        raise ValueError(
            f"io_threads must be None (automatic) or a whole number >= 1, got "
            f"{io_threads!r}; use 1 to read one run after another."
        )
    return None if io_threads is None else int(io_threads)


def _thread_pool(name: str, threads: int) -> ThreadPoolExecutor:
    """This process's pool ``name`` of ``threads`` threads (made on first use; a forked child
    makes its own, as the parent's threads do not exist in it)."""
    global _POOLS_PID
    with _POOL_LOCK:
        if _POOLS_PID != os.getpid():
            _POOLS.clear()
            _POOLS_PID = os.getpid()
        pool = _POOLS.get(name)
        if pool is None:
            pool = _POOLS[name] = ThreadPoolExecutor(threads, thread_name_prefix=name)
        return pool


def _io_pool() -> ThreadPoolExecutor:
    """This process's reader threads."""
    return _thread_pool("torch_adata-io", _IO_THREADS)


def _new_pool_lock() -> None:
    global _POOL_LOCK
    _POOL_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_new_pool_lock)


def _cached(fd: int, layout: tuple, itemsize: int, run_starts, run_lengths) -> bool | None:
    """Whether a few of the runs (spread over the batch) are in the page cache; ``None`` where
    that cannot be asked.

    Asked without reading (:func:`._page_cache.resident`: ``cachestat``, else ``mincore``);
    where neither works, by a read that does not wait for the disk (``RWF_NOWAIT``), which
    starts the kernel's read-ahead after a page that is not cached.
    """
    base, chunk_len = layout
    picks = np.linspace(0, len(run_starts) - 1, _PROBES).astype(np.int64)
    for k in np.unique(picks).tolist():
        start = int(run_starts[k])
        c = start // chunk_len
        # the run's first page at most: enough to tell, and cheap for long (block) runs
        n = min(int(run_lengths[k]) * itemsize, ((c + 1) * chunk_len - start) * itemsize, 4096)
        position = int(base[c]) + (start - c * chunk_len) * itemsize
        answer = resident(fd, position, n)
        if answer is None:
            answer = _cached_by_reading(fd, position, n)
        if not answer:
            return answer
    return True


def _cached_by_reading(fd: int, position: int, n: int) -> bool | None:
    """Whether bytes ``[position, position + n)`` are cached, by reading them with
    ``RWF_NOWAIT``; ``None`` where that cannot be asked."""
    flag = getattr(os, "RWF_NOWAIT", None)
    if flag is None:
        return None
    try:
        return os.preadv(fd, [bytearray(n)], position, flag) >= n
    except BlockingIOError:
        return False
    except OSError:  # RWF_NOWAIT unsupported here (old kernel, some file systems)
        return None


def _read_concurrently(
    fd, layouts, outs, run_starts, run_lengths, offsets, threads, kernels: Kernels
) -> None:
    """Read the runs into ``outs`` (one per layout) from ``threads`` threads at once, each
    taking a contiguous share of the runs (the reads release the GIL while they wait)."""
    read = read_ranges_threadsafe(kernels.name)
    bounds = np.linspace(0, len(run_starts), threads + 1).astype(np.int64)

    def work(lo: int, hi: int) -> None:
        s, n, o = run_starts[lo:hi], run_lengths[lo:hi], offsets[lo:hi]
        for (base, chunk_len), out in zip(layouts, outs, strict=True):
            read(fd, base, chunk_len, s, n, o, out)

    pool = _io_pool()
    futures = [
        pool.submit(work, lo, hi)
        for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)
        if hi > lo
    ]
    wait(futures)  # all done before a reader's error is raised: none still writes into `outs`
    for f in futures:
        f.result()  # raises a reader's error (a short read: file truncated)


def _byte_ranges(layout: tuple, itemsize: int, starts: np.ndarray, stops: np.ndarray):
    """File ``(offsets, lengths)`` in bytes of the element ranges ``[starts, stops)`` of a
    dataset stored in chunks (``layout``: see :func:`_storage_layout`), one range per piece of a
    chunk, pieces that follow each other in the file merged."""
    base, chunk_len = layout
    keep = stops > starts
    starts, stops = starts[keep], stops[keep]
    first, last = starts // chunk_len, (stops - 1) // chunk_len
    counts = last - first + 1
    owner = np.repeat(np.arange(len(starts)), counts)
    chunk = (
        first[owner] + np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    )
    lo = np.maximum(starts[owner], chunk * chunk_len)
    hi = np.minimum(stops[owner], (chunk + 1) * chunk_len)
    offsets = base[chunk] + (lo - chunk * chunk_len) * itemsize
    ends = offsets + (hi - lo) * itemsize
    if len(offsets) == 0:
        return offsets, ends
    order = np.argsort(offsets, kind="stable")
    offsets, ends = offsets[order], np.maximum.accumulate(ends[order])
    new = np.r_[True, offsets[1:] > ends[:-1]]  # a gap before it: a range starts here
    last = np.r_[new[1:], True]
    return offsets[new], ends[last] - offsets[new]


def _advise(fd: int, offsets: np.ndarray, lengths: np.ndarray) -> None:
    """Ask the kernel to start reading these byte ranges into the page cache (it returns once
    the reads are queued; ranges already cached cost nothing)."""
    for offset, length in zip(offsets.tolist(), lengths.tolist(), strict=True):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)


def _local_windows(run_starts: np.ndarray) -> np.ndarray | None:
    """The read-ahead windows of a batch whose runs gather in few of them (as under block
    shuffling), or ``None`` for a scattered batch (uniform shuffling: no locality to exploit)."""
    if not hasattr(os, "posix_fadvise") or len(run_starts) < 4:
        return None
    windows = np.unique(run_starts // _WINDOW)
    if 4 * len(windows) > 3 * len(run_starts):
        return None
    return windows


def _read_ahead(st: _OpenCSR, windows: np.ndarray, itemsizes: tuple[int, int]) -> None:
    """Ask the kernel to start reading the file windows around a batch's rows that were not
    announced lately: the next batches of a block-shuffle pool read other rows of the same
    blocks, which are then already in the page cache (used where the pool was not announced
    ahead, see :meth:`BackedCSRReader.prefetch`)."""
    known = st.read_ahead
    fresh = []
    for w in windows.tolist():
        if w in known:
            known.move_to_end(w)
            continue
        known[w] = None
        if len(known) > _WINDOWS_KEPT:
            known.popitem(last=False)
        fresh.append(w)
    if not fresh:
        return
    starts = np.asarray(fresh, dtype=np.int64) * _WINDOW
    for layout, itemsize in zip(st.layout.layouts, itemsizes, strict=True):
        stops = np.minimum(starts + _WINDOW, len(layout[0]) * layout[1])
        _advise(st.descriptor.fd, *_byte_ranges(layout, itemsize, starts, stops))


def _prefetch_rows(st: _OpenCSR, rows: np.ndarray, itemsizes: tuple[int, int]) -> None:
    """Announce the stored rows ``rows`` (sorted, unique) to the kernel, exactly: each run of
    consecutive rows is one range per dataset. Runs in a hint thread; a hint that fails (the
    file closed meanwhile) is dropped, as the batch's own read reports any real error."""
    indptr = st.layout.indptr
    starts, stops = indptr[rows], indptr[rows + 1]
    first = np.flatnonzero(np.r_[True, starts[1:] != stops[:-1]])
    last = np.r_[first[1:] - 1, len(rows) - 1]
    try:
        for layout, itemsize in zip(st.layout.layouts, itemsizes, strict=True):
            _advise(st.descriptor.fd, *_byte_ranges(layout, itemsize, starts[first], stops[last]))
    except OSError:  # pragma: no cover - best effort
        pass


# Staged pools (direct reads): a pool announced by BackedCSRReader.prefetch is read whole into
# memory, the next one by a background thread while the batches of the current one are
# gathered straight from its buffer: per pool one read per run of consecutive rows (a 64-row
# block: ~550 kB per array) instead of a read per row run per batch, and no copy into per-batch
# scratch. At most this many pools are remembered (the current one and the two announced
# ahead of it), at most two held in memory (the current one and the next), and a pool larger
# than _STAGE_MAX_BYTES is left to the page cache (a default pool of 16 batches x 256 cells of
# 2,000 values: 33 MB per array).
_POOLS_KEPT = 3
_STAGE_MAX_BYTES = 256 << 20


@dataclass
class _Pool:
    """Rows announced together (a block-shuffle pool), and once staged their CSR pieces."""

    #: stored rows, sorted and unique
    rows: np.ndarray
    #: whether the pool fits :data:`_STAGE_MAX_BYTES` (else it is only announced to the kernel)
    fits: bool
    #: the pool's ``(indptr, indices, data)`` in memory: a future (the staging thread's read),
    #: ``None`` until its reading is started
    pieces: Any = None
    #: rows of the pool read so far (the pool is dropped once all were)
    served: int = 0


def _pool_buffers(st: _OpenCSR, nnz: int) -> tuple[np.ndarray, np.ndarray]:
    """``data`` and ``indices`` arrays of ``nnz`` elements for a pool: views of the buffers of a
    dropped pool that nothing reads any more where one is large enough, else of fresh ones
    (kept for reuse).

    Fresh memory costs a page fault per 4 KiB page on first write (a 66 MB pool took longer
    to fault in than to read from the page cache). A buffer is free once the views it last
    handed out are gone (weak references): no pool holds them and no batch gathers from them.
    """
    with st.pools_lock:
        spare = st.spare
        pick = next(
            (
                entry
                for entry in spare
                if entry[0].shape[0] >= nnz and all(ref() is None for ref in entry[2])
            ),
            None,
        )
        if pick is None:
            if len(spare) >= _POOLS_KEPT:
                spare.pop(0)  # one still in use elsewhere: left to its holders
            size = nnz + nnz // 4  # headroom: pools' sizes in non-zeros vary
            pick = [np.empty(size, dtype=st.data.dtype), np.empty(size, st.indices.dtype), []]
            spare.append(pick)
        views = pick[0][:nnz], pick[1][:nnz]
        pick[2] = [weakref.ref(v) for v in views]
        return views


def _stage(st: _OpenCSR, rows: np.ndarray):
    """Read the stored rows ``rows`` (sorted, unique) into a pool's arrays (see
    :func:`_pool_buffers`): one ``pread`` per run of consecutive rows and array, on the calling
    thread (the GIL is released while it waits)."""
    layout = st.layout
    starts = layout.indptr[rows]
    lengths = layout.indptr[rows + 1] - starts
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    nnz = int(indptr[-1])
    data, indices = _pool_buffers(st, nnz)
    if nnz:
        first = np.flatnonzero(np.r_[True, starts[1:] != starts[:-1] + lengths[:-1]])
        read = read_ranges_threadsafe(st.kernels_name)
        for (base, chunk_len), out in zip(layout.layouts, (data, indices), strict=True):
            read(
                st.descriptor.fd,
                base,
                chunk_len,
                starts[first],
                np.add.reduceat(lengths, first),
                indptr[first],
                out,
            )
    return indptr, indices, data


def _places(pool: _Pool, rows: np.ndarray) -> np.ndarray | None:
    """Each of ``rows``' place in ``pool.rows``, or ``None`` unless the pool holds them all."""
    place = np.searchsorted(pool.rows, rows)
    inside = np.minimum(place, len(pool.rows) - 1)
    if (place < len(pool.rows)).all() and (pool.rows[inside] == rows).all():
        return place
    return None


def _from_pools(st: _OpenCSR, rows: np.ndarray):
    """``(indptr, indices, data, order)`` of ``rows`` from the staged pool that holds them all
    (``order``: each row's place in the pool), or ``None`` where no announced pool does.

    Pools announced before that one are dropped (their batches were read), the pool is staged
    if its reading had not started, the next announced pool's reading is started in the
    background, and the pool is dropped once all its rows were read."""
    with st.pools_lock:
        pools = st.pools
        found = next(
            (
                (k, pool, place)
                for k, pool in enumerate(pools)
                if (place := _places(pool, rows)) is not None
            ),
            None,
        )
        if found is None:
            return None
        k, pool, place = found
        if not pool.fits:
            return None
        for _ in range(k):
            pools.popleft()
        stager = _thread_pool("torch_adata-stage", 1)
        if pool.pieces is None:
            pool.pieces = stager.submit(_stage, st, pool.rows)
            st.staged_pools += 1
        if len(pools) > 1 and pools[1].fits and pools[1].pieces is None:
            pools[1].pieces = stager.submit(_stage, st, pools[1].rows)
            st.staged_pools += 1
        pool.served += len(rows)
        if pool.served >= len(pool.rows):
            pools.popleft()
    indptr, indices, data = pool.pieces.result()  # raises a short read's error (truncated file)
    return indptr, indices, data, place.astype(np.int64)


@dataclass
class _CSRLayout:
    """Where a backed CSR matrix's pieces lie: read once, inherited by forked workers, reused
    while the file is unchanged."""

    #: identity of the file it was read from (:func:`_file_id`): a changed file is re-read
    file_id: tuple
    #: the row pointers, in memory
    indptr: np.ndarray
    #: ``(chunk_base, chunk_len)`` of ``data`` and ``indices`` in the file, for direct reads;
    #: ``None``: read through h5py
    layouts: tuple | None
    #: h5py path: compressed data is read as whole chunks of this many elements (else ``None``)
    chunk_len: int | None


@dataclass
class _OpenCSR:
    """A backed CSR matrix opened in one process: its layout and this process's handles."""

    layout: _CSRLayout
    pid: int
    data: Any  # h5py.Dataset
    indices: Any  # h5py.Dataset
    #: the file opened for ``pread`` (direct reads only)
    descriptor: _ReadOnlyDescriptor | None
    #: per-thread scratch buffers the rows are read into
    scratch: threading.local = field(default_factory=threading.local)
    #: file windows already announced to the kernel (see :func:`_read_ahead`), oldest first
    read_ahead: collections.OrderedDict = field(default_factory=collections.OrderedDict)
    #: batches read concurrently (not found in the page cache), for tests and benchmarks
    concurrent_batches: int = 0
    #: the last rows announced by :meth:`BackedCSRReader.prefetch` (a future, done once the
    #: kernel has queued their reads), for tests and benchmarks
    hinted: Any = None
    #: pools announced by :meth:`BackedCSRReader.prefetch`, oldest first (see :func:`_from_pools`)
    pools: collections.deque = field(default_factory=lambda: collections.deque(maxlen=_POOLS_KEPT))
    pools_lock: threading.Lock = field(default_factory=threading.Lock)
    #: the kernels' engine (``"numba"`` or ``"numpy"``), for the staging thread's reads
    kernels_name: str = "numpy"
    #: buffers pools are read into, reused: ``[data, indices, weak references to the views
    #: last handed out]`` (see :func:`_pool_buffers`)
    spare: list = field(default_factory=list)
    #: batches gathered from a staged pool, for tests and benchmarks
    staged_batches: int = 0
    #: pools whose reading was started (see :func:`_from_pools`), for tests and benchmarks
    staged_pools: int = 0


class BackedCSRReader(RowReader):
    """Rows of a CSR matrix stored in an ``.h5ad`` file (``X``, a layer, or an obsm entry).

    ``indptr`` is read into memory once per process. Requested rows are de-duplicated and
    sorted; where the file stores ``data`` and ``indices`` uncompressed, each run of consecutive
    rows is read with ``pread`` straight into the batch's arrays (mode ``"direct"``: file
    positions from the HDF5 layout, checked against h5py at open; the file is never mapped, so
    memory does not grow with it). Otherwise (compressed, or ``direct_reads=False``) runs are read
    as whole chunks through h5py with a chunk cache that holds a block-shuffle pool. The
    caller's order (duplicates included) is restored by the gather kernel.

    ``direct_reads=False`` forces the h5py path. ``io_threads``: how many reads a batch not in
    the page cache has in flight at once in direct mode (``None``: 32, the most; ``1``: one after
    another, on the calling thread).
    """

    def __init__(
        self,
        path,
        key: str,
        shape: tuple[int, int],
        col_map: np.ndarray | None = None,
        n_cols: int | None = None,
        engine: str = "auto",
        direct_reads: bool = True,
        io_threads: int | None = None,
    ):
        self.io_threads = check_io_threads(io_threads)
        self.file = _LazyFile(path)
        self.key = key
        self.col_map = col_map
        self.engine = engine
        self.direct_reads = direct_reads
        self.shape = (shape[0], shape[1] if n_cols is None else n_cols)
        self._state: _OpenCSR | None = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_state"] = None
        return state

    def prepare(self) -> None:
        """Read the file's layout now (``indptr``, where ``data`` and ``indices`` lie, checked
        against h5py), so that DataLoader workers forked later inherit it: each would
        otherwise redo it every epoch (39 ms at 100k cells, ten times that at 1M)."""
        self._open()

    def prefetch(self, rows: np.ndarray) -> None:
        """Start reading the stored rows ``rows`` into the page cache; returns at once.

        Each run of consecutive rows is announced to the kernel as one read per array
        (``posix_fadvise(WILLNEED)``, from a background thread: the kernel queues the reads and
        the disk serves them while earlier batches are gathered). A batch whose rows were
        announced is then found in the page cache and read as such. The page cache is shared,
        so rows announced from the main process serve DataLoader workers too. Nothing happens
        for files read through h5py (compressed) or without ``posix_fadvise`` (macOS, Windows).

        The rows are also remembered as a pool: a batch this process reads whose rows all lie
        in an announced pool is gathered from the pool read whole into memory, and the next
        pool's reading is started in the background (see :func:`_from_pools`). A process that
        only announces (the main process of DataLoader workers) reads no pool.
        """
        if not hasattr(os, "posix_fadvise") or len(rows) == 0:
            return
        st = self._open()
        if st.layout.layouts is None:
            return
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        itemsizes = (st.data.dtype.itemsize, st.indices.dtype.itemsize)
        st.hinted = _thread_pool("torch_adata-hint", 1).submit(_prefetch_rows, st, rows, itemsizes)
        nnz = int((st.layout.indptr[rows + 1] - st.layout.indptr[rows]).sum())
        with st.pools_lock:
            st.pools.append(_Pool(rows, fits=nnz * sum(itemsizes) <= _STAGE_MAX_BYTES))

    def _open(self) -> _OpenCSR:
        """The matrix opened in this process (its layout read once, kept across forks while
        the file is unchanged)."""
        st = self._state
        if st is not None and st.pid == os.getpid():
            return st
        group = self.file.get()[self.key]
        if st is not None and st.layout.file_id == _file_id(self.file.path):
            layout = st.layout  # a forked worker: its parent's layout holds; only handles are new
        else:
            # read through handles dropped before those kept are opened: HDF5 frees the chunks
            # the layout checks read (up to 64 per array) with the last handle, instead of
            # holding them for as long as the file is open (0.35 MiB per file of a collection
            # of 100 small files, up to 64 chunks per array of a large one)
            layout = self._read_layout(group["data"], group["indices"], group["indptr"])
        data, indices = group["data"], group["indices"]
        direct = layout.layouts is not None
        self._state = _OpenCSR(
            layout=layout,
            pid=os.getpid(),
            data=data,
            indices=indices,
            descriptor=_ReadOnlyDescriptor(self.file.path) if direct else None,
            kernels_name=self.kernels.name,
        )
        return self._state

    @property
    def layout(self) -> _CSRLayout:
        """Where the matrix's pieces lie in the file (read on first use)."""
        return self._open().layout

    def _read_layout(self, data, indices, indptr) -> _CSRLayout:
        file_id = _file_id(self.file.path)
        layouts = None
        if self.direct_reads and hasattr(os, "preadv"):
            found = (_storage_layout(data), _storage_layout(indices))
            if found[0] is not None and found[1] is not None:
                descriptor = _ReadOnlyDescriptor(self.file.path)
                fd, k = descriptor.fd, self.kernels
                if _verify_layout(data, found[0], fd, k) and _verify_layout(
                    indices, found[1], fd, k
                ):
                    layouts = found
                else:  # pragma: no cover - would mean an HDF5 layout we do not understand
                    warnings.warn(
                        f"{self.file.path}:{self.key}: reading the file at the positions its "
                        "HDF5 layout gives disagreed with h5py; reading through h5py instead.",
                        RuntimeWarning,
                        stacklevel=2,
                    )
        compressed = data.chunks is not None and data.id.get_create_plist().get_nfilters() > 0
        return _CSRLayout(
            file_id=file_id,
            indptr=indptr[:].astype(np.int64),
            layouts=layouts,
            chunk_len=int(data.chunks[0]) if compressed else None,
        )

    @property
    def mode(self) -> str:
        """``"direct"`` (``pread`` at file positions verified against h5py) or ``"h5py"``."""
        return "direct" if self.layout.layouts is not None else "h5py"

    def _read_rows(self, rows: np.ndarray):
        """Read the stored rows ``rows`` (file positions); return compact CSR pieces and order.

        Each maximal run of consecutive rows is read once: straight into the compact arrays
        (direct mode), or as whole chunks through h5py (compressed/other files), so that a
        block-shuffled batch costs few reads and decompresses each chunk once. The pieces live
        in buffers this thread reuses for its next call (both callers copy them out at once):
        fresh arrays of a few MB per batch would be page-faulted in anew whenever the allocator
        has handed their memory back to the system, as it does in DataLoader workers (measured
        9.8 vs 5.2 ms per batch of 256 x 2,000).
        """
        st = self._open()
        layout = st.layout
        if st.pools and layout.layouts is not None:
            staged = _from_pools(st, np.asarray(rows, dtype=np.int64).reshape(-1))
            if staged is not None:
                st.staged_batches += 1
                return staged
        uniq, inverse = np.unique(rows, return_inverse=True)
        starts = layout.indptr[uniq]
        lengths = layout.indptr[uniq + 1] - starts
        local_indptr = np.zeros(len(uniq) + 1, dtype=np.int64)
        np.cumsum(lengths, out=local_indptr[1:])
        nnz = int(local_indptr[-1])
        data, indices = _scratch(st.scratch, nnz, st.data.dtype, st.indices.dtype)
        k = self.kernels
        if layout.layouts is not None and nnz:
            # rows whose stored values follow each other in the file form one read
            first = np.flatnonzero(np.r_[True, starts[1:] != starts[:-1] + lengths[:-1]])
            run_starts = starts[first]
            run_lengths = np.add.reduceat(lengths, first)
            fd = st.descriptor.fd
            threads = min(self.io_threads or _IO_THREADS, _IO_THREADS, len(first))
            concurrent = threads > 1 and len(first) >= _CONCURRENT_MIN_RUNS
            windows = _local_windows(run_starts)
            # a batch found in the page cache (announced ahead, or a warm file) is read as is
            cached = (
                _cached(fd, layout.layouts[0], data.itemsize, run_starts, run_lengths)
                if concurrent or windows is not None
                else None
            )
            if windows is not None and not cached:
                _read_ahead(st, windows, (data.itemsize, indices.itemsize))
            if concurrent and cached is False:
                st.concurrent_batches += 1
                _read_concurrently(
                    fd,
                    layout.layouts,
                    (data, indices),
                    run_starts,
                    run_lengths,
                    local_indptr[first],
                    threads,
                    k,
                )
            else:
                for (base, chunk_len), out in zip(layout.layouts, (data, indices), strict=True):
                    k.read_ranges(
                        fd, base, chunk_len, run_starts, run_lengths, local_indptr[first], out
                    )
        elif layout.layouts is None:
            ends = starts + lengths
            chunk = layout.chunk_len
            if chunk is None:  # uncompressed: read just the rows (and small gaps between them)
                run_starts, run_ends = _row_runs(uniq, starts, ends, _RUN_GAP)
            else:  # whole chunks: h5py decompresses a chunk whole anyway, so read it once
                size = st.data.size
                run_starts, run_ends = _row_runs(uniq, starts, ends, chunk)
                run_starts = run_starts // chunk * chunk
                run_ends = np.minimum(-(-run_ends // chunk) * chunk, size)
                run_starts, run_ends = _row_runs(run_starts, run_starts, run_ends, 0)
            buf_len = run_ends - run_starts
            buf_data = np.empty(int(buf_len.sum()), dtype=data.dtype)
            buf_indices = np.empty(int(buf_len.sum()), dtype=indices.dtype)
            o = 0
            for s, e in zip(run_starts.tolist(), run_ends.tolist(), strict=True):
                st.data.read_direct(buf_data, np.s_[s:e], np.s_[o : o + e - s])
                st.indices.read_direct(buf_indices, np.s_[s:e], np.s_[o : o + e - s])
                o += e - s
            # positions of each wanted row inside the concatenated run buffer
            run_of_row = np.searchsorted(run_starts, starts, side="right") - 1
            buf_offsets = np.cumsum(buf_len) - buf_len
            src = starts - run_starts[run_of_row] + buf_offsets[run_of_row]
            k.copy_ranges(buf_data, src, lengths, data)
            k.copy_ranges(buf_indices, src, lengths, indices)
        return local_indptr, indices, data, inverse.astype(np.int64).reshape(-1)

    def dense(self, rows, dtype, out=None):
        indptr, indices, data, order = self._read_rows(rows)
        if out is None:
            out = np.empty((len(rows), self.shape[1]), dtype=dtype)  # the kernel zeroes it
        return self.kernels.csr_to_dense(indptr, indices, data, order, self.col_map, out)

    def csr(self, rows, dtype, alloc=np.empty):
        indptr, indices, data, order = self._read_rows(rows)
        p, i, v = self.kernels.csr_to_csr(
            indptr, indices, data, order, self.col_map, np.dtype(dtype), self.shape[1], alloc
        )
        return CSRPieces(p, i, v, self.shape[1])

    def describe(self):
        return f"CSR in {Path(self.file.path).name}:{self.key} (backed, {self.mode})"


class BackedDenseReader(_DenseRowsReader):
    """Rows of a dense array stored in an ``.h5ad`` file, read as sorted runs, reordered after."""

    def __init__(self, path, key: str, shape: tuple[int, int], cols: np.ndarray | None = None):
        self.file = _LazyFile(path)
        self.key = key
        self.cols = cols
        self.shape = (shape[0], shape[1] if cols is None else len(cols))

    def dense(self, rows, dtype, out=None):
        ds = self.file.get()[self.key]
        uniq, inverse = np.unique(rows, return_inverse=True)
        block = np.empty((len(uniq), ds.shape[1]), dtype=ds.dtype)
        ones = np.ones(len(uniq), dtype=np.int64)
        run_starts, run_ends = _row_runs(uniq, uniq, uniq + ones, 0)
        o = 0
        for s, e in zip(run_starts.tolist(), run_ends.tolist(), strict=True):
            ds.read_direct(block, np.s_[s:e], np.s_[o : o + e - s])
            o += e - s
        block = block[inverse.reshape(-1)]
        return self._finish(block, dtype, out)

    def describe(self):
        return f"dense array in {Path(self.file.path).name}:{self.key} (backed)"


class MappedReader(RowReader):
    """Rows of an AnnData view: position ``i`` of the view is row ``row_map[i]`` of its parent."""

    def __init__(self, base: RowReader, row_map: np.ndarray):
        self.base = base
        self.row_map = row_map
        self.shape = (len(row_map), base.shape[1])

    def dense(self, rows, dtype, out=None):
        return self.base.dense(self.row_map[rows], dtype, out)

    def csr(self, rows, dtype, alloc=np.empty):
        return self.base.csr(self.row_map[rows], dtype, alloc)

    def prepare(self):
        self.base.prepare()

    def prefetch(self, rows):
        self.base.prefetch(self.row_map[rows])

    def describe(self):
        return f"{self.base.describe()}, through a view of {len(self.row_map)} rows"


# --------------------------------------------------------------------------- factories


def _col_map(cols: np.ndarray | None, n_cols_in: int) -> np.ndarray | None:
    """Turn a column selection into a map input column -> output column (-1: dropped)."""
    if cols is None:
        return None
    col_map = np.full(n_cols_in, -1, dtype=np.int64)
    col_map[cols] = np.arange(len(cols), dtype=np.int64)
    return col_map


def memory_reader(matrix, cols: np.ndarray | None = None, engine: str = "auto") -> RowReader:
    """A reader over an in-memory matrix: numpy array, scipy sparse matrix/array.

    ``cols`` selects (and orders) output columns, for AnnData views that subset variables.
    CSR with a column selection that repeats a column falls back to scipy indexing.
    """
    if sp.issparse(matrix):
        if matrix.format == "csr" and (cols is None or len(np.unique(cols)) == len(cols)):
            n_cols = None if cols is None else len(cols)
            return CSRReader(matrix, _col_map(cols, matrix.shape[1]), n_cols, engine)
        return ScipyReader(matrix, cols)
    array = np.asarray(matrix)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got an array of shape {array.shape}.")
    return DenseReader(array, cols)


def backed_reader(
    path,
    key: str,
    encoding: str,
    shape: tuple[int, int],
    cols: np.ndarray | None = None,
    engine: str = "auto",
    direct_reads: bool = True,
    io_threads: int | None = None,
) -> RowReader:
    """A reader over the matrix stored at ``key`` of an ``.h5ad`` file.

    ``encoding`` is the element's ``encoding-type`` attribute: ``"csr_matrix"`` or ``"array"``.
    Backed CSC is refused: every row read would touch the whole matrix. ``io_threads``: see
    :class:`BackedCSRReader`.
    """
    if encoding == "csr_matrix":
        if cols is not None and len(np.unique(cols)) != len(cols):
            raise ValueError(
                f"{key}: a view that repeats variables is not supported in backed mode."
            )
        n_cols = None if cols is None else len(cols)
        return BackedCSRReader(
            path, key, shape, _col_map(cols, shape[1]), n_cols, engine, direct_reads, io_threads
        )
    if encoding == "csc_matrix":
        raise ValueError(
            f"{path}:{key} is stored as CSC (column-compressed). Reading rows of a backed CSC "
            "matrix loads the whole matrix, so it is refused. Fix: rewrite the file as CSR, e.g. "
            "`adata = anndata.read_h5ad(path); adata.X = adata.X.tocsr(); "
            "adata.write_h5ad(new_path)` (for a layer: `adata.layers[key] = ....tocsr()`), "
            "or open it in memory with backed=False."
        )
    if encoding in ("array", ""):
        return BackedDenseReader(path, key, shape, cols)
    raise ValueError(
        f"{path}:{key} has encoding {encoding!r}; only dense arrays and CSR matrices can be "
        "batched from a backed file."
    )
