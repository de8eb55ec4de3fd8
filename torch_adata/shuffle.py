"""A shuffled copy of an ``.h5ad`` file, written streaming: for data larger than memory.

A backed file is read fastest in storage order (:class:`~torch_adata.samplers.BlockShuffleSampler`
reads contiguous blocks), but files are often stored sorted (by sample, donor, cell type), so
blocks of neighbours make batches far less mixed than uniform sampling. :func:`write_shuffled`
writes the cells once in a seeded random order; block shuffle on the copy then reads
sequentially *and* gives batches mixed like uniform sampling's.
"""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import h5py
import numpy as np
from tqdm.auto import tqdm

from ._gather import _storage_layout, _verify_layout
from ._kernels import _pread_exactly, get_kernels

__all__ = ["write_shuffled"]


def _encoding(obj: h5py.Group | h5py.Dataset) -> str:
    value = obj.attrs.get("encoding-type", "")
    return value.decode() if isinstance(value, bytes) else str(value)


def _stored_bytes(obj: h5py.Group | h5py.Dataset) -> int:
    """Uncompressed bytes of every dataset in ``obj`` (what the copy will need at most)."""
    if isinstance(obj, h5py.Dataset):
        return (
            int(obj.size) * obj.dtype.itemsize
            if obj.dtype.kind != "O"
            else obj.id.get_storage_size()
        )
    total = 0

    def add(_name: str, item: h5py.Group | h5py.Dataset) -> None:
        nonlocal total
        if isinstance(item, h5py.Dataset):
            total += _stored_bytes(item)

    obj.visititems(add)
    return total


def _copy_attrs(source: h5py.Group | h5py.Dataset, target: h5py.Group | h5py.Dataset) -> None:
    for key, value in source.attrs.items():
        target.attrs[key] = value


def _check_paths(source: Path, destination: Path, overwrite: bool) -> None:
    if not source.is_file():
        raise FileNotFoundError(f"write_shuffled: source {str(source)!r} is not a file.")
    same = source.resolve() == destination.resolve()
    if same or (destination.exists() and os.path.samefile(source, destination)):
        raise ValueError(
            f"write_shuffled: destination {str(destination)!r} is the source file; the source "
            "is never modified. Give a new path for the shuffled copy."
        )
    if destination.is_dir():
        raise IsADirectoryError(
            f"write_shuffled: destination {str(destination)!r} is a directory; give a file "
            "path such as 'shuffled.h5ad'."
        )
    if destination.exists() and not overwrite:
        raise FileExistsError(
            f"write_shuffled: destination {str(destination)!r} exists. Pass overwrite=True "
            "(--overwrite on the command line) to replace it, or choose another path."
        )
    if not destination.parent.is_dir():
        raise FileNotFoundError(
            f"write_shuffled: the destination's folder {str(destination.parent)!r} does not "
            "exist; create it first."
        )


def _check_space(copy: int, spill: int, folder: Path) -> None:
    free = shutil.disk_usage(folder).free
    if copy + spill > free:
        spilled = f" plus {spill / 2**20:,.0f} MiB of temporary spill" if spill else ""
        raise OSError(
            f"write_shuffled: the shuffled copy needs about {(copy + spill) / 2**20:,.0f} MiB "
            f"(uncompressed{spilled}) but {str(folder)!r} has {free / 2**20:,.0f} MiB free. "
            "Free space there or write the copy to another disk; nothing was written."
        )


def _check_per_cell(name: str, obj: h5py.Group | h5py.Dataset, n_obs: int) -> str:
    """The kind of a per-cell element (``"csr"``, ``"dense"``, ``"dataframe"``), or raise."""
    kind = _encoding(obj)
    if kind == "csr_matrix":
        if int(obj.attrs["shape"][0]) != n_obs:
            raise ValueError(
                f"write_shuffled: {name} has {obj.attrs['shape'][0]} rows, not {n_obs}."
            )
        return "csr"
    if kind == "csc_matrix":
        raise ValueError(
            f"write_shuffled: {name} is stored CSC (by gene); a cell's values are spread over "
            "the whole matrix, so it cannot be streamed in cell order. Convert it to CSR once "
            "(in memory: `adata = anndata.read_h5ad(path); adata.X = adata.X.tocsr(); "
            "adata.write_h5ad(csr_path)`, the same for layers) and shuffle that file."
        )
    if isinstance(obj, h5py.Dataset) and obj.ndim >= 1 and obj.dtype.kind in "biufc":
        if obj.shape[0] != n_obs:
            raise ValueError(f"write_shuffled: {name} has {obj.shape[0]} rows, not {n_obs}.")
        return "dense"
    if kind == "dataframe":
        return "dataframe"
    raise ValueError(
        f"write_shuffled: {name} has encoding {kind or type(obj).__name__!r}, which the "
        "streaming writer does not reorder (it handles CSR and dense arrays, and data frames "
        "in obsm). Drop or convert it before shuffling."
    )


