"""Gather kernels, numba and numpy: CSR rows to dense/CSR and file ranges read with pread.

Every kernel is checked against scipy's indexing (or plain numpy slicing of the stored array)
on inputs that exercise the paths the fast versions special-case: no column map, a column map,
duplicate and unsorted rows, empty rows, and file ranges that cross chunk boundaries.
"""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest
import scipy.sparse as sp

import torch_adata as ta
from torch_adata._gather import _ReadOnlyDescriptor, _storage_layout, read_whole
from torch_adata._kernels import get_kernels, read_ranges_threadsafe

ENGINES = ["numba", "numpy"]


def _read_ranges(engine: str, threadsafe: bool):
    """The engine's read_ranges, or the variant reader threads run concurrently."""
    return read_ranges_threadsafe(engine) if threadsafe else get_kernels(engine).read_ranges


@pytest.fixture(autouse=True, params=["parallel", "serial"])
def threads(request, monkeypatch):
    """Every kernel test runs the parallel kernels and the serial ones calls of few rows or
    ranges use (numba)."""
    from torch_adata import _kernels

    monkeypatch.setattr(_kernels, "_SERIAL_BELOW", 0 if request.param == "parallel" else 10**9)
    return request.param


@pytest.fixture(scope="module")
def csr():
    rng = np.random.default_rng(5)
    m = sp.random(60, 40, density=0.2, format="csr", dtype=np.float32, random_state=rng)
    m.data[:] = rng.integers(1, 9, m.nnz)
    m = sp.diags((np.arange(60) != 7).astype(np.float32)) @ m  # row 7 stores nothing
    m.eliminate_zeros()
    assert m.indptr[8] == m.indptr[7]
    return sp.csr_matrix(m)


