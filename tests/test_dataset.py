"""AnnDataset over in-memory AnnData: batch values against anndata's own slicing, indexing,
DataLoader integration, and the promise never to modify the user's AnnData."""

from __future__ import annotations

import math

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from conftest import (
    N_OBS,
    N_VARS,
    assert_unchanged,
    check_batch,
    expected_matrix,
    make_adata,
    snapshot,
    to_numpy,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Subset

import torch_adata as ta
from torch_adata import AnnDataset, SparseBatch

FORMATS = ["dense", "csr", "csc"]
ENGINES = ["numba", "numpy"]
OBS_KEYS = ["size", "score32", "n_genes", "plate", "is_doublet", "cell_type", "batch"]
OBSM_KEYS = ["X_pca", "sp", "frame"]

row_lists = st.lists(st.integers(0, N_OBS - 1), max_size=30)


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize("sparse", [False, True], ids=["dense_out", "sparse_out"])
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("fmt", [*FORMATS, "csr_array", "csc_array"])
def test_in_memory_batches_equal_anndata_slicing(fmt, engine, sparse):
    adata = make_adata(fmt)
    kw = {"obs_keys": OBS_KEYS, "obsm_keys": OBSM_KEYS, "return_index": True, "engine": engine}
    dataset = AnnDataset(adata, sparse=sparse, **kw)
    dense_twin = AnnDataset(adata, **kw)

    @settings(max_examples=20, deadline=None)
    @given(rows=row_lists)
    def check(rows):
        batch = dataset[rows]
        check_batch(dataset, adata, rows, batch, obsm_keys=OBSM_KEYS)
        if sparse:  # the SparseBatch densifies to exactly the dense batch
            np.testing.assert_array_equal(
                batch["X"].to_dense().numpy(), dense_twin[rows]["X"].numpy()
            )
            densified = ta.densify(batch)
            assert isinstance(densified["X"], torch.Tensor)
            np.testing.assert_array_equal(densified["X"].numpy(), dense_twin[rows]["X"].numpy())
            assert densified["cell_type"] is batch["cell_type"]

    check()


@pytest.mark.parametrize("sparse", [False, True], ids=["dense_out", "sparse_out"])
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("genes", [None, [7, 2, 9, 0, 4]], ids=["all_genes", "gene_subset"])
def test_in_memory_views_equal_anndata_slicing(fmt, engine, sparse, genes):
    adata = make_adata(fmt)
    mask = np.arange(N_OBS) % 3 != 1
    view = adata[mask] if genes is None else adata[mask, genes]
    assert view.is_view
    dataset = AnnDataset(view, obs_keys=["cell_type", "size"], engine=engine, sparse=sparse)
    n = view.n_obs

    @settings(max_examples=15, deadline=None)
    @given(rows=st.lists(st.integers(0, n - 1), max_size=25))
    def check(rows):
        check_batch(dataset, view, rows, dataset[rows])

    check()
    assert view.is_view  # reading did not turn the view into a copy


def test_view_of_a_view_and_sliced_view():
    adata = make_adata("csr")
    view = adata[5:30][::2, [3, 1, 8]]
    dataset = AnnDataset(view, obs_keys=["batch"])
    rows = [0, 11, 3, 3, 7]
    check_batch(dataset, view, rows, dataset[rows])


def test_view_with_repeated_genes_in_memory():
    adata = make_adata("csr")
    view = adata[:, [2, 2, 5]]
    dataset = AnnDataset(view)
    rows = [4, 1, 4]
    np.testing.assert_array_equal(dataset[rows].numpy(), expected_matrix(view, rows))


@pytest.mark.parametrize("layer", ["counts", "scaled"])
@pytest.mark.parametrize("sparse", [False, True])
def test_layer_replaces_x_under_key_x(layer, sparse):
    adata = make_adata("csr")
    dataset = AnnDataset(adata, layer=layer, obs_keys="size", sparse=sparse)
    assert set(dataset.fields) == {"X", "size"}
    rows = [9, 0, 9, 36, 2]
    check_batch(dataset, adata, rows, dataset[rows], layer=layer)


@pytest.mark.parametrize("key", OBSM_KEYS)
def test_obsm_fields_dense_sparse_and_dataframe(key):
    adata = make_adata("csr")
    dataset = AnnDataset(adata, obsm_keys=key, X=False)
    rows = [3, 3, 0, 20]
    got = dataset[rows]  # a single field: the tensor itself
    assert got.dtype == torch.float32
    want = expected_matrix(adata, rows, "obsm", key).astype(np.float32)
    np.testing.assert_array_equal(got.numpy(), want)


def test_obsm_and_x_in_one_batch_keep_their_own_widths():
    adata = make_adata("dense")
    batch = AnnDataset(adata, obsm_keys=["X_pca", "sp"])[[0, 1]]
    assert batch["X"].shape == (2, N_VARS)
    assert batch["X_pca"].shape == (2, 3)
    assert batch["sp"].shape == (2, 4)


# --------------------------------------------------------------------------- dtypes


def test_default_dtypes_of_every_field():
    adata = make_adata("csr")
    dataset = AnnDataset(adata, obs_keys=OBS_KEYS, obsm_keys=OBSM_KEYS, return_index=True)
    batch = dataset[[0, 1, 2]]
    want = {
        "X": torch.float32,
        "X_pca": torch.float32,
        "sp": torch.float32,
        "frame": torch.float32,
        "size": torch.float32,
        "score32": torch.float32,
        "n_genes": torch.int64,
        "plate": torch.int64,
        "is_doublet": torch.bool,
        "cell_type": torch.int64,
        "batch": torch.int64,
        "index": torch.int64,
    }
    assert {k: v.dtype for k, v in batch.items()} == want


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("sparse", [False, True])
def test_configurable_float64(fmt, sparse):
    adata = make_adata(fmt, x_dtype=np.float64)
    dataset = AnnDataset(
        adata, dtype=torch.float64, obsm_dtype=torch.float64, obsm_keys="X_pca", sparse=sparse
    )
    rows = [5, 1, 1]
    batch = ta.densify(dataset[rows])
    assert batch["X"].dtype == torch.float64 and batch["X_pca"].dtype == torch.float64
    # float64 end to end: no rounding through float32
    np.testing.assert_array_equal(batch["X"].numpy(), expected_matrix(adata, rows))
    np.testing.assert_array_equal(
        batch["X_pca"].numpy(), expected_matrix(adata, rows, "obsm", "X_pca")
    )


def test_obs_dtypes_override():
    adata = make_adata("csr")
    overrides = {
        "size": torch.float64,
        "n_genes": torch.int32,
        "is_doublet": torch.float32,
        "plate": torch.float16,
    }
    dataset = AnnDataset(adata, obs_keys=list(overrides), obs_dtypes=overrides, X=False)
    batch = dataset[list(range(N_OBS))]
    for key, dtype in overrides.items():
        assert batch[key].dtype == dtype
    np.testing.assert_array_equal(batch["size"].numpy(), adata.obs["size"].to_numpy())
    np.testing.assert_array_equal(batch["n_genes"].numpy(), adata.obs["n_genes"].to_numpy())
    np.testing.assert_array_equal(
        batch["is_doublet"].numpy(), adata.obs["is_doublet"].to_numpy().astype(np.float32)
    )


def test_integer_x_to_float_and_int_output():
    adata = make_adata("csr")
    dataset = AnnDataset(adata, layer="counts", dtype=torch.int64)
    rows = [1, 0]
    got = dataset[rows]
    assert got.dtype == torch.int64
    np.testing.assert_array_equal(got.numpy(), expected_matrix(adata, rows, "layer", "counts"))


# --------------------------------------------------------------------------- indexing


@pytest.fixture(scope="module")
def small():
    adata = make_adata("csr")
    dataset = AnnDataset(adata, obs_keys=["cell_type", "size"], obsm_keys="X_pca")
    return adata, dataset


@pytest.mark.parametrize(
    ("index", "rows"),
    [
        (3, [3]),
        (-1, [N_OBS - 1]),
        (-N_OBS, [0]),
        (np.int64(7), [7]),
        (torch.tensor(4), [4]),
        (slice(None), list(range(N_OBS))),
        (slice(30, None), list(range(30, N_OBS))),
        (slice(None, None, -4), list(range(N_OBS))[::-4]),
        (slice(100, 200), []),
        ([5, 2, 5, -1], [5, 2, 5, N_OBS - 1]),
        (np.array([9, 8, 9], dtype=np.int32), [9, 8, 9]),
        (np.array([9, 8, 9], dtype=np.uint16), [9, 8, 9]),
        (torch.tensor([1, 0, 1]), [1, 0, 1]),
        (range(3, 0, -1), [3, 2, 1]),
        ([], []),
        (np.array([], dtype=np.int64), []),
        (torch.tensor([], dtype=torch.int64), []),
        (np.arange(N_OBS) % 4 == 0, list(range(0, N_OBS, 4))),
        (list(np.arange(N_OBS) % 4 == 1), list(range(1, N_OBS, 4))),
        (torch.from_numpy(np.arange(N_OBS) % 4 == 2), list(range(2, N_OBS, 4))),
    ],
    ids=lambda v: type(v).__name__,
)
def test_every_index_form(small, index, rows):
    adata, dataset = small
    is_int = isinstance(index, (int, np.integer)) or (
        isinstance(index, torch.Tensor) and index.ndim == 0
    )
    batch = dataset[index]
    want_pca = expected_matrix(adata, rows, "obsm", "X_pca").astype(np.float32)
    want_x = expected_matrix(adata, rows)
    if is_int:  # one cell: no batch dimension
        assert batch["X"].shape == (N_VARS,)
        assert batch["X_pca"].shape == (3,)
        assert batch["cell_type"].shape == ()
        assert batch["size"].shape == ()
        np.testing.assert_array_equal(batch["X"].numpy(), want_x[0])
        np.testing.assert_array_equal(batch["X_pca"].numpy(), want_pca[0])
        assert (
            dataset.decode("cell_type", batch["cell_type"][None])[0]
            == (adata.obs["cell_type"].iloc[rows[0]])
        )
    else:
        assert batch["X"].shape == (len(rows), N_VARS)
        assert batch["cell_type"].shape == (len(rows),)
        np.testing.assert_array_equal(batch["X"].numpy(), want_x)
        np.testing.assert_array_equal(batch["X_pca"].numpy(), want_pca)
        np.testing.assert_array_equal(
            batch["size"].numpy(), adata.obs["size"].to_numpy()[rows].astype(np.float32)
        )


def test_int_index_of_x_only_dataset_is_one_row():
    adata = make_adata("dense")
    dataset = AnnDataset(adata)
    assert len(dataset) == N_OBS
    assert dataset[0].shape == (N_VARS,)
    np.testing.assert_array_equal(dataset[6].numpy(), adata.X[6])
    assert dataset[[6]].shape == (1, N_VARS)


def test_int_index_of_sparse_output_is_a_one_row_sparse_batch():
    adata = make_adata("csr")
    got = AnnDataset(adata, sparse=True)[3]
    assert isinstance(got, SparseBatch)
    np.testing.assert_array_equal(got.to_dense().numpy(), expected_matrix(adata, [3]))


def test_getitems_gives_the_cells_of_getitem_for_lists(small):
    _, dataset = small
    rows = [30, 1, 30, 2]
    samples, b = dataset.__getitems__(rows), dataset[rows]
    # a list of per-cell samples (as a DataLoader's collate_fn expects), each dataset[i]
    assert isinstance(samples, list) and len(samples) == len(rows)
    for sample, row in zip(samples, rows, strict=True):
        one = dataset[row]
        assert sample.keys() == one.keys()
        for key in one:
            assert torch.equal(sample[key], one[key])
    # collated back into the gathered batch
    a = ta.collate(samples)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key])
    # numpy and tensor index lists as the fetcher and samplers give them
    assert torch.equal(ta.collate(dataset.__getitems__(np.array(rows)))["X"], b["X"])