# -- cutting rows into runs ---------------------------------------------------------------------


def _cuts(costs: np.ndarray, budget: int) -> np.ndarray:
    """Boundaries ``[0, ..., len(costs)]`` that cut rows of ``costs`` bytes into consecutive runs
    of at most ``budget`` bytes (at least one row each)."""
    n = len(costs)
    cumulative = np.concatenate([[0], np.cumsum(costs, dtype=np.int64)])
    cuts, a = [0], 0
    while a < n:
        b = int(np.searchsorted(cumulative, cumulative[a] + budget, side="right")) - 1
        a = min(max(b, a + 1), n)
        cuts.append(a)
    return np.asarray(cuts, dtype=np.int64)


def _chunks(costs: np.ndarray, budget: int) -> Iterator[tuple[int, int]]:
    """The runs of :func:`_cuts` as ``(first, end)`` pairs: the windows the source is read in."""
    cuts = _cuts(costs, budget).tolist()
    yield from itertools.pairwise(cuts)


# -- moving bytes -------------------------------------------------------------------------------


def _as_bytes(array: np.ndarray) -> memoryview:
    return memoryview(array.reshape(-1).view(np.uint8))


def _pwrite_all(fd: int, array: np.ndarray, position: int) -> None:
    """Write ``array`` (C-contiguous) at byte ``position`` of ``fd``."""
    view, done = _as_bytes(array), 0
    while done < len(view):  # pwrite may write less than asked
        done += os.pwrite(fd, view[done:], position + done)


def _pread_into(fd: int, array: np.ndarray, position: int) -> None:
    """Fill ``array`` (C-contiguous) with the bytes at ``position`` of ``fd``."""
    _pread_exactly(
        fd,
        array.reshape(-1).view(np.uint8),
        position,
        why="write_shuffled's temporary data ended early (removed or truncated while the copy "
        "was written?).",
    )


def _gather(buffer: np.ndarray, starts: np.ndarray, lengths: np.ndarray, dense: bool) -> np.ndarray:
    """The rows ``buffer[starts[j]:starts[j] + lengths[j]]`` one after another (for ``dense``,
    every length is 1: the rows ``buffer[starts]``)."""
    if dense:
        return buffer[starts]
    out = np.empty(int(lengths.sum()), dtype=buffer.dtype)
    kernels = get_kernels("auto")
    if kernels.name == "numba":  # one block copy per row, in parallel
        return kernels.copy_ranges(buffer, starts, lengths, out)
    at = 0  # a loop of slice copies: no index array as large as the values
    for s, n in zip(starts.tolist(), lengths.tolist(), strict=True):
        out[at : at + n] = buffer[s : s + n]
        at += n
    return out


def _new_file(folder: Path, prefix: str, suffix: str) -> Path:
    """A new empty file of a unique name in ``folder``, with the permissions any new file gets
    there (``tempfile.mkstemp`` would make it readable by its owner only, and the copy with it)."""
    for _ in range(100):
        path = folder / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"write_shuffled: no free temporary name in {str(folder)!r}.")


