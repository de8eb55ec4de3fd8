"""Row-gather kernels: CSR rows to a dense block, CSR rows to CSR pieces, byte ranges to a buffer.

Two implementations with one signature each: a compiled one (numba, parallel over rows) and a
vectorised numpy fallback. :func:`get_kernels` picks one. Nothing here knows about AnnData; the
readers in :mod:`torch_adata._gather` call these functions.

Conventions
-----------
``rows`` are positions into ``indptr`` (int64, any order, duplicates allowed); output row ``i``
is input row ``rows[i]``. ``csr_to_dense`` overwrites every element of ``out`` (it need not be
zeroed beforehand). ``col_map`` is either ``None`` (keep every column) or an int64 array of
length ``n_cols_in`` giving each input column's output column, ``-1`` to drop it (used for
AnnData views that subset genes). ``csr_to_csr`` returns ``indptr`` and column ``indices``
as :func:`index_dtype` says: int32 where the output's columns and non-zeros fit, as scipy does;
its ``alloc(n, dtype)`` (default :func:`numpy.empty`) makes the index and value arrays.

``read_ranges`` copies element ranges of a dataset stored uncompressed in a file straight into
an output buffer with ``pread`` (no memory map, so no file pages counted in the process's
memory): element ``e`` of the dataset sits at byte ``chunk_base[e // chunk_len] +
(e % chunk_len) * itemsize`` of the file (one chunk for contiguous storage).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

try:  # numba is optional: ``pip install torch-adata[fast]``
    import numba
    from numba.extending import intrinsic

    HAVE_NUMBA = os.environ.get("TORCH_ADATA_DISABLE_NUMBA", "0") in ("", "0")
    # GNU OpenMP, numba's usual pick, aborts a forked DataLoader worker once the parent has
    # run a parallel kernel; the workqueue layer survives fork. Respect a user's own choice.
    if numba.config.THREADING_LAYER == "default" and "NUMBA_THREADING_LAYER" not in os.environ:
        numba.config.THREADING_LAYER = "workqueue"
except ImportError:  # pragma: no cover - exercised where numba is absent
    numba = None
    HAVE_NUMBA = False


# --------------------------------------------------------------------------- numpy fallback


def _flat_positions(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenate ``arange(s, s + n)`` for every (s, n) without a Python loop."""
    total = int(lengths.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    offsets = np.cumsum(lengths) - lengths  # where each range starts in the flat output
    # position = start of its range + (flat index - offset of its range)
    return np.repeat(starts - offsets, lengths) + np.arange(total, dtype=np.int64)


def _np_csr_to_dense(indptr, indices, data, rows, col_map, out):
    out[...] = 0
    starts = indptr[rows].astype(np.int64)
    lengths = indptr[rows + 1].astype(np.int64) - starts
    pos = _flat_positions(starts, lengths)
    out_rows = np.repeat(np.arange(len(rows), dtype=np.int64), lengths)
    cols = indices[pos]
    vals = data[pos]
    if col_map is not None:
        cols = col_map[cols]
        keep = cols >= 0
        out_rows, cols, vals = out_rows[keep], cols[keep], vals[keep]
    np.add.at(out, (out_rows, cols), vals)  # duplicate entries sum, as in scipy
    return out


_INT32_MAX = np.iinfo(np.int32).max


def index_dtype(n_cols: int, nnz: int) -> np.dtype:
    """Index dtype of a batch's CSR pieces: int32 where ``n_cols`` and ``nnz`` fit (as scipy
    picks), else int64. Half the bytes of int64 to write, to send from a worker and to move to a
    GPU (a sparse batch of 256 cells x 2,000 non-zeros: 0.53-0.63 ms vs 0.85-1.75 ms to gather)."""
    return np.dtype(np.int32 if max(n_cols, nnz) <= _INT32_MAX else np.int64)


def _np_csr_to_csr(indptr, indices, data, rows, col_map, out_dtype, n_cols, alloc=np.empty):
    starts = indptr[rows].astype(np.int64)
    lengths = indptr[rows + 1].astype(np.int64) - starts
    pos = _flat_positions(starts, lengths)
    cols, vals = indices[pos], data[pos]  # cast once, into the arrays ``alloc`` makes
    if col_map is not None:
        cols = col_map[cols]
        keep = cols >= 0
        out_rows = np.repeat(np.arange(len(rows), dtype=np.int64), lengths)
        cols, vals = cols[keep], vals[keep]
        lengths = np.bincount(out_rows[keep], minlength=len(rows)).astype(np.int64)
    out_indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out_indptr[1:])
    index = index_dtype(n_cols, len(cols))
    out_cols, out_vals = alloc(len(cols), index), alloc(len(vals), np.dtype(out_dtype))
    out_cols[...], out_vals[...] = cols, vals
    return out_indptr.astype(index, copy=False), out_cols, out_vals