ROWS = [
    np.array([3, 7, 3, 59, 0], dtype=np.int64),
    np.arange(60)[::-1].copy(),
    np.empty(0, np.int64),
]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("rows", ROWS, ids=["dups", "all_reversed", "none"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_csr_to_csr_without_column_map_equals_scipy(csr, engine, rows, dtype):
    k = get_kernels(engine)
    n_cols = csr.shape[1]
    indptr, cols, vals = k.csr_to_csr(csr.indptr, csr.indices, csr.data, rows, None, dtype, n_cols)
    assert indptr.dtype == np.int32 and cols.dtype == np.int32 and vals.dtype == dtype
    got = sp.csr_matrix((vals.astype(np.float64), cols, indptr), shape=(len(rows), csr.shape[1]))
    np.testing.assert_array_equal(got.toarray(), csr[rows].toarray())


@pytest.mark.parametrize("engine", ENGINES)
def test_csr_to_csr_with_column_map_drops_and_renumbers(csr, engine):
    keep = np.array([39, 0, 5, 6, 20])
    col_map = np.full(csr.shape[1], -1, dtype=np.int64)
    col_map[keep] = np.arange(len(keep))
    rows = ROWS[0]
    k = get_kernels(engine)
    indptr, cols, vals = k.csr_to_csr(
        csr.indptr, csr.indices, csr.data, rows, col_map, np.float64, len(keep)
    )
    assert vals.dtype == np.float64 and cols.dtype == np.int32
    got = sp.csr_matrix((vals, cols, indptr), shape=(len(rows), len(keep))).toarray()
    np.testing.assert_array_equal(got, csr[rows][:, keep].toarray())


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("wide", [False, True], ids=["int32_indices", "int64_indices"])
def test_csr_to_csr_indices_are_int32_only_where_the_columns_fit(csr, engine, wide):
    indices = csr.indices.astype(np.int64)
    if wide:  # a matrix wider than int32 can count: its columns need int64
        indices[::3] += 2**31
    n_cols = int(indices.max()) + 1
    rows = ROWS[0]
    k = get_kernels(engine)
    indptr, cols, _ = k.csr_to_csr(csr.indptr, indices, csr.data, rows, None, np.float32, n_cols)
    assert indptr.dtype == cols.dtype == (np.int64 if wide else np.int32)
    want = np.concatenate([indices[csr.indptr[r] : csr.indptr[r + 1]] for r in rows])
    np.testing.assert_array_equal(cols, want)


def test_index_dtype_widens_for_columns_or_non_zeros_past_int32():
    from torch_adata._kernels import index_dtype

    assert index_dtype(20_000, 10**6) == np.int32
    assert index_dtype(2**31 - 1, 2**31 - 1) == np.int32
    assert index_dtype(2**31, 5) == np.int64
    assert index_dtype(5, 2**31) == np.int64


@pytest.mark.parametrize("engine", ENGINES)
def test_csr_to_dense_writes_into_a_dirty_output(csr, engine):
    rows = ROWS[0]
    out = np.full((len(rows), csr.shape[1]), np.nan, dtype=np.float32)
    got = get_kernels(engine).csr_to_dense(csr.indptr, csr.indices, csr.data, rows, None, out)
    assert got is out
    np.testing.assert_array_equal(out, csr[rows].toarray())


@pytest.fixture(scope="module", params=[None, 7], ids=["contiguous", "chunks_of_7"])
def stored(tmp_path_factory, request):
    """A float32 and an int32 dataset of 500 elements in one HDF5 file, uncompressed."""
    path = tmp_path_factory.mktemp("ranges") / f"ranges_{request.param}.h5"
    values = np.arange(500, dtype=np.float32) * 1.5
    with h5py.File(path, "w") as f:
        f.create_dataset("a", data=values, chunks=(request.param,) if request.param else None)
        f.create_dataset("b", data=np.arange(500, dtype=np.int32)[::-1].copy())
    return path, values


@pytest.mark.parametrize("threadsafe", [False, True], ids=["kernel", "threadsafe"])
@pytest.mark.parametrize("engine", ENGINES)
def test_read_ranges_crosses_chunks_and_lands_at_offsets(stored, engine, threadsafe):
    path, values = stored
    with h5py.File(path, "r") as f:
        base, chunk_len = _storage_layout(f["a"])
        if f["a"].chunks:
            assert len(base) == -(-500 // 7)
    starts = np.array([0, 5, 13, 499, 100, 200], dtype=np.int64)  # 5..19 spans three chunks
    lengths = np.array([3, 15, 0, 1, 40, 7], dtype=np.int64)
    offsets = np.cumsum(lengths) - lengths
    out = np.full(int(lengths.sum()), -1, dtype=np.float32)
    fd = _ReadOnlyDescriptor(str(path))
    _read_ranges(engine, threadsafe)(fd.fd, base, chunk_len, starts, lengths, offsets, out)
    want = np.concatenate([values[s : s + n] for s, n in zip(starts, lengths, strict=True)])
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("threadsafe", [False, True], ids=["kernel", "threadsafe"])
@pytest.mark.parametrize("engine", ENGINES)
def test_read_ranges_past_the_end_of_the_file_raises(stored, engine, threadsafe):
    path, _ = stored
    with h5py.File(path, "r") as f:
        base, chunk_len = _storage_layout(f["a"])
    fd = _ReadOnlyDescriptor(str(path))
    far = base + 10**9  # a layout pointing beyond the file
    out = np.empty(4, dtype=np.float32)
    one = np.array([0], dtype=np.int64)
    with pytest.raises(OSError, match="shorter than its HDF5 layout"):
        _read_ranges(engine, threadsafe)(fd.fd, far, chunk_len, one, one + 3, one * 0, out)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("piece", [1, 64, 10**6])
def test_read_whole_reads_every_piece_into_place(stored, engine, piece):
    path, values = stored
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(read_whole(f["a"], str(path), engine, piece), values)
        want = np.arange(500, dtype=np.int32)[::-1]
        np.testing.assert_array_equal(read_whole(f["b"], str(path), engine, piece), want)


def test_compressed_dataset_has_no_direct_layout(tmp_path):
    with h5py.File(tmp_path / "z.h5", "w") as f:
        f.create_dataset("z", data=np.arange(100.0), compression="gzip", chunks=(10,))
        assert _storage_layout(f["z"]) is None
        f.create_dataset("be", data=np.arange(100, dtype=">f4"))
        assert _storage_layout(f["be"]) is None  # other byte order: h5py converts it


def test_building_a_dataset_loads_the_kernels_workers_will_inherit(csr):
    from torch_adata import _kernels

    ad = pytest.importorskip("anndata")
    if not _kernels.HAVE_NUMBA:
        pytest.skip("numba is not installed")
    _kernels._WARM_IN = None  # as in a process that has not built a dataset yet
    ta.AnnDataset(ad.AnnData(csr), engine="numba")
    assert _kernels._WARM_IN == os.getpid()
    for kernel in (
        _kernels._nb_csr_to_dense,
        _kernels._nb_csr_fill_all,
        _kernels._nb_read_ranges,
        _kernels._nb_csr_to_dense_serial,
        _kernels._nb_csr_fill_serial,
        _kernels._nb_read_ranges_serial,
    ):
        loaded = {tuple(str(t) for t in sig) for sig in kernel.signatures}
        assert any("array(float32, 1d, C)" in sig for sig in loaded), kernel