class _Spill:
    """A temporary file beside the copy that holds a matrix between the two passes when the
    copy's own space cannot (a compressed copy). Created on first use; :meth:`close` removes it."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder, self.name = folder, name
        self.path: Path | None = None
        self._fd: int | None = None

    @property
    def fd(self) -> int:
        if self._fd is None:
            self.path = _new_file(self.folder, f".{self.name}.", ".spill")
            self._fd = os.open(self.path, os.O_RDWR)
        return self._fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)


# -- a per-cell matrix, reordered in bands ------------------------------------------------------


@dataclass
class _Matrix:
    """A per-cell matrix as rows of *units*: row ``i`` is units ``ptr[i]:ptr[i + 1]`` (axis 0) of
    every part. CSR: the parts ``data`` and ``indices``, a unit one stored value; dense: the
    array itself, a unit one row."""

    parts: list[h5py.Dataset]
    ptr: np.ndarray
    dense: bool
    #: per part, ``(fd, chunk_base, chunk_len)`` to read it straight from the file, or None
    layouts: list[tuple[int, np.ndarray, int] | None] = field(default_factory=list)

    @classmethod
    def of(cls, obj: h5py.Group | h5py.Dataset, kind: str, n_obs: int) -> _Matrix:
        if kind == "csr":
            return cls([obj["data"], obj["indices"]], obj["indptr"][:].astype(np.int64), False)
        return cls([obj], np.arange(n_obs + 1, dtype=np.int64), True)

    @property
    def unit_bytes(self) -> list[int]:
        return [int(np.prod(p.shape[1:], dtype=np.int64)) * p.dtype.itemsize for p in self.parts]

    @property
    def nbytes(self) -> int:
        return int(self.ptr[-1] - self.ptr[0]) * sum(self.unit_bytes)

    def read_directly(self, fd: int) -> None:
        """Read the parts stored uncompressed straight from the source's file descriptor
        ``fd`` (``pread``: cheaper than HDF5's reads, and without holding the GIL, so the next
        window is read while this one is written), where their layout is known and checks
        out; the others through h5py."""
        kernels = get_kernels("auto")
        self.layouts = []
        for p, part in enumerate(self.parts):
            layout = None
            if part.ndim == 1:
                layout = _storage_layout(part)
                if layout is not None and not _verify_layout(part, layout, fd, kernels):
                    layout = None
            elif part.chunks is None and part.shape[0] > 0:  # contiguous: flat positions hold
                layout = _storage_layout(part)
            self.layouts.append(None if layout is None else (fd, *layout))
            if part.ndim > 1 and layout is not None:  # check a few rows against h5py's
                for row in {0, part.shape[0] // 2, part.shape[0] - 1}:
                    if not np.array_equal(self.read(p, row, row + 1)[0], part[row]):
                        self.layouts[p] = None
                        break

    def read(self, part: int, lo: int, hi: int) -> np.ndarray:
        """Units ``lo:hi`` of a part, from the source."""
        dataset = self.parts[part]
        buffer = np.empty((hi - lo, *dataset.shape[1:]), dtype=dataset.dtype)
        layout = self.layouts[part] if self.layouts else None
        if hi > lo and layout is not None:
            fd, base, chunk_len = layout
            per_unit = int(np.prod(dataset.shape[1:], dtype=np.int64))
            span = np.array([lo * per_unit, (hi - lo) * per_unit], dtype=np.int64)
            get_kernels("auto").read_ranges(
                fd, base, chunk_len, span[:1], span[1:], np.zeros(1, np.int64), buffer.reshape(-1)
            )
        elif hi > lo:
            dataset.read_direct(buffer, np.s_[lo:hi])
        return buffer


class _Target:
    """A part of the copy: written straight into its allocated bytes of the copy's file (``fd``
    at ``offset``) or, without an offset (a compressed dataset), through h5py."""

    def __init__(self, dataset: h5py.Dataset, fd: int, offset: int | None) -> None:
        self.dataset, self.fd, self.offset = dataset, fd, offset
        self.unit_bytes = int(np.prod(dataset.shape[1:], dtype=np.int64)) * dataset.dtype.itemsize

    def write(self, start: int, values: np.ndarray) -> None:
        if len(values) == 0:
            return
        if self.offset is not None:
            _pwrite_all(self.fd, values, self.offset + start * self.unit_bytes)
        else:
            self.dataset.write_direct(values, dest_sel=np.s_[start : start + len(values)])


def _new_target(
    group: h5py.Group,
    name: str,
    source: h5py.Dataset,
    shape: tuple,
    compression: str | None,
    fd: int,
) -> _Target:
    """The copy's dataset for ``source``: uncompressed, its file space allocated now (not
    filled) and reserved on disk in one piece; or compressed and chunked."""
    if compression is not None and np.prod(shape) > 0:
        out = group.create_dataset(
            name, shape=shape, dtype=source.dtype, compression=compression, chunks=True
        )
        _copy_attrs(source, out)
        return _Target(out, fd, None)
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    out = group.create_dataset(name, shape=shape, dtype=source.dtype, dcpl=dcpl)
    _copy_attrs(source, out)
    offset = out.id.get_offset()  # None for an empty dataset
    if offset is not None:
        try:  # contiguous on disk: the copy is read back sequentially, fast
            os.posix_fallocate(fd, offset, out.id.get_storage_size())
        except OSError:  # a file system without it: the writes allocate the space
            pass
    return _Target(out, fd, offset)


T = TypeVar("T")
R = TypeVar("R")


def _ahead(
    items: Iterable[T], read: Callable[[T], R], pool: ThreadPoolExecutor
) -> Iterator[tuple[T, R]]:
    """``(item, read(item))`` for each item, ``read`` of the next item running in ``pool``
    while the caller works on this one (reads and writes overlap: the disk is kept busy)."""
    items = iter(items)
    upcoming = next(items, None)
    future = pool.submit(read, upcoming) if upcoming is not None else None
    while upcoming is not None:
        item, done = upcoming, future
        upcoming = next(items, None)
        future = pool.submit(read, upcoming) if upcoming is not None else None
        yield item, done.result()


def _band_spill(
    matrix: _Matrix,
    perm: np.ndarray,
    out_ptr: np.ndarray,
    bands: np.ndarray,
    spill_fd: int,
    bases: list[int],
    budget: int,
    bar: tqdm,
    pool: ThreadPoolExecutor,
) -> None:
    """Pass 1: read the source in storage order, a window of about ``budget`` bytes at a time,
    and append each window's rows to their band's region of the spill (band ``k``: the copy's
    rows ``bands[k]:bands[k + 1]``, at units ``out_ptr[bands[k]]`` onwards of part ``p``'s
    region at byte ``bases[p]``). A band's region then holds its rows in source order."""
    ptr, n_bands = matrix.ptr, len(bands) - 1
    lengths = np.diff(ptr)
    inverse = np.empty_like(perm)
    inverse[perm] = np.arange(len(perm))
    band_of = np.repeat(np.arange(n_bands), np.diff(bands))[inverse]  # per source row
    del inverse
    cursor = out_ptr[bands[:-1]].copy()  # each band's next free unit
    unit = matrix.unit_bytes
    windows = (w for w in _chunks(lengths * sum(unit), budget) if ptr[w[1]] > ptr[w[0]])

    def read(window: tuple[int, int]) -> list[np.ndarray]:
        lo, hi = int(ptr[window[0]]), int(ptr[window[1]])
        return [matrix.read(p, lo, hi) for p in range(len(matrix.parts))]

    for (s, e), buffers in _ahead(windows, read, pool):
        lo, hi = int(ptr[s]), int(ptr[e])
        order = np.argsort(band_of[s:e], kind="stable")
        held = np.bincount(band_of[s:e], weights=lengths[s:e], minlength=n_bands)
        held = held.astype(np.int64)
        hit = np.flatnonzero(held)
        at = np.concatenate([[0], np.cumsum(held[hit])])  # each band's run in the window
        for p in range(len(matrix.parts)):
            runs = _gather(buffers[p], ptr[s:e][order] - lo, lengths[s:e][order], matrix.dense)
            buffers[p] = None
            for k, a, b in zip(hit.tolist(), at[:-1].tolist(), at[1:].tolist(), strict=True):
                _pwrite_all(spill_fd, runs[a:b], bases[p] + int(cursor[k]) * unit[p])
            del runs
        cursor[hit] += held[hit]
        bar.update((hi - lo) * sum(unit))
    if not np.array_equal(cursor, out_ptr[bands[1:]]):  # every unit of every band written once
        raise RuntimeError("write_shuffled: the bands were not filled exactly (a bug).")