def _np_read_ranges(fd, chunk_base, chunk_len, starts, lengths, offsets, out):
    buf = out.view(np.uint8)
    size = out.itemsize
    for start, n, o in zip(starts.tolist(), lengths.tolist(), offsets.tolist(), strict=True):
        end = start + n
        while start < end:  # one read per chunk the range touches
            c = start // chunk_len
            stop = min(end, (c + 1) * chunk_len)
            _pread_exactly(
                fd,
                buf[o * size : (o + stop - start) * size],
                int(chunk_base[c]) + (start - c * chunk_len) * size,
            )
            o += stop - start
            start = stop
    return out


_SHORTER_THAN_LAYOUT = (
    "the file is shorter than its HDF5 layout says (truncated or changed while open)."
)


def _pread_exactly(fd: int, view: np.ndarray, position: int, why: str = _SHORTER_THAN_LAYOUT):
    """Fill ``view`` (bytes, C-contiguous) from byte ``position`` of ``fd``; an ``OSError``
    ending with ``why`` where the file ends first."""
    done, want = 0, view.nbytes
    while done < want:
        got = os.preadv(fd, [view[done:]], position + done)
        if got <= 0:
            raise OSError(
                f"reading {want} bytes at byte {position} of the file returned {got}: {why}"
            )
        done += got


def _np_copy_ranges(src, starts, lengths, out):
    out[:] = src[_flat_positions(starts, lengths)]
    return out


# --------------------------------------------------------------------------- numba kernels

