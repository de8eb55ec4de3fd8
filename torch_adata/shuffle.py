"""A shuffled copy of an ``.h5ad`` file, written streaming: for data larger than memory.

A backed file is read fastest in storage order (:class:`~torch_adata.samplers.BlockShuffleSampler`
reads contiguous blocks), but files are often stored sorted (by sample, donor, cell type), so
blocks of neighbours make batches far less mixed than uniform sampling. :func:`write_shuffled`
writes the cells once in a seeded random order; block shuffle on the copy then reads
sequentially *and* gives batches mixed like uniform sampling's.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
from tqdm.auto import tqdm

__all__ = ["write_shuffled"]

# gaps between wanted source ranges up to this many bytes are read through (one larger read
# instead of two): cheaper than a second request on disks and in HDF5
_GAP_BYTES = 64 * 1024


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


def _check_space(need: int, folder: Path) -> None:
    free = shutil.disk_usage(folder).free
    if need > free:
        raise OSError(
            f"write_shuffled: the shuffled copy needs about {need / 2**20:,.0f} MiB "
            f"(uncompressed) but {str(folder)!r} has {free / 2**20:,.0f} MiB free. Free space "
            "there or write the copy to another disk; nothing was written."
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


# -- reading ranges of the source ---------------------------------------------------------------


def _read_ranges(
    dataset: h5py.Dataset, starts: np.ndarray, ends: np.ndarray, row_bytes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Read the sorted, disjoint ranges ``[starts[i], ends[i])`` of ``dataset`` (axis 0).

    Ranges closer than ``_GAP_BYTES`` are read together. Returns the concatenated reads and
    each range's start in them.
    """
    if len(starts) == 0:
        return np.empty((0, *dataset.shape[1:]), dtype=dataset.dtype), np.empty(0, np.int64)
    gap = max(1, _GAP_BYTES // max(row_bytes, 1))
    breaks = np.flatnonzero(starts[1:] - ends[:-1] > gap) + 1
    window_first = np.concatenate([[0], breaks])
    window_last = np.concatenate([breaks, [len(starts)]]) - 1
    w_start, w_end = starts[window_first], ends[window_last]
    sizes = w_end - w_start
    buffer = np.empty((int(sizes.sum()), *dataset.shape[1:]), dtype=dataset.dtype)
    w_offset = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    for s, e, o in zip(w_start.tolist(), w_end.tolist(), w_offset.tolist(), strict=True):
        if e > s:
            dataset.read_direct(buffer, np.s_[s:e], np.s_[o : o + e - s])
    window = np.repeat(np.arange(len(w_start)), window_last - window_first + 1)
    return buffer, w_offset[window] + (starts - w_start[window])


def _scatter(out: np.ndarray, buffer: np.ndarray, starts: np.ndarray, bounds: np.ndarray) -> None:
    """``out[bounds[j]:bounds[j + 1]] = buffer[starts[j]:...]`` for every row ``j``: a loop of
    slice copies, so no index array as large as the values is built."""
    for lo, hi, s in zip(bounds[:-1].tolist(), bounds[1:].tolist(), starts.tolist(), strict=True):
        out[lo:hi] = buffer[s : s + hi - lo]


def _chunks(costs: np.ndarray, budget: int) -> Iterator[tuple[int, int]]:
    """Cut rows of ``costs`` bytes into consecutive runs of at most ``budget`` bytes (at least
    one row each)."""
    n = len(costs)
    cumulative = np.concatenate([[0], np.cumsum(costs, dtype=np.int64)])
    a = 0
    while a < n:
        b = int(np.searchsorted(cumulative, cumulative[a] + budget, side="right")) - 1
        b = min(max(b, a + 1), n)
        yield a, b
        a = b


# -- writing per-cell elements ------------------------------------------------------------------


def _new_dataset(
    group: h5py.Group, name: str, source: h5py.Dataset, shape: tuple, compression: str | None
) -> h5py.Dataset:
    kwargs = {} if compression is None else {"compression": compression, "chunks": True}
    out = group.create_dataset(name, shape=shape, dtype=source.dtype, **kwargs)
    _copy_attrs(source, out)
    return out


def _allocated(
    group: h5py.Group, name: str, source: h5py.Dataset, shape: tuple
) -> tuple[h5py.Dataset, int | None]:
    """An uncompressed contiguous dataset whose file space is allocated now (not filled), and
    its byte offset in the file (``None`` if HDF5 gives none, e.g. for an empty dataset)."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    out = group.create_dataset(name, shape=shape, dtype=source.dtype, dcpl=dcpl)
    _copy_attrs(source, out)
    return out, out.id.get_offset()


def _pwrite_rows(fd: int, buffer: np.ndarray, bounds: np.ndarray, targets: np.ndarray) -> None:
    """Write row ``j`` of ``buffer`` (``buffer[bounds[j]:bounds[j + 1]]``) at byte ``targets[j]``."""
    view = memoryview(buffer.reshape(-1).view(np.uint8))
    scale = buffer.dtype.itemsize * (buffer[0].size if buffer.ndim > 1 else 1)
    for lo, hi, at in zip(
        (bounds[:-1] * scale).tolist(), (bounds[1:] * scale).tolist(), targets.tolist(), strict=True
    ):
        while hi > lo:  # pwrite may write less than asked
            done = os.pwrite(fd, view[lo:hi], at)
            lo, at = lo + done, at + done


def _scatter_csr(
    source: h5py.Group,
    outs: list[tuple[h5py.Dataset, int]],
    src_indptr: np.ndarray,
    indptr: np.ndarray,
    inverse: np.ndarray,
    budget: int,
    fd: int,
    bar: tqdm,
) -> None:
    """Read the source in order, a window of rows at a time, and write each row at its place
    in the copy: one sequential pass over the source (cheap for chunked or compressed files),
    scattered writes into the copy's allocated space."""
    arrays = [source["data"], source["indices"]]
    cell_bytes = sum(a.dtype.itemsize for a in arrays)
    for s, e in _chunks(np.diff(src_indptr) * cell_bytes, budget):
        lo, hi = int(src_indptr[s]), int(src_indptr[e])
        if hi == lo:
            continue
        for array, (_, offset) in zip(arrays, outs, strict=True):
            buffer = np.empty(hi - lo, dtype=array.dtype)
            array.read_direct(buffer, np.s_[lo:hi])
            targets = offset + indptr[inverse[s:e]] * array.dtype.itemsize
            _pwrite_rows(fd, buffer, src_indptr[s : e + 1] - lo, targets)
        bar.update((hi - lo) * cell_bytes)


def _write_csr(
    source: h5py.Group,
    target: h5py.Group,
    name: str,
    perm: np.ndarray,
    budget: int,
    compression: str | None,
    bar: tqdm,
    fd: int | None = None,
) -> None:
    src_indptr = source["indptr"][:].astype(np.int64)
    lengths = np.diff(src_indptr)[perm]
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    group = target.create_group(name)
    _copy_attrs(source, group)
    group.create_dataset("indptr", data=indptr.astype(source["indptr"].dtype))
    nnz = int(indptr[-1])
    if fd is not None and compression is None and nnz:
        outs = [_allocated(group, k, source[k], (nnz,)) for k in ("data", "indices")]
        if all(offset is not None for _, offset in outs):
            inverse = np.empty_like(perm)
            inverse[perm] = np.arange(len(perm))
            _scatter_csr(source, outs, src_indptr, indptr, inverse, budget, fd, bar)
            return
        for k in ("data", "indices"):
            del group[k]
    arrays = [source["data"], source["indices"]]
    outs = [_new_dataset(group, k, source[k], (nnz,), compression) for k in ("data", "indices")]
    cell_bytes = sum(a.dtype.itemsize for a in arrays)
    for a, b in _chunks(lengths * cell_bytes, budget):
        rows = perm[a:b]
        order = np.argsort(rows, kind="stable")
        starts, ends = src_indptr[rows[order]], src_indptr[rows[order] + 1]
        for array, out in zip(arrays, outs, strict=True):
            buffer, offset = _read_ranges(array, starts, ends, array.dtype.itemsize)
            in_order = np.empty_like(offset)
            in_order[order] = offset  # each output row's start in the buffer
            values = np.empty(int(indptr[b] - indptr[a]), dtype=buffer.dtype)
            _scatter(values, buffer, in_order, indptr[a : b + 1] - indptr[a])
            if len(values):
                out.write_direct(values, dest_sel=np.s_[indptr[a] : indptr[b]])
            del buffer, values
        bar.update(int(lengths[a:b].sum()) * cell_bytes)


def _write_dense(
    source: h5py.Dataset,
    target: h5py.Group,
    name: str,
    perm: np.ndarray,
    budget: int,
    compression: str | None,
    bar: tqdm,
    fd: int | None = None,
) -> None:
    row_bytes = int(np.prod(source.shape[1:], dtype=np.int64)) * source.dtype.itemsize
    if fd is not None and compression is None and source.size:
        out, offset = _allocated(target, name, source, source.shape)
        if offset is not None:  # read in order, write each row at its place
            inverse = np.empty_like(perm)
            inverse[perm] = np.arange(len(perm))
            for s, e in _chunks(np.full(len(perm), row_bytes), budget):
                buffer = np.empty((e - s, *source.shape[1:]), dtype=source.dtype)
                source.read_direct(buffer, np.s_[s:e])
                _pwrite_rows(fd, buffer, np.arange(e - s + 1), offset + inverse[s:e] * row_bytes)
                bar.update((e - s) * row_bytes)
            return
        del target[name]
    out = _new_dataset(target, name, source, source.shape, compression)
    for a, b in _chunks(np.full(len(perm), row_bytes), budget):
        rows = perm[a:b]
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        buffer, offset = _read_ranges(source, sorted_rows, sorted_rows + 1, row_bytes)
        in_order = np.empty_like(offset)
        in_order[order] = offset
        values = np.empty((b - a, *source.shape[1:]), dtype=source.dtype)
        np.take(buffer, in_order, axis=0, out=values)
        del buffer
        if len(values):
            out.write_direct(values, dest_sel=np.s_[a:b])
        bar.update((b - a) * row_bytes)


def _write_per_cell(
    source: h5py.Group | h5py.Dataset,
    target: h5py.Group,
    name: str,
    kind: str,
    perm: np.ndarray,
    budget: int,
    compression: str | None,
    bar: tqdm,
    fd: int | None = None,
) -> None:
    if kind == "csr":
        _write_csr(source, target, name, perm, budget, compression, bar, fd)
    elif kind == "dense":
        _write_dense(source, target, name, perm, budget, compression, bar, fd)
    else:  # a data frame in obsm: small, through anndata
        from ._compat import read_elem, write_elem

        write_elem(target, name, read_elem(source).iloc[perm])
        bar.update(_stored_bytes(source))


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
        obs[index_key] = perm
    write_elem(out, "obs", obs)
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
    total = sum(
        int(np.diff(f[p]["indptr"][:].astype(np.int64)).sum())
        * (f[p]["data"].dtype.itemsize + f[p]["indices"].dtype.itemsize)
        if kind == "csr"
        else _stored_bytes(f[p])
        for p, kind in plan
    )
    disable = None if progress is None else not progress  # None: only on a terminal
    with tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name, disable=disable
    ) as bar:
        fd = os.open(out.filename, os.O_WRONLY)  # matrices are written straight into their space
        try:
            for path, kind in plan:
                parent, _, key = path.rpartition("/")
                target = out[parent] if parent else out
                _write_per_cell(f[path], target, key, kind, perm, budget, compression, bar, fd)
        finally:
            os.close(fd)


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

    X, layers, ``obsm`` and ``raw.X`` (CSR or dense) are read in storage order, a window of
    ``chunk_mib`` at a time, and each cell is written straight to its place in the copy (whose
    space is allocated up front): one sequential pass over the source, also for chunked or
    gzip-compressed sources, and peak memory bounded by ``chunk_mib`` (plus a few arrays of one
    number per cell), not by the matrix size. obs is reordered; var, varm, varp and uns are copied unchanged; obsp
    graphs are permuted on both axes (in memory). The source is opened read-only and never
    modified. The copy is written to a temporary file in the destination's folder and moved
    into place when complete: an error or Ctrl-C leaves nothing at the destination (a process
    killed outright, e.g. ``kill -9``, can leave a hidden ``.<name>.*.partial`` file next to
    it, never a partial destination).

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
        Matrix data read per step, in MiB (with ``compression``, written per step; the step's
        reads and values are then held at once, about 2-3x this).
    index_key
        obs column that records each cell's position in the source (``None``: not recorded);
        cell names (obs_names) are kept either way.
    compression
        HDF5 compression of the copy's matrices (``"gzip"``, ``"lzf"``); default none, the
        fastest to read. A compressed copy is gathered in its own order instead (the source's
        cells read a few at a time: several times slower).
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
        The destination's disk has less free space than the copy needs (checked before
        writing; the message gives both sizes).
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
        _check_space(_stored_bytes(f), destination.parent)
        perm = np.random.default_rng(seed).permutation(n_obs)
        fd, tmp_name = tempfile.mkstemp(
            dir=destination.parent, prefix=f".{destination.name}.", suffix=".partial"
        )
        os.close(fd)
        tmp = Path(tmp_name)
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