def _sort_band(
    matrix: _Matrix,
    targets: list[_Target],
    perm: np.ndarray,
    out_ptr: np.ndarray,
    a: int,
    b: int,
    held_parts: list[np.ndarray],
    bar: tqdm,
) -> None:
    """Pass 2: the copy's rows ``a:b`` (one band), as held (``held_parts``: each part's units
    ``out_ptr[a]:out_ptr[b]`` with the rows in source order), ordered in memory and written
    into the copy in one piece per part."""
    lengths = np.diff(matrix.ptr)
    rows = perm[a:b]
    order = np.argsort(rows)  # the band's rows as held: by source position
    held = lengths[rows[order]]
    held_start = np.concatenate([[0], np.cumsum(held)[:-1]])
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    starts, wanted = held_start[rank], lengths[rows]
    lo, hi = int(out_ptr[a]), int(out_ptr[b])
    for p, target in enumerate(targets):
        values = _gather(held_parts[p], starts, wanted, matrix.dense)
        held_parts[p] = None
        target.write(lo, values)
        del values
    bar.update((hi - lo) * sum(matrix.unit_bytes))


def _write_matrix(
    matrix: _Matrix,
    targets: list[_Target],
    perm: np.ndarray,
    budget: int,
    spill: _Spill,
    bar: tqdm,
) -> None:
    """Write ``matrix`` into ``targets`` with its rows in the order ``perm``: an external
    shuffle in bands of about ``budget`` bytes of the copy.

    One band (the matrix fits in ``budget``): read whole from the source, ordered in memory,
    written once. Several: pass 1 (:func:`_band_spill`) streams the source into the bands'
    regions, pass 2 (:func:`_sort_band`) orders one band at a time. The regions are the
    copy's own allocated bytes (each band sorted in place) or, for a compressed copy, the
    spill file. Every read and write is sequential or a large run: about 4x the matrix's
    bytes of I/O. The next window or band is read (in a thread) while one is written.
    """
    out_ptr = np.concatenate([[0], np.cumsum(np.diff(matrix.ptr)[perm])])
    if out_ptr[-1] == 0:
        return
    with ThreadPoolExecutor(1, thread_name_prefix="write_shuffled") as pool:
        _two_passes(matrix, targets, perm, out_ptr, budget, spill, bar, pool)