class CountingDataset(AnnDataset):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[list[int]] = []

    def __getitems__(self, indices):
        self.calls.append(list(indices))
        return super().__getitems__(indices)

    def __getitem__(self, index):  # the loader must never fall back to one row at a time
        if isinstance(index, (int, np.integer)):
            raise AssertionError("DataLoader fetched a single row")
        return super().__getitem__(index)


@pytest.mark.parametrize("fmt", FORMATS)
def test_dataloader_calls_getitems_once_per_batch(fmt):
    adata = make_adata(fmt)
    dataset = CountingDataset(adata, obs_keys=["cell_type"], return_index=True)
    loader = DataLoader(
        dataset,
        batch_size=8,
        shuffle=True,
        collate_fn=ta.collate,
        generator=torch.Generator().manual_seed(0),
    )
    batches = list(loader)
    assert len(batches) == len(dataset.calls) == math.ceil(N_OBS / 8)
    seen = []
    for indices, batch in zip(dataset.calls, batches, strict=True):
        assert batch["X"].shape == (len(indices), N_VARS)
        np.testing.assert_array_equal(batch["index"].numpy(), indices)
        check_batch(dataset, adata, indices, batch)
        seen += indices
    assert sorted(seen) == list(range(N_OBS))  # every cell exactly once
    assert seen != sorted(seen)  # and shuffled