if numba is not None:
    _jit = numba.njit(parallel=True, nogil=True, cache=True)

    # Dense kernels zero each output row right before scattering into it (the row is then hot
    # in cache, and zeroing runs in parallel), so ``out`` may come uninitialised (np.empty).
    # Column indices go through uint32: numba then skips its negative-index wraparound branch.
    # Measured on 100k x 20k, 2,000 nnz/row, 256-row batches: 535k rows/s vs 340k for
    # scipy's ``X[idx].toarray()`` and 207k for a zeroed output with signed indexing.
    _jit_fast = numba.njit(parallel=True, nogil=True, cache=True, fastmath=True)

    # One row of each gather, inlined into a parallel kernel (prange over rows) and into a
    # serial one, used for calls of few rows (a collection's batch is one call per file): a
    # parallel region costs 50-70 us to start on a busy 2-core machine, a few rows a few us.
    # The serial kernels use no numba threads, so they need no lock.
    @numba.njit(nogil=True, cache=True, fastmath=True, inline="always")
    def _nb_dense_row(indptr, indices, data, r, col_map, row):  # pragma: no cover
        for j in range(row.shape[0]):
            row[j] = 0
        if col_map.shape[0] == 0:
            for p in range(indptr[r], indptr[r + 1]):
                row[np.uint32(indices[p])] += data[p]  # duplicates sum, as in scipy
        else:
            for p in range(indptr[r], indptr[r + 1]):
                c = col_map[indices[p]]
                if c >= 0:
                    row[c] += data[p]

    @_jit_fast
    def _nb_csr_to_dense(indptr, indices, data, rows, col_map, out):  # pragma: no cover
        for i in numba.prange(rows.shape[0]):
            _nb_dense_row(indptr, indices, data, rows[i], col_map, out[i])
        return out

    @numba.njit(nogil=True, cache=True, fastmath=True)
    def _nb_csr_to_dense_serial(indptr, indices, data, rows, col_map, out):  # pragma: no cover
        for i in range(rows.shape[0]):
            _nb_dense_row(indptr, indices, data, rows[i], col_map, out[i])
        return out

    @numba.njit(nogil=True, cache=True, inline="always")
    def _nb_fill_row(indptr, indices, data, r, col_map, q, out_cols, out_vals):  # pragma: no cover
        for p in range(indptr[r], indptr[r + 1]):
            c = np.int64(indices[p]) if col_map.shape[0] == 0 else col_map[indices[p]]
            if c >= 0:
                out_cols[q] = c
                out_vals[q] = data[p]
                q += 1

    @_jit
    def _nb_csr_fill(
        indptr, indices, data, rows, col_map, out_indptr, out_cols, out_vals
    ):  # pragma: no cover
        for i in numba.prange(rows.shape[0]):
            _nb_fill_row(indptr, indices, data, rows[i], col_map, out_indptr[i], out_cols, out_vals)

    @numba.njit(nogil=True, cache=True)
    def _nb_csr_fill_serial(
        indptr, indices, data, rows, col_map, out_indptr, out_cols, out_vals
    ):  # pragma: no cover
        for i in range(rows.shape[0]):
            _nb_fill_row(indptr, indices, data, rows[i], col_map, out_indptr[i], out_cols, out_vals)

    @numba.njit(nogil=True, cache=True, inline="always")
    def _nb_row_length(indptr, indices, r, col_map):  # pragma: no cover
        """Stored values of row ``r`` kept by ``col_map`` (all of them for an empty map)."""
        if col_map.shape[0] == 0:
            return indptr[r + 1] - indptr[r]
        n = 0
        for p in range(indptr[r], indptr[r + 1]):
            if col_map[indices[p]] >= 0:
                n += 1
        return n

    @numba.njit(nogil=True, cache=True)
    def _nb_row_lengths(indptr, indices, rows, col_map):  # pragma: no cover
        lengths = np.empty(rows.shape[0], dtype=np.int64)
        for i in range(rows.shape[0]):
            lengths[i] = _nb_row_length(indptr, indices, rows[i], col_map)
        return lengths

    @_jit
    def _nb_csr_fill_all(
        indptr, indices, data, rows, out_indptr, out_cols, out_vals
    ):  # pragma: no cover
        # slice copies, not an element loop: numba turns them into straight block copies
        # (measured 0.5 vs 1.4 ms per batch of 256 x 2,000 non-zeros, 2 threads)
        for i in numba.prange(rows.shape[0]):
            r = rows[i]
            start, stop = indptr[r], indptr[r + 1]
            q = out_indptr[i]
            out_cols[q : q + stop - start] = indices[start:stop]
            out_vals[q : q + stop - start] = data[start:stop]

    # POSIX pread(fd, buffer, count, offset), linked by name (so the kernel stays cacheable);
    # the buffer address is passed as an integer, which the C calling convention accepts.
    _libc_pread = None
    if hasattr(os, "pread"):
        _libc_pread = numba.types.ExternalFunction(
            "pread",
            numba.types.intp(
                numba.types.intc, numba.types.intp, numba.types.uintp, numba.types.int64
            ),
        )

    if _libc_pread is not None:
        _pread = _libc_pread

        @numba.njit(nogil=True, cache=True)
        def _nb_read_range(
            fd, chunk_base, chunk_len, start, length, o, address, size
        ):  # pragma: no cover
            """Read elements ``[start, start + length)`` into element ``o`` of the buffer at
            ``address``: one pread per chunk the range touches; 1 if a read failed."""
            end = start + length
            while start < end:
                c = start // chunk_len
                stop = min(end, (c + 1) * chunk_len)
                want = (stop - start) * size
                position = chunk_base[c] + (start - c * chunk_len) * size
                done = 0
                while done < want:
                    got = _pread(fd, address + o * size + done, want - done, position + done)
                    if got <= 0:
                        return 1
                    done += got
                o += stop - start
                start = stop
            return 0

        @_jit
        def _nb_read_ranges(
            fd, chunk_base, chunk_len, starts, lengths, offsets, out
        ):  # pragma: no cover
            size = out.itemsize
            address = out.ctypes.data
            failed = 0
            for k in numba.prange(starts.shape[0]):
                failed += _nb_read_range(
                    fd, chunk_base, chunk_len, starts[k], lengths[k], offsets[k], address, size
                )
            return failed

        # the same, one range after another on the calling thread: several Python threads
        # may run it at once (it uses no numba threads, so it needs no lock)
        @numba.njit(nogil=True, cache=True)
        def _nb_read_ranges_serial(
            fd, chunk_base, chunk_len, starts, lengths, offsets, out
        ):  # pragma: no cover
            size = out.itemsize
            address = out.ctypes.data
            failed = 0
            for k in range(starts.shape[0]):
                failed += _nb_read_range(
                    fd, chunk_base, chunk_len, starts[k], lengths[k], offsets[k], address, size
                )
            return failed

    if _libc_pread is not None:

        @_jit
        def _nb_read_ranges_multi(
            fds, bases, base_first, chunk_lens, source, starts, lengths, offsets, out
        ):  # pragma: no cover
            """:func:`_nb_read_ranges` over several files: range ``k`` is read from file
            ``source[k]`` (descriptor ``fds[s]``, chunk bases ``bases[base_first[s]:
            base_first[s + 1]]``, ``chunk_lens[s]`` elements per chunk)."""
            size = out.itemsize
            address = out.ctypes.data
            failed = 0
            for k in numba.prange(starts.shape[0]):
                s = source[k]
                failed += _nb_read_range(
                    fds[s],
                    bases[base_first[s] : base_first[s + 1]],
                    chunk_lens[s],
                    starts[k],
                    lengths[k],
                    offsets[k],
                    address,
                    size,
                )
            return failed

    @_jit
    def _nb_copy_ranges(src, starts, offsets, lengths, out):  # pragma: no cover
        for k in numba.prange(starts.shape[0]):
            s = starts[k]
            o = offsets[k]
            out[o : o + lengths[k]] = src[s : s + lengths[k]]  # a block copy (see above)
        return out

    # Several in-memory CSR matrices gathered as one, without stacking them: a table holds each
    # source's arrays by address (see ``source_table``), and a kernel views source ``s``'s
    # arrays in place. ``like_*`` are arrays of the sources' dtypes (their values are unused):
    # the compiled kernels are typed by them.
    @intrinsic
    def _pointer(typingctx, address, like):
        """The integer ``address`` as a pointer to elements of ``like``'s dtype."""
        if not isinstance(address, numba.types.Integer) or not isinstance(like, numba.types.Array):
            return None
        signature = numba.types.CPointer(like.dtype)(address, like)

        def codegen(context, builder, sig, args):  # pragma: no cover - compiled
            return builder.inttoptr(args[0], context.get_value_type(sig.return_type))

        return signature, codegen

    @numba.njit(nogil=True, cache=True, inline="always")
    def _nb_source(table, s, like_indptr, like_indices, like_data):  # pragma: no cover
        """Source ``s``'s ``indptr, indices, data, col_map`` (views of its own memory)."""
        indptr = numba.carray(_pointer(table[s, 0], like_indptr), table[s, 4])
        indices = numba.carray(_pointer(table[s, 1], like_indices), table[s, 5])
        data = numba.carray(_pointer(table[s, 2], like_data), table[s, 5])
        col_map = numba.carray(_pointer(table[s, 3], table), table[s, 6])  # int64
        return indptr, indices, data, col_map

    @numba.njit(nogil=True, cache=True, fastmath=True, inline="always")
    def _nb_sources_dense_row(
        table, like_indptr, like_indices, like_data, s, r, row
    ):  # pragma: no cover
        indptr, indices, data, col_map = _nb_source(table, s, like_indptr, like_indices, like_data)
        _nb_dense_row(indptr, indices, data, r, col_map, row)

    @_jit_fast
    def _nb_sources_to_dense(
        table, like_indptr, like_indices, like_data, source, rows, out
    ):  # pragma: no cover
        for i in numba.prange(rows.shape[0]):
            _nb_sources_dense_row(
                table, like_indptr, like_indices, like_data, source[i], rows[i], out[i]
            )
        return out

    @numba.njit(nogil=True, cache=True, fastmath=True)
    def _nb_sources_to_dense_serial(
        table, like_indptr, like_indices, like_data, source, rows, out
    ):  # pragma: no cover
        for i in range(rows.shape[0]):
            _nb_sources_dense_row(
                table, like_indptr, like_indices, like_data, source[i], rows[i], out[i]
            )
        return out

    @numba.njit(nogil=True, cache=True)
    def _nb_sources_row_lengths(
        table, like_indptr, like_indices, like_data, source, rows
    ):  # pragma: no cover
        lengths = np.empty(rows.shape[0], dtype=np.int64)
        for i in range(rows.shape[0]):
            indptr, indices, _, col_map = _nb_source(
                table, source[i], like_indptr, like_indices, like_data
            )
            lengths[i] = _nb_row_length(indptr, indices, rows[i], col_map)
        return lengths

    @numba.njit(nogil=True, cache=True, inline="always")
    def _nb_sources_fill_row(
        table, like_indptr, like_indices, like_data, s, r, q, out_cols, out_vals
    ):  # pragma: no cover
        indptr, indices, data, col_map = _nb_source(table, s, like_indptr, like_indices, like_data)
        if col_map.shape[0] == 0:  # block copies (see _nb_csr_fill_all)
            start, stop = indptr[r], indptr[r + 1]
            out_cols[q : q + stop - start] = indices[start:stop]
            out_vals[q : q + stop - start] = data[start:stop]
        else:
            _nb_fill_row(indptr, indices, data, r, col_map, q, out_cols, out_vals)

    @_jit
    def _nb_sources_fill(
        table, like_indptr, like_indices, like_data, source, rows, out_indptr, out_cols, out_vals
    ):  # pragma: no cover
        for i in numba.prange(rows.shape[0]):
            _nb_sources_fill_row(
                table,
                like_indptr,
                like_indices,
                like_data,
                source[i],
                rows[i],
                out_indptr[i],
                out_cols,
                out_vals,
            )

    @numba.njit(nogil=True, cache=True)
    def _nb_sources_fill_serial(
        table, like_indptr, like_indices, like_data, source, rows, out_indptr, out_cols, out_vals
    ):  # pragma: no cover
        for i in range(rows.shape[0]):
            _nb_sources_fill_row(
                table,
                like_indptr,
                like_indices,
                like_data,
                source[i],
                rows[i],
                out_indptr[i],
                out_cols,
                out_vals,
            )