def _two_passes(
    matrix: _Matrix,
    targets: list[_Target],
    perm: np.ndarray,
    out_ptr: np.ndarray,
    budget: int,
    spill: _Spill,
    bar: tqdm,
    pool: ThreadPoolExecutor,
) -> None:
    unit = matrix.unit_bytes
    if matrix.nbytes <= budget:
        bands = np.array([0, len(perm)])
        first = int(matrix.ptr[0])

        def read_held(p: int, lo: int, hi: int) -> np.ndarray:
            return matrix.read(p, first + lo, first + hi)  # all rows, in source order

    else:
        bands = _cuts(np.diff(out_ptr) * sum(unit), budget)
        if all(t.offset is not None for t in targets):  # the copy's own space holds the bands
            fd, bases = targets[0].fd, [t.offset for t in targets]
        else:
            fd = spill.fd
            bases = np.concatenate([[0], np.cumsum([int(out_ptr[-1]) * u for u in unit])])
            bases = bases[:-1].tolist()
        _band_spill(matrix, perm, out_ptr, bands, fd, bases, budget, bar, pool)

        def read_held(p: int, lo: int, hi: int) -> np.ndarray:
            part = matrix.parts[p]
            buffer = np.empty((hi - lo, *part.shape[1:]), dtype=part.dtype)
            _pread_into(fd, buffer, bases[p] + lo * unit[p])
            return buffer

    def read(band: tuple[int, int]) -> list[np.ndarray]:
        lo, hi = int(out_ptr[band[0]]), int(out_ptr[band[1]])
        return [read_held(p, lo, hi) for p in range(len(matrix.parts))]

    for (a, b), held_parts in _ahead(itertools.pairwise(bands.tolist()), read, pool):
        _sort_band(matrix, targets, perm, out_ptr, a, b, held_parts, bar)


def _write_per_cell(
    source: h5py.Group | h5py.Dataset,
    matrix: _Matrix | None,
    target: h5py.Group,
    name: str,
    perm: np.ndarray,
    budget: int,
    compression: str | None,
    bar: tqdm,
    fd: int,
    spill: _Spill,
) -> None:
    if matrix is None:  # a data frame in obsm: small, through anndata
        from ._compat import read_elem, write_elem

        write_elem(target, name, read_elem(source).iloc[perm])
        bar.update(_stored_bytes(source))
        return
    if not matrix.dense:
        group = target.create_group(name)
        _copy_attrs(source, group)
        lengths = np.diff(matrix.ptr)[perm]
        indptr = np.concatenate([[0], np.cumsum(lengths)])
        group.create_dataset("indptr", data=indptr.astype(source["indptr"].dtype))
        nnz = int(indptr[-1])
        targets = [
            _new_target(group, k, source[k], (nnz,), compression, fd) for k in ("data", "indices")
        ]
    else:
        targets = [_new_target(target, name, source, source.shape, compression, fd)]
    _write_matrix(matrix, targets, perm, budget, spill, bar)