def test_dataloader_over_a_subset_forwards_getitems():
    adata = make_adata("csr")
    dataset = CountingDataset(adata, return_index=True)
    subset = Subset(dataset, [10, 3, 7, 30, 0])
    batches = list(DataLoader(subset, batch_size=2, collate_fn=ta.collate))
    assert dataset.calls == [[10, 3], [7, 30], [0]]
    np.testing.assert_array_equal(batches[1]["index"].numpy(), [7, 30])
    np.testing.assert_array_equal(batches[1]["X"].numpy(), expected_matrix(adata, [7, 30]))


def test_dataloader_with_a_batch_sampler_and_batch_size_none():
    """The scvi-tools way: each sampled list of indices goes to ``dataset[list]`` once."""
    adata = make_adata("csr")
    dataset = AnnDataset(adata, return_index=True)
    sampler = BatchSampler(RandomSampler(dataset), batch_size=6, drop_last=False)
    loader = DataLoader(dataset, sampler=sampler, batch_size=None, collate_fn=ta.collate)
    seen = []
    for batch in loader:
        rows = batch["index"].numpy()
        np.testing.assert_array_equal(batch["X"].numpy(), expected_matrix(adata, rows))
        seen += rows.tolist()
    assert sorted(seen) == list(range(N_OBS))