_EMPTY_MAP = np.empty(0, dtype=np.int64)

#: whether :func:`sources_to_dense` and :func:`sources_to_csr` are available (numba)
MEMORY_SOURCES = numba is not None

#: whether :func:`read_ranges_multi` is available (numba and a C ``pread``)
MULTI_FILE_READS = numba is not None and globals().get("_libc_pread") is not None

# Calls of fewer rows (or byte ranges) than this run on the calling thread, not in parallel.
_SERIAL_BELOW = 64

# numba's workqueue layer (fork-safe, see above) is not threadsafe: two Python threads in a
# parallel kernel at once abort the process. Kernels take this lock; a forked child gets a
# fresh one, so it can never inherit a lock held by another thread of its parent.
_LOCK = threading.Lock()


def _new_lock() -> None:
    global _LOCK
    _LOCK = threading.Lock()


os.register_at_fork(after_in_child=_new_lock)

_THREADS_SET_IN: int | None = None  # pid of the worker process whose thread count is set


def share_cores(n_workers: int) -> None:
    """In one of ``n_workers`` DataLoader worker processes, give the kernels this worker's
    share of the cores (once per process; the dataset layer, which knows it runs in a worker,
    calls this).

    Every worker otherwise starts one numba thread per core: two workers on two cores would
    run four threads that take turns (measured slower than one thread each).
    """
    global _THREADS_SET_IN
    if not HAVE_NUMBA or _THREADS_SET_IN == os.getpid():
        return
    with _LOCK:
        numba.set_num_threads(max(1, numba.config.NUMBA_NUM_THREADS // n_workers))
    _THREADS_SET_IN = os.getpid()


# numba has no float16 arithmetic: such outputs are computed in float32 and cast.
_HALF = np.dtype(np.float16)


def _nb_csr_to_dense_entry(indptr, indices, data, rows, col_map, out):
    target = out
    if out.dtype == _HALF:
        out = np.empty(out.shape, dtype=np.float32)
    cmap = _EMPTY_MAP if col_map is None else col_map
    if rows.shape[0] < _SERIAL_BELOW:
        _nb_csr_to_dense_serial(indptr, indices, data, rows, cmap, out)
    else:
        with _LOCK:
            _nb_csr_to_dense(indptr, indices, data, rows, cmap, out)
    if target is not out:
        target[...] = out
    return target


def _nb_csr_to_csr_entry(indptr, indices, data, rows, col_map, out_dtype, n_cols, alloc=np.empty):
    out_indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    if col_map is None:  # every stored value is kept: row lengths straight from indptr
        np.cumsum(indptr[rows + 1] - indptr[rows], out=out_indptr[1:])
    else:
        np.cumsum(_nb_row_lengths(indptr, indices, rows, col_map), out=out_indptr[1:])
    nnz = int(out_indptr[-1])
    index = index_dtype(n_cols, nnz)
    out_cols = alloc(nnz, index)
    half = np.dtype(out_dtype) == _HALF  # computed in float32, then cast
    out_vals = np.empty(nnz, dtype=np.float32) if half else alloc(nnz, np.dtype(out_dtype))
    if len(rows) < _SERIAL_BELOW:
        cmap = _EMPTY_MAP if col_map is None else col_map
        _nb_csr_fill_serial(indptr, indices, data, rows, cmap, out_indptr, out_cols, out_vals)
    else:
        with _LOCK:
            if col_map is None:
                _nb_csr_fill_all(indptr, indices, data, rows, out_indptr, out_cols, out_vals)
            else:
                _nb_csr_fill(indptr, indices, data, rows, col_map, out_indptr, out_cols, out_vals)
    if half:
        values = alloc(nnz, _HALF)
        values[...] = out_vals
        out_vals = values
    return out_indptr.astype(index, copy=False), out_cols, out_vals


def _offsets(lengths: np.ndarray) -> np.ndarray:
    return np.cumsum(lengths) - lengths


def _nb_read_ranges_entry(fd, chunk_base, chunk_len, starts, lengths, offsets, out):
    if _libc_pread is None:  # pragma: no cover - platforms without a C pread
        return _np_read_ranges(fd, chunk_base, chunk_len, starts, lengths, offsets, out)
    if starts.shape[0] < _SERIAL_BELOW:  # few reads: no thread to start
        failed = _nb_read_ranges_serial(fd, chunk_base, chunk_len, starts, lengths, offsets, out)
        return _all_read(failed, out)
    with _LOCK:
        failed = _nb_read_ranges(fd, chunk_base, chunk_len, starts, lengths, offsets, out)
    return _all_read(failed, out)


def read_ranges_multi(fds, bases, base_first, chunk_lens, source, starts, lengths, offsets, out):
    """Element ranges of one array stored uncompressed in several files, into ``out``.

    Range ``k`` (``starts[k]``, ``lengths[k]``, landing at element ``offsets[k]`` of ``out``)
    is read from file ``source[k]``: descriptor ``fds[s]``, chunk bases
    ``bases[base_first[s]:base_first[s + 1]]`` of ``chunk_lens[s]`` elements (see
    ``read_ranges``). Compiled (numba and a C ``pread``) only: check :data:`MULTI_FILE_READS`.
    """
    with _LOCK:
        failed = _nb_read_ranges_multi(
            fds, bases, base_first, chunk_lens, source, starts, lengths, offsets, out
        )
    return _all_read(failed, out)


def _all_read(failed: int, out: np.ndarray) -> np.ndarray:
    """``out``, once the compiled readers report no range they could not read in full."""
    if failed:
        raise OSError(
            f"{failed} reads came back short: the file is shorter than its HDF5 layout says "
            "(truncated or changed while open)."
        )
    return out


def read_ranges_threadsafe(engine_name: str):
    """``read_ranges`` that several Python threads may run at once (reads on the calling
    thread; the GIL is released while it waits): compiled where numba and a C ``pread`` are."""
    if engine_name != "numba" or _libc_pread is None:
        return _np_read_ranges

    def read(fd, chunk_base, chunk_len, starts, lengths, offsets, out):
        failed = _nb_read_ranges_serial(fd, chunk_base, chunk_len, starts, lengths, offsets, out)
        return _all_read(failed, out)

    return read


def _nb_copy_ranges_entry(src, starts, lengths, out):
    with _LOCK:
        return _nb_copy_ranges(src, starts, _offsets(lengths), lengths, out)


def source_table(parts: list[tuple]) -> np.ndarray:
    """The table by which :func:`sources_to_dense` and :func:`sources_to_csr` reach several
    in-memory CSR matrices: one row per source, of the addresses of its ``indptr, indices,
    data, col_map`` and of their lengths.

    ``parts``: each source's ``(indptr, indices, data, col_map or None)``, 1-D C-contiguous
    arrays, every source's of the same dtypes (``col_map`` int64, as for ``csr_to_dense``).
    The arrays must outlive every use of the table (the caller holds them), and a table is
    only valid in the process that made it (a pickled copy would point nowhere).
    """
    table = np.zeros((len(parts), 7), dtype=np.int64)
    for s, (indptr, indices, data, col_map) in enumerate(parts):
        for a in (indptr, indices, data) + (() if col_map is None else (col_map,)):
            if a.ndim != 1 or not a.flags.c_contiguous:
                raise ValueError("source_table needs 1-D C-contiguous arrays.")
        cm = _EMPTY_MAP if col_map is None else col_map
        if cm.dtype != np.int64:
            raise ValueError(f"col_map must be int64, got {cm.dtype}.")
        table[s] = (
            indptr.ctypes.data,
            indices.ctypes.data,
            data.ctypes.data,
            cm.ctypes.data,
            len(indptr),
            len(indices),
            len(cm),
        )
    return table


def sources_to_dense(table, likes, source, rows, out):
    """Row ``rows[i]`` of source ``source[i]`` (see :func:`source_table`) into ``out[i]``,
    every element of ``out`` written (numba only). ``likes``: arrays of the sources'
    ``indptr, indices, data`` dtypes."""
    target = out
    if out.dtype == _HALF:
        out = np.empty(out.shape, dtype=np.float32)
    if rows.shape[0] < _SERIAL_BELOW:
        _nb_sources_to_dense_serial(table, *likes, source, rows, out)
    else:
        with _LOCK:
            _nb_sources_to_dense(table, *likes, source, rows, out)
    if target is not out:
        target[...] = out
    return target


def sources_to_csr(table, likes, source, rows, out_dtype, n_cols, alloc=np.empty):
    """CSR pieces ``(indptr, indices, values)`` of row ``rows[i]`` of source ``source[i]``
    (see :func:`sources_to_dense`), as ``csr_to_csr`` makes them (numba only)."""
    out_indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(_nb_sources_row_lengths(table, *likes, source, rows), out=out_indptr[1:])
    nnz = int(out_indptr[-1])
    index = index_dtype(n_cols, nnz)
    out_cols = alloc(nnz, index)
    half = np.dtype(out_dtype) == _HALF  # computed in float32, then cast
    out_vals = np.empty(nnz, dtype=np.float32) if half else alloc(nnz, np.dtype(out_dtype))
    if len(rows) < _SERIAL_BELOW:
        _nb_sources_fill_serial(table, *likes, source, rows, out_indptr, out_cols, out_vals)
    else:
        with _LOCK:
            _nb_sources_fill(table, *likes, source, rows, out_indptr, out_cols, out_vals)
    if half:
        values = alloc(nnz, _HALF)
        values[...] = out_vals
        out_vals = values
    return out_indptr.astype(index, copy=False), out_cols, out_vals


def warm_sources(table, likes) -> None:
    """Load :func:`sources_to_dense` and :func:`sources_to_csr`'s kernels for float32 batches
    of these sources' dtypes into this process (10-70 ms from numba's cache), as
    :func:`warm_up` does for one source's, so that forked workers inherit them."""
    rows = np.empty(0, dtype=np.int64)
    out = np.empty((0, 1), dtype=np.float32)
    out_indptr = np.zeros(1, dtype=np.int64)
    vals = np.empty(0, np.float32)
    for index in (np.int32, np.int64):
        cols = np.empty(0, index)
        with _LOCK:
            _nb_sources_to_dense(table, *likes, rows, rows, out)
            _nb_sources_fill(table, *likes, rows, rows, out_indptr, cols, vals)
        _nb_sources_to_dense_serial(table, *likes, rows, rows, out)
        _nb_sources_fill_serial(table, *likes, rows, rows, out_indptr, cols, vals)
    _nb_sources_row_lengths(table, *likes, rows, rows)


_WARM_IN: int | None = None  # pid of the process whose numba kernels are loaded


def warm_up(engine: str = "auto") -> None:
    """With the numba engine, load the kernels for float32 values and int32 or int64 column
    indices into this process, once (other dtypes load, or compile, on first use).

    Loading the first kernel from numba's cache starts LLVM: about 0.4 s. A DataLoader forks
    new workers every epoch (unless ``persistent_workers``); each would pay it again on its
    first batch unless the parent process has loaded the kernels before forking.
    """
    global _WARM_IN
    if get_kernels(engine) is not NUMBA or _WARM_IN == os.getpid():
        return
    _WARM_IN = os.getpid()
    indptr = np.zeros(2, dtype=np.int64)
    rows = np.zeros(1, dtype=np.int64)
    none = np.empty(0, dtype=np.int64)
    values = np.empty(0, np.float32)
    for cols in (np.empty(0, np.int32), np.empty(0, np.int64)):
        NUMBA.csr_to_dense(indptr, cols, values, rows, None, np.empty((1, 1), np.float32))
        NUMBA.csr_to_csr(indptr, cols, values, rows, None, np.dtype(np.float32), 1)
        # the other of the parallel and serial variants (calls of few rows run serial ones)
        out_indptr = np.zeros(2, dtype=np.int64)
        dense = np.empty((1, 1), np.float32)
        with _LOCK:
            _nb_csr_to_dense(indptr, cols, values, rows, _EMPTY_MAP, dense)
            _nb_csr_fill_all(indptr, cols, values, rows, out_indptr, cols, values)
        _nb_csr_to_dense_serial(indptr, cols, values, rows, _EMPTY_MAP, dense)
        _nb_csr_fill_serial(indptr, cols, values, rows, _EMPTY_MAP, out_indptr, cols, values)
        for array in (values, cols):
            NUMBA.copy_ranges(array, none, none, np.empty(0, array.dtype))
            if _libc_pread is not None:
                with _LOCK:
                    _nb_read_ranges(-1, indptr, 1, none, none, none, array)
                _nb_read_ranges_serial(-1, indptr, 1, none, none, none, array)
                with _LOCK:  # a collection's reads over several files
                    _nb_read_ranges_multi(
                        np.empty(0, np.int32), none, indptr, none, none, none, none, none, array
                    )


# --------------------------------------------------------------------------- selection


@dataclass(frozen=True)
class Kernels:
    """One implementation of every gather kernel."""

    name: str
    csr_to_dense: Callable
    csr_to_csr: Callable
    copy_ranges: Callable
    read_ranges: Callable


NUMPY = Kernels("numpy", _np_csr_to_dense, _np_csr_to_csr, _np_copy_ranges, _np_read_ranges)
NUMBA = (
    Kernels(
        "numba",
        _nb_csr_to_dense_entry,
        _nb_csr_to_csr_entry,
        _nb_copy_ranges_entry,
        _nb_read_ranges_entry,
    )
    if numba is not None
    else None
)


def get_kernels(engine: str = "auto") -> Kernels:
    """Return the kernel set for ``engine``: ``"auto"``, ``"numba"`` or ``"numpy"``.

    ``"auto"`` uses numba when it is installed (and ``TORCH_ADATA_DISABLE_NUMBA`` is unset),
    numpy otherwise.
    """
    if engine == "auto":
        return NUMBA if HAVE_NUMBA else NUMPY
    if engine == "numpy":
        return NUMPY
    if engine == "numba":
        if NUMBA is None:
            raise ImportError(
                "engine='numba' needs numba: install it with `pip install torch-adata[fast]`, "
                "or use engine='numpy'."
            )
        return NUMBA
    raise ValueError(f"engine must be 'auto', 'numba' or 'numpy', got {engine!r}.")