# -- the copy -----------------------------------------------------------------------------------


def _plan(f: h5py.File, n_obs: int) -> list[tuple[str, str]]:
    """(path, kind) of every per-cell element to stream, checked before anything is written."""
    plan = []
    if "X" in f:
        plan.append(("X", _check_per_cell("X", f["X"], n_obs)))
    for group in ("layers", "obsm"):
        for key in f.get(group, {}):
            plan.append((f"{group}/{key}", _check_per_cell(f"{group}/{key}", f[group][key], n_obs)))
    if "raw" in f and "X" in f["raw"]:
        plan.append(("raw/X", _check_per_cell("raw/X", f["raw/X"], n_obs)))
    return plan


def _n_obs(f: h5py.File) -> int:
    from ._compat import read_elem

    if _encoding(f) != "anndata" and "obs" not in f:
        raise ValueError(
            "write_shuffled: the source is an HDF5 file but not an AnnData .h5ad (no obs)."
        )
    obs = f["obs"]
    index = obs.attrs["_index"]
    return len(read_elem(obs[index.decode() if isinstance(index, bytes) else index]))


def _write(
    f: h5py.File,
    out: h5py.File,
    perm: np.ndarray,
    plan: list[tuple[str, str]],
    index_key: str | None,
    budget: int,
    compression: str | None,
    progress: bool | None,
    name: str,
) -> None:
    from ._compat import read_elem, write_elem

    _copy_attrs(f, out)
    obs = read_elem(f["obs"]).iloc[perm]
    if index_key is not None:
        if index_key in obs.columns:
            raise ValueError(
                f"write_shuffled: obs already has a column {index_key!r} (a shuffled copy of a "
                "shuffled copy?). Pass another index_key, or index_key=None not to record the "
                "source positions."
            )
        obs = obs.assign(**{index_key: perm})
    write_elem(out, "obs", obs)
    del obs  # (about 160 MiB at 1M cells) not held while the matrices are written
    if "obsp" in f:
        obsp = out.create_group("obsp")
        _copy_attrs(f["obsp"], obsp)
        for key in f["obsp"]:  # cell x cell graphs: permute both axes, in memory
            write_elem(obsp, key, read_elem(f["obsp"][key])[perm][:, perm])
    for key in f:
        if key in ("obs", "obsp", "X", "layers", "obsm", "raw"):
            continue
        f.copy(f[key], out, name=key)  # var, varm, varp, uns, ...: unchanged, exactly
    for group in ("layers", "obsm", "raw"):
        if group in f:
            _copy_attrs(f[group], out.create_group(group))
    if "raw" in f:
        for key in f["raw"]:
            if key != "X":
                f.copy(f["raw"][key], out["raw"], name=key)
    matrices = {p: _Matrix.of(f[p], kind, len(perm)) for p, kind in plan if kind != "dataframe"}
    # a matrix larger than the budget is read and written twice (two passes)
    total = sum(_stored_bytes(f[p]) for p, kind in plan if kind == "dataframe") + sum(
        m.nbytes * (2 if m.nbytes > budget else 1) for m in matrices.values()
    )
    disable = None if progress is None else not progress  # None: only on a terminal
    spill = _Spill(Path(out.filename).parent, name)
    with tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name, disable=disable
    ) as bar:
        fd = os.open(out.filename, os.O_RDWR)  # matrices go straight into their space
        source_fd = os.open(f.filename, os.O_RDONLY)
        try:
            for matrix in matrices.values():
                matrix.read_directly(source_fd)
            for path, _ in plan:
                parent, _, key = path.rpartition("/")
                target = out[parent] if parent else out
                matrix = matrices.get(path)
                _write_per_cell(
                    f[path], matrix, target, key, perm, budget, compression, bar, fd, spill
                )
        finally:
            os.close(fd)
            os.close(source_fd)
            spill.close()