def test_dataloader_sparse_batches_densify():
    adata = make_adata("csr")
    dataset = AnnDataset(adata, sparse=True, return_index=True)
    for batch in DataLoader(dataset, batch_size=10, collate_fn=ta.collate):
        assert isinstance(batch["X"], SparseBatch)
        dense = ta.densify(batch)["X"]
        np.testing.assert_array_equal(dense.numpy(), expected_matrix(adata, batch["index"].numpy()))


# --------------------------------------------------------------------------- the user's data


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("view", [False, True])
def test_never_modifies_the_users_anndata(fmt, view):
    adata = make_adata(fmt)
    adata.obs.loc[adata.obs_names[::6], "cell_type"] = np.nan  # exercises na="code"
    if view:
        adata = adata[np.arange(N_OBS) % 2 == 0, [1, 4, 0, 8]]
    before = snapshot(adata)
    index_before = adata.obs.index.copy()
    kw = {"obs_keys": OBS_KEYS, "obsm_keys": OBSM_KEYS, "na": "code", "return_index": True}
    for dataset in (
        AnnDataset(adata, **kw),
        AnnDataset(adata, sparse=True, layer="counts", **kw),
        AnnDataset(adata, X=False, obs_dtypes={"size": torch.float64}, **kw),
    ):
        for batch in DataLoader(dataset, batch_size=7, shuffle=True, collate_fn=ta.collate):
            ta.densify(batch)
        dataset[0], dataset[[1, 1]], dataset[:], repr(dataset)
        dataset.decode("batch", [0, 1])
    assert_unchanged(adata, before)
    assert adata.obs.index.equals(index_before)
    assert list(adata.obs.columns) == list(before["obs"].columns)
    assert adata.is_view == view


def test_returned_tensors_do_not_alias_the_anndata():
    adata = make_adata("dense")
    adata.obs["size"] = adata.obs["size"].astype(np.float32)
    dataset = AnnDataset(adata, obs_keys="size", obsm_keys="X_pca", obsm_dtype=torch.float64)
    before = snapshot(adata)
    batch = dataset[[0, 1]]
    for tensor in batch.values():
        tensor.fill_(12345)
    assert_unchanged(adata, before)


def test_repr_names_every_field():
    adata = make_adata("csr")
    dataset = AnnDataset(
        adata, obs_keys=["cell_type", "size"], obsm_keys=["X_pca", "sp"], return_index=True
    )
    text = repr(dataset)
    assert text.startswith(f"AnnDataset of {N_OBS} cells")
    for name in ("'X'", "'cell_type'", "'size'", "'X_pca'", "'sp'", "'index'"):
        assert name in text
    assert "3 categories" in text or "4 categories" in text
    assert "CSR" in text and "dense" in text


