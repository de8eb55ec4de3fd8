"""Backed reads: a path, ``read_h5ad(backed="r")`` and views of it, through direct ``pread`` reads
and through h5py runs, compressed and chunked files, dense X; values against anndata's slicing."""

from __future__ import annotations

import os
from importlib.metadata import version

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import (
    N_OBS,
    N_VARS,
    assert_unchanged,
    backed_csr_readers,
    check_batch,
    evict,
    expected_matrix,
    force_h5py,
    make_adata,
    snapshot,
    write_h5ad,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from packaging.version import Version

import torch_adata as ta
from torch_adata import AnnDataset, SparseBatch
from torch_adata._gather import BackedCSRReader, BackedDenseReader

MASK = np.arange(N_OBS) % 3 != 1
GENES = [7, 2, 9, 0, 4]
SOURCES = ["path", "backed", "backed_view", "backed_view_genes"]


def open_source(kind: str, path):
    """(what to give AnnDataset, the in-memory AnnData that anndata's slicing is checked on,
    the backed AnnData to close or None)."""
    memory = ad.read_h5ad(path)
    if kind == "path":
        return str(path), memory, None
    backed = ad.read_h5ad(path, backed="r")
    if kind == "backed":
        return backed, memory, backed
    if kind == "backed_view":
        return backed[MASK], memory[MASK], backed
    return backed[MASK, GENES], memory[MASK, GENES], backed


@pytest.fixture
def source(request, h5ad_files):
    kind, file = request.param
    given_, ref, backed = open_source(kind, h5ad_files[file])
    yield given_, ref
    if backed is not None:
        backed.file.close()


def rows_for(n: int):
    return st.lists(st.integers(0, n - 1), max_size=25)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense_out", "sparse_out"])
@pytest.mark.parametrize("engine", ["numba", "numpy"])
@pytest.mark.parametrize("read", ["direct", "h5py"])
@pytest.mark.parametrize("source", [(k, "csr") for k in SOURCES], ids=SOURCES, indirect=True)
def test_backed_csr_equals_anndata_slicing(source, read, engine, sparse):
    given_, ref = source
    dataset = AnnDataset(given_, obs_keys=["cell_type", "n_genes"], engine=engine, sparse=sparse)
    if read == "h5py":
        force_h5py(dataset)
    (reader,) = backed_csr_readers(dataset)
    assert reader.mode == read
    dense_twin = AnnDataset(given_, engine=engine)

    @settings(max_examples=12, deadline=None)
    @given(rows=rows_for(ref.n_obs))
    def check(rows):
        batch = dataset[rows]
        check_batch(dataset, ref, rows, batch)
        if sparse:
            np.testing.assert_array_equal(batch["X"].to_dense().numpy(), dense_twin[rows].numpy())

    check()


@pytest.fixture(scope="module")
def wide_file(h5ad_dir):
    """Enough stored values per row (~270) that rows more than ~15 apart fall into separate
    h5py runs (runs merge across gaps of up to 4096 stored values)."""
    path = h5ad_dir / "wide.h5ad"
    write_h5ad(make_adata("csr", n_obs=80, n_vars=900, seed=3), path)
    return path, ad.read_h5ad(path)


@pytest.mark.parametrize("read", ["direct", "h5py"])
@pytest.mark.parametrize("engine", ["numba", "numpy"])
def test_runs_far_apart_and_all_rows(wide_file, read, engine):
    path, memory = wide_file
    dataset = AnnDataset(path, engine=engine, sparse=True)
    backed = ad.read_h5ad(path, backed="r")
    view = AnnDataset(backed[::3, 100:700:7], engine=engine)
    backed.file.close()  # the dataset reads through its own handle
    if read == "h5py":
        force_h5py(dataset)
        force_h5py(view)
    view_ref = memory[::3, 100:700:7].copy()
    fixed = [[79, 0, 40, 0, 78], list(range(80))[::-1], [0, 5, 10], [1, 2, 3, 60, 61]]
    for rows in fixed:
        got = dataset[rows]
        assert isinstance(got, SparseBatch)
        np.testing.assert_array_equal(got.to_dense().numpy(), expected_matrix(memory, rows))

    @settings(max_examples=15, deadline=None)
    @given(rows=st.lists(st.integers(0, 79), max_size=40))
    def check(rows):
        got = dataset[rows].to_dense().numpy()
        np.testing.assert_array_equal(got, expected_matrix(memory, rows))
        in_view = [r % view.source.n_obs for r in rows]
        np.testing.assert_array_equal(view[in_view].numpy(), expected_matrix(view_ref, in_view))

    check()


@pytest.mark.parametrize("engine", ["numba", "numpy"])
@pytest.mark.parametrize("kind", ["path", "backed_view_genes"])
def test_gzip_file_falls_back_to_h5py(h5ad_files, in_memory, kind, engine):
    given_, ref, backed = open_source(kind, h5ad_files["gzip"])
    try:
        dataset = AnnDataset(given_, engine=engine, sparse=True)
        (reader,) = backed_csr_readers(dataset)
        assert reader.mode == "h5py"
        assert "h5py" in repr(dataset)
        for rows in ([4, ref.n_obs - 1, 4, 0], [], list(range(ref.n_obs))):
            np.testing.assert_array_equal(
                dataset[rows].to_dense().numpy(), expected_matrix(ref, rows)
            )
    finally:
        if backed is not None:
            backed.file.close()


@pytest.mark.parametrize("engine", ["numba", "numpy"])
def test_chunked_storage_is_read_directly_chunk_by_chunk(h5ad_files, in_memory, engine):
    dataset = AnnDataset(h5ad_files["chunked"], engine=engine)
    (reader,) = backed_csr_readers(dataset)
    assert reader.mode == "direct"
    assert len(reader.layout.layouts[0][0]) > 5  # really several chunks
    for rows in ([36, 1, 1, 20], list(range(N_OBS))):
        np.testing.assert_array_equal(dataset[rows].numpy(), expected_matrix(in_memory, rows))


@pytest.mark.parametrize("engine", ["numba", "numpy"])
def test_contiguous_storage_is_read_directly(h5ad_files, in_memory, engine):
    dataset = AnnDataset(h5ad_files["contiguous"], engine=engine, sparse=True)
    (reader,) = backed_csr_readers(dataset)
    assert reader.mode == "direct"
    assert len(reader.layout.layouts[0][0]) == 1  # one block: the contiguous path
    for rows in ([36, 1, 1, 20], list(range(N_OBS))[::-1]):
        got = dataset[rows].to_dense().numpy()
        np.testing.assert_array_equal(got, expected_matrix(in_memory, rows))


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("engine", ["numba", "numpy"])
def test_file_with_no_stored_values(tmp_path, engine, sparse):
    adata = make_adata("csr")
    adata.X = sp.csr_matrix(adata.shape, dtype=np.float32)
    adata.obsm["sp"] = sp.csr_matrix((adata.n_obs, 4), dtype=np.float32)
    path = tmp_path / "zeros.h5ad"
    write_h5ad(adata, path)
    dataset = AnnDataset(path, obsm_keys="sp", engine=engine, sparse=sparse)
    batch = ta.densify(dataset[[3, 1, 3]])
    assert batch["X"].shape == (3, N_VARS) and not batch["X"].any()
    assert batch["sp"].shape == (3, 4) and not batch["sp"].any()


@pytest.mark.parametrize("fmt", ["csr_array", "csc_array"])
def test_files_written_from_sparse_arrays(tmp_path, fmt):
    adata = make_adata(fmt)
    path = tmp_path / f"{fmt}.h5ad"
    write_h5ad(adata, path)
    if fmt == "csc_array":
        with pytest.raises(ValueError, match="rewrite the file as CSR"):
            AnnDataset(path)
        return
    rows = [4, 0, 4, 36]
    np.testing.assert_array_equal(AnnDataset(path)[rows].numpy(), expected_matrix(adata, rows))


def test_uncompressed_file_is_read_directly(h5ad_files):
    dataset = AnnDataset(h5ad_files["csr"])
    (reader,) = backed_csr_readers(dataset)
    assert reader.mode == "direct"
    assert "direct" in repr(dataset)


@pytest.mark.parametrize("source", [(k, "dense") for k in SOURCES], ids=SOURCES, indirect=True)
@pytest.mark.parametrize("sparse", [False, True])
def test_backed_dense_x(source, sparse):
    given_, ref = source
    dataset = AnnDataset(given_, obs_keys="batch", sparse=sparse)
    assert isinstance(dataset.fields["X"].reader, BackedDenseReader) or isinstance(
        dataset.fields["X"].reader.base, BackedDenseReader
    )

    @settings(max_examples=10, deadline=None)
    @given(rows=rows_for(ref.n_obs))
    def check(rows):
        check_batch(dataset, ref, rows, dataset[rows])

    check()


@pytest.mark.parametrize("read", ["direct", "h5py"])
def test_path_layers_are_read_from_the_file_and_obsm_once(h5ad_files, in_memory, read):
    path = h5ad_files["csr"]
    rows = [3, 36, 3, 0, 17]
    counts = AnnDataset(path, layer="counts", obsm_keys=["X_pca", "sp", "frame"])
    if read == "h5py":
        force_h5py(counts)
    assert isinstance(counts.fields["X"].reader, BackedCSRReader)
    # obsm entries are small: read into memory once, not from disk every batch
    assert all("in memory" in counts.fields[k].reader.describe() for k in ("sp", "X_pca"))
    batch = counts[rows]
    check_batch(counts, in_memory, rows, batch, layer="counts", obsm_keys=["X_pca", "sp", "frame"])
    scaled = AnnDataset(path, layer="scaled")
    check_batch(scaled, in_memory, rows, scaled[rows], layer="scaled")


def test_backed_anndata_layers_and_obsm(backed, in_memory):
    view = backed[MASK, GENES]
    ref = in_memory[MASK, GENES]
    dataset = AnnDataset(view, layer="counts", obsm_keys=["X_pca", "sp", "frame"])
    rows = [0, 5, 5, ref.n_obs - 1]
    keys = ["X_pca", "sp", "frame"]
    check_batch(dataset, ref, rows, dataset[rows], layer="counts", obsm_keys=keys)


@pytest.mark.parametrize("kind", ["csc", "csr", "dense", "gzip", "chunked", "contiguous"])
def test_path_with_backed_false_loads_the_batched_matrices_into_memory(h5ad_files, kind):
    path = h5ad_files[kind]
    dataset = AnnDataset(path, backed=False, obs_keys="cell_type", obsm_keys="X_pca")
    assert all("in memory" in dataset.fields[k].reader.describe() for k in ("X", "X_pca"))
    assert dataset.adata is None  # the rest of the file (layers, other obsm, uns) stays on disk
    rows = [2, 2, 9, 0]
    check_batch(dataset, ad.read_h5ad(path), rows, dataset[rows], obsm_keys=["X_pca"])


def test_path_source_reads_obs_only_when_a_field_needs_it(h5ad_files, in_memory):
    dataset = AnnDataset(h5ad_files["csr"], backed=False)
    assert dataset.source._obs is None and len(dataset) == N_OBS
    assert dataset.n_vars == N_VARS and dataset.source._var_names is None
    assert dataset.obs_names.equals(in_memory.obs_names)  # read now, on demand


def test_path_source_reads_obs_and_names_from_the_file(h5ad_files, in_memory):
    dataset = AnnDataset(str(h5ad_files["csr"]), obs_keys=["cell_type", "batch"])
    assert dataset.adata is None
    assert len(dataset) == N_OBS and dataset.n_vars == N_VARS
    assert dataset.obs_names.equals(in_memory.obs_names)
    assert dataset.var_names.equals(in_memory.var_names)
    assert list(dataset.encoders["cell_type"].categories) == ["T", "B", "NK", "unused"]
    # anndata stored the string column as a categorical: its category order is kept
    assert dataset.encoders["batch"].categories.equals(in_memory.obs["batch"].cat.categories)


@pytest.mark.skipif(
    Version(version("anndata")) < Version("0.11"),
    reason="anndata 0.10's own backed view reads fail with scipy >= 1.15 (_validate_indices)",
)
def test_backed_anndata_is_not_modified(h5ad_files):
    backed = ad.read_h5ad(h5ad_files["csr"], backed="r")
    try:
        view = backed[MASK, GENES]
        before_backed = {"obs": backed.obs.copy(), "obsm": dict(backed.obsm), "n": backed.n_obs}
        before_view = snapshot(view)
        for given_ in (backed, view):
            dataset = AnnDataset(given_, obs_keys=["cell_type"], obsm_keys="X_pca", sparse=True)
            for batch in torch.utils.data.DataLoader(
                dataset, batch_size=9, shuffle=True, collate_fn=ta.collate
            ):
                ta.densify(batch)
        assert_unchanged(view, before_view)
        assert view.is_view and backed.isbacked
        assert backed.file.is_open
        assert backed.obs.equals(before_backed["obs"])
        assert backed.n_obs == before_backed["n"]
    finally:
        backed.file.close()


def test_compressed_reads_keep_chunks_of_a_pool_cached(h5ad_files, in_memory):
    """Backed h5py reads use a chunk cache big enough for a block-shuffle pool, least recently
    used first (HDF5's default drops fully read chunks first: every chunk here is read whole)."""
    dataset = AnnDataset(h5ad_files["gzip"])
    (reader,) = backed_csr_readers(dataset)
    rows = [5, 6, 7, 30]
    np.testing.assert_array_equal(dataset[rows].numpy(), expected_matrix(in_memory, rows))
    _, n_slots, n_bytes, w0 = reader.file.get().id.get_access_plist().get_cache()
    assert n_bytes >= 32 << 20 and n_slots > n_bytes // (1 << 20) and w0 == 0.0


def test_forked_workers_reuse_the_layout_unless_the_file_changed(tmp_path, monkeypatch):
    path = tmp_path / "x.h5ad"
    first = make_adata("csr")
    write_h5ad(first, path)
    dataset = AnnDataset(str(path))  # building it reads the layout (prepare)
    assert dataset.fields["X"].reader.mode == "direct"
    rows = [4, 0, 4]

    def fetch():
        loader = torch.utils.data.DataLoader(
            dataset,
            sampler=[rows],
            batch_size=None,
            collate_fn=ta.collate,
            num_workers=1,
            multiprocessing_context="fork",
        )
        return next(iter(loader)).numpy()

    def no_layout_reads(*args):
        raise AssertionError("the layout was read again")

    with monkeypatch.context() as m:
        m.setattr(BackedCSRReader, "_read_layout", no_layout_reads)  # inherited by the worker
        np.testing.assert_array_equal(fetch(), first.X[rows].toarray())
    second = make_adata("csr")
    second.X = sp.csr_matrix(np.arange(1.0, second.n_obs * second.n_vars + 1).reshape(second.shape))
    write_h5ad(second, tmp_path / "new.h5ad")  # other row lengths: the old indptr would be wrong
    os.replace(tmp_path / "new.h5ad", path)  # another file now: its layout is read anew
    np.testing.assert_array_equal(fetch(), second.X[rows].toarray())


@pytest.mark.skipif(not hasattr(os, "RWF_NOWAIT"), reason="needs preadv2's RWF_NOWAIT (Linux)")
def test_local_batches_not_in_the_page_cache_announce_their_regions(wide_file, monkeypatch):
    import torch_adata._gather as gather

    path, memory = wide_file
    dataset = AnnDataset(path)
    reader = dataset.fields["X"].reader
    assert reader.mode == "direct"
    monkeypatch.setattr(gather, "_WINDOW", 1000)  # ~4 rows of ~270 stored values per window
    evict(path)
    scattered = [0, 20, 40, 60, 79]  # five runs in five windows: uniform-like, no read-ahead
    np.testing.assert_array_equal(dataset[scattered].numpy(), memory.X[scattered].toarray())
    assert not reader._open().read_ahead
    local = list(range(0, 16, 2))  # eight runs in about four windows: block-like
    with open(path, "rb") as f:
        f.read()  # the whole file in the page cache: a batch found there announces nothing
    _ = dataset[local]
    assert not reader._open().read_ahead
    evict(path)
    np.testing.assert_array_equal(dataset[local].numpy(), memory.X[local].toarray())
    announced = set(reader._open().read_ahead)
    assert 2 <= len(announced) <= 5
    assert announced == set((reader.layout.indptr[local] // 1000).tolist())


@pytest.fixture(scope="module")
def tall_file(h5ad_dir):
    """Rows of ~1,100 stored values (a few pages each), so that scattered rows are separate
    reads; both chunked (anndata's default) and contiguous storage."""
    adata = make_adata("csr", n_obs=600, n_vars=2000, seed=5)
    adata.X = sp.random(600, 2000, density=0.55, format="csr", random_state=5, dtype=np.float32)
    path = h5ad_dir / "tall.h5ad"
    write_h5ad(adata, path)
    return path, adata.X.toarray()


@pytest.mark.skipif(not hasattr(os, "RWF_NOWAIT"), reason="needs preadv2's RWF_NOWAIT (Linux)")
@pytest.mark.parametrize("engine", ["numba", "numpy"])
def test_rows_not_in_the_page_cache_are_read_concurrently(tall_file, engine):
    path, expected = tall_file
    dataset = AnnDataset(str(path), engine=engine, sparse=True)
    (reader,) = backed_csr_readers(dataset)
    assert reader.mode == "direct"
    rng = np.random.default_rng(0)
    for rows in (
        rng.integers(0, 600, 256).tolist(),  # scattered, unsorted, duplicates
        [599, 3, 3, 300, *range(40, 0, -2), 0, 599, *range(100, 500, 9)],
    ):
        evict(path)
        before = reader._open().concurrent_batches
        got = dataset[rows].to_dense().numpy()
        assert reader._open().concurrent_batches == before + 1
        np.testing.assert_array_equal(got, expected[rows])
        # now in the page cache: read one run after another, as before
        np.testing.assert_array_equal(dataset[rows].to_dense().numpy(), expected[rows])
        assert reader._open().concurrent_batches == before + 1


@pytest.mark.skipif(not hasattr(os, "RWF_NOWAIT"), reason="needs preadv2's RWF_NOWAIT (Linux)")
def test_concurrent_reads_in_forked_workers_and_one_thread(tall_file):
    path, expected = tall_file
    rng = np.random.default_rng(1)
    plan = [rng.integers(0, 600, 128).tolist() for _ in range(6)]
    dataset = AnnDataset(str(path))
    sequential = AnnDataset(str(path))
    for r in backed_csr_readers(sequential):
        r.io_threads = 1
    _ = dataset[plan[0]]  # the parent's reader threads exist before the fork
    for ds in (dataset, sequential):
        evict(path)
        loader = torch.utils.data.DataLoader(
            ds,
            sampler=plan,
            batch_size=None,
            collate_fn=ta.collate,
            num_workers=2,
            multiprocessing_context="fork",
        )
        for rows, batch in zip(plan, loader, strict=True):
            np.testing.assert_array_equal(batch.numpy(), expected[rows])
    (reader,) = backed_csr_readers(sequential)
    evict(path)
    _ = sequential[plan[1]]
    assert reader._open().concurrent_batches == 0


def test_io_threads_must_be_a_positive_whole_number(tall_file):
    path, _ = tall_file
    with pytest.raises(ValueError, match=r"io_threads must be None .* got 0; use 1"):
        BackedCSRReader(path, "X", (600, 2000), io_threads=0)