def write_shuffled(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    seed: int = 0,
    *,
    overwrite: bool = False,
    chunk_mib: float = 64,
    index_key: str | None = "source_index",
    compression: str | None = None,
    progress: bool | None = None,
) -> np.ndarray:
    """Write a copy of an ``.h5ad`` file with its cells in a seeded random order, streaming.

    X, layers, ``obsm`` and ``raw.X`` (CSR or dense) are shuffled externally, in bands of
    about ``chunk_mib`` of the copy. Pass 1 reads the source in storage order, a window of
    ``chunk_mib`` at a time, and appends each window's cells to their band's place in the
    copy; pass 2 reads one band at a time, orders its cells in memory and writes the band back
    in one piece. Every read and write is sequential or a run of many cells (about 4x the
    matrix's bytes of I/O), also for chunked or gzip-compressed sources, and peak memory is
    about 5x ``chunk_mib`` (plus a few arrays of one number per cell), not the matrix size.
    A matrix no larger than ``chunk_mib`` is read once, ordered in memory and written once.
    obs is reordered; var, varm, varp and uns are copied unchanged; obsp graphs are permuted
    on both axes (in memory). The source is opened read-only and never modified. The copy is
    written to a temporary file in the destination's folder and moved into place when
    complete: an error or Ctrl-C leaves nothing at the destination (a process killed
    outright, e.g. ``kill -9``, can leave hidden ``.<name>.*.partial`` or ``.spill`` files
    next to it, never a partial destination).

    Parameters
    ----------
    source
        The ``.h5ad`` file to shuffle.
    destination
        Where to write the copy; must not be the source.
    seed
        Seed of the permutation (``numpy.random.default_rng(seed)``).
    overwrite
        Replace an existing ``destination`` (only once the copy is complete).
    chunk_mib
        Matrix data per step, in MiB: a window of the source in pass 1, a band of the copy in
        pass 2. Peak memory is about 5x this (the step being written, the next one being
        read); larger steps mean fewer, larger writes in pass 1.
    index_key
        obs column that records each cell's position in the source (``None``: not recorded);
        cell names (obs_names) are kept either way.
    compression
        HDF5 compression of the copy's matrices (``"gzip"``, ``"lzf"``); default none, the
        fastest to read. A compressed copy holds its bands between the passes in a temporary
        spill file beside it (as large as the largest matrix, uncompressed; counted in the
        free-space check and removed at the end), and compressing is slower than the disk.
    progress
        Show a progress bar; ``None`` shows it on a terminal only.

    Returns
    -------
    numpy.ndarray
        The permutation: row ``i`` of the copy is row ``perm[i]`` of the source.

    Raises
    ------
    ValueError
        The destination is the source; a matrix is stored CSC (convert it to CSR first) or in
        an encoding the writer cannot reorder.
    FileExistsError
        The destination exists and ``overwrite`` is false.
    OSError
        The destination's disk has less free space than the copy (and a compressed copy's
        spill) needs: checked before writing; the message gives both sizes.
    """
    source, destination = Path(source), Path(destination)
    _check_paths(source, destination, overwrite)
    if not chunk_mib > 0:
        raise ValueError(f"write_shuffled: chunk_mib must be positive, got {chunk_mib!r}.")
    budget = max(1, int(chunk_mib * 2**20))
    try:
        f = h5py.File(source, "r")
    except OSError as err:
        raise ValueError(
            f"write_shuffled: {str(source)!r} is not an HDF5 file ({err}); it reads .h5ad files "
            "(for other formats, load them with anndata and write_h5ad first)."
        ) from err
    with f:
        n_obs = _n_obs(f)
        plan = _plan(f, n_obs)
        spill = 0  # a compressed copy's largest matrix waits in a spill file between passes
        if compression is not None:
            sizes = [_stored_bytes(f[p]) for p, kind in plan if kind != "dataframe"]
            spill = max([size for size in sizes if size > budget], default=0)
        _check_space(_stored_bytes(f), spill, destination.parent)
        perm = np.random.default_rng(seed).permutation(n_obs)
        tmp = _new_file(destination.parent, f".{destination.name}.", ".partial")
        try:
            with h5py.File(tmp, "w") as out:
                _write(
                    f, out, perm, plan, index_key, budget, compression, progress, destination.name
                )
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, destination)
        except BaseException:  # KeyboardInterrupt included: never leave a partial copy
            tmp.unlink(missing_ok=True)
            raise
    try:  # make the rename durable
        fd = os.open(destination.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return perm