def test_accessors_mirror_the_anndata():
    adata = make_adata("csr")
    dataset = AnnDataset(adata)
    assert dataset.adata is adata
    assert dataset.obs_names.equals(adata.obs_names)
    assert dataset.var_names.equals(adata.var_names)
    assert dataset.n_vars == N_VARS
    pd.testing.assert_frame_equal(dataset.obs, adata.obs)


@pytest.mark.parametrize("engine", ENGINES)
def test_all_zero_rows_and_full_batches(engine):
    adata = make_adata("csr")
    dataset = AnnDataset(adata, engine=engine, sparse=True)
    zero_rows = [0, 5, 10, 0]
    got = dataset[zero_rows]
    assert got.values.numel() == 0
    assert got.to_dense().abs().sum() == 0
    full = list(range(N_OBS))[::-1] * 2
    np.testing.assert_array_equal(
        dataset[full].to_dense().numpy(), to_numpy(adata.X)[full].astype(np.float32)
    )


# --------------------------------------------------------------------------- kernel edge cases


def non_canonical_adata():
    """CSR with a duplicated (row, column) entry and unsorted columns: scipy (and anndata)
    read duplicates as their sum."""
    data = np.array([1.0, 2.0, 5.0, 4.0], dtype=np.float32)
    indices = np.array([1, 1, 2, 0])
    matrix = sp.csr_matrix((data, indices, np.array([0, 2, 4])), shape=(2, 3))
    assert not matrix.has_canonical_format
    return ad.AnnData(matrix)


@pytest.mark.parametrize("engine", ENGINES)
def test_non_canonical_csr_sparse_output_sums_duplicates(engine):
    adata = non_canonical_adata()
    got = AnnDataset(adata, engine=engine, sparse=True)[[1, 0, 1]]
    np.testing.assert_array_equal(got.to_dense().numpy(), expected_matrix(adata, [1, 0, 1]))


@pytest.mark.parametrize("engine", ENGINES)
def test_non_canonical_csr_dense_output_sums_duplicates(engine):
    adata = non_canonical_adata()
    got = AnnDataset(adata, engine=engine)[[1, 0, 1]]
    np.testing.assert_array_equal(got.numpy(), expected_matrix(adata, [1, 0, 1]))


@pytest.mark.parametrize("sparse", [False, True])
def test_float16_output_numpy_kernels(sparse):
    adata = make_adata("csr")
    got = ta.densify(AnnDataset(adata, dtype=torch.float16, engine="numpy", sparse=sparse)[[3, 1]])
    assert got.dtype == torch.float16
    want = expected_matrix(adata, [3, 1]).astype(np.float16)
    np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("sparse", [False, True])
def test_float16_output_numba_kernels(sparse):
    adata = make_adata("csr")
    got = ta.densify(AnnDataset(adata, dtype=torch.float16, engine="numba", sparse=sparse)[[3, 1]])
    assert got.dtype == torch.float16
    want = expected_matrix(adata, [3, 1]).astype(np.float16)
    np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize(
    ("dtype", "index_dtype"),
    [
        (torch.float32, torch.int32),
        (torch.float64, torch.int64),
        (torch.int64, torch.int32),
        (torch.float16, torch.int32),  # not a scipy dtype: torch's general path
    ],
)
def test_cpu_to_dense_matches_scipy_in_every_dtype(dtype, index_dtype):
    matrix = sp.random(300, 1200, density=0.1, format="csr", random_state=3)
    matrix.data = np.round(matrix.data * 8)  # exact in every dtype
    rows = np.r_[5:300:3, 5]
    want = matrix[rows].toarray()
    sub = matrix[rows]
    batch = SparseBatch(
        torch.from_numpy(sub.indptr).to(index_dtype),
        torch.from_numpy(sub.indices).to(torch.int64),  # mixed index dtypes are joined
        torch.from_numpy(sub.data).to(dtype),
        matrix.shape[1],
    )
    first = batch.to_dense()  # 1.4 MiB in float32: a recycled buffer
    assert first.dtype == dtype and first.shape == want.shape
    np.testing.assert_array_equal(first.double().numpy(), want)
    second = SparseBatch(batch.indptr, batch.indices, batch.values * 2, batch.n_cols).to_dense()
    np.testing.assert_array_equal(first.double().numpy(), want)  # kept: not reused
    np.testing.assert_array_equal(second.double().numpy(), 2 * want)
