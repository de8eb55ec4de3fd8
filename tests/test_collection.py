"""Collections: several .h5ad files (and AnnData objects) read as one dataset.

Every value is compared with ``anndata.concat`` of the same files, the reference a user would
otherwise build in memory.
"""

from __future__ import annotations

import os
import pickle
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from conftest import to_numpy, write_h5ad

import torch_adata as ta
from torch_adata import AnnDataset, TimeResolvedAnnDataset
from torch_adata._source import AnnDataSource
from torch_adata.collection import (
    ConcatReader,
    SourceChangedError,
    SourceCollection,
    is_collection,
    open_source,
)
from torch_adata.samplers import BlockShuffleSampler, UniformBatchSampler

# (cells, genes, X storage, cell types) of the three files: genes overlap, in other orders
SPECS = [
    (23, list("abcdefgh"), "csr", ["T", "B"]),
    (17, list("hgfedcbz"), "dense", ["B", "NK"]),
    (29, list("cdefghab"), "csr", ["T", "NK", "mono"]),
]


def make_part(i: int, n: int, genes: list[str], x: str, types: list[str]) -> ad.AnnData:
    rng = np.random.default_rng(i)
    counts = rng.poisson(0.8, (n, len(genes))).astype(np.float32)
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(rng.choice(types, n)),
            "size": rng.random(n).astype(np.float32),
            "batch": np.full(n, i, dtype=np.int64),
        },
        index=[f"cell{j}" for j in range(n)],  # names repeat across files, as barcodes do
    )
    adata = ad.AnnData(
        sp.csr_matrix(counts) if x == "csr" else counts,
        obs=obs,
        var=pd.DataFrame(index=genes),
    )
    adata.layers["counts"] = sp.csr_matrix(counts * 2)
    adata.obsm["X_pca"] = rng.normal(size=(n, 3)).astype(np.float32)
    return adata


@pytest.fixture(scope="module")
def parts():
    return [make_part(i, *spec) for i, spec in enumerate(SPECS)]


@pytest.fixture(scope="module")
def files(tmp_path_factory, parts):
    folder = tmp_path_factory.mktemp("atlas")
    paths = []
    for i, adata in enumerate(parts):
        path = folder / f"part{i}.h5ad"
        write_h5ad(adata, path)
        paths.append(str(path))
    return paths


def concat(paths_or_parts, join="inner") -> ad.AnnData:
    adatas = [ad.read_h5ad(p) if isinstance(p, str) else p for p in paths_or_parts]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Observation names are not unique")
        return ad.concat(adatas, join=join)


def expected(ref: ad.AnnData, rows, genes, layer=None) -> np.ndarray:
    sub = ref[np.asarray(rows)][:, list(genes)]
    return to_numpy(sub.layers[layer] if layer else sub.X)


def file_state(paths) -> list[tuple[bytes, int]]:
    return [(open(p, "rb").read(), os.stat(p).st_mtime_ns) for p in paths]


ROWS = np.array([0, 45, 22, 23, 68, 5, 40, 41, 42, 30, 0, 68], dtype=np.int64)  # all files


# --------------------------------------------------------------------------- opening


def test_open_source_keeps_one_source_and_builds_collections(files, parts, tmp_path):
    assert type(open_source(files[0])) is AnnDataSource  # one file: unchanged, no wrapper
    assert type(open_source(parts[0])) is AnnDataSource
    assert not is_collection(files[0]) and not is_collection(parts[0])
    folder = os.path.dirname(files[0])
    for data in (files, tuple(files), folder, os.path.join(folder, "part*.h5ad")):
        assert is_collection(data)
        c = open_source(data)
        assert isinstance(c, SourceCollection)
        assert c.keys == ["part0.h5ad", "part1.h5ad", "part2.h5ad"]
        assert c.paths == files
        np.testing.assert_array_equal(c.offsets, [0, 23, 40, 69])
        assert c.offsets.dtype == np.int64
    c = open_source({"d0": files[0], "mem": parts[1], "backed": ad.read_h5ad(files[2], "r")})
    assert c.keys == ["d0", "mem", "backed"]
    assert c.paths == [files[0], None, files[2]]
    c = open_source([parts[0], files[1], parts[2]])
    assert c.keys == ["adata0", "part1.h5ad", "adata2"]
    assert open_source(c) is c


def test_locate_maps_global_positions_back(files):
    c = SourceCollection(files)
    source, row = c.locate(ROWS)
    np.testing.assert_array_equal(source, [0, 2, 0, 1, 2, 0, 2, 2, 2, 1, 0, 2])
    np.testing.assert_array_equal(row, ROWS - c.offsets[source])
    assert list(c.source_of([0, 23, 68])) == ["part0.h5ad", "part1.h5ad", "part2.h5ad"]
    with pytest.raises(IndexError, match="out of range for a collection of 69 cells"):
        c.locate([69])


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize("backed", [True, False])
@pytest.mark.parametrize("sparse", [False, True])
def test_inner_join_rows_match_anndata_concat(files, backed, sparse):
    ref = concat(files, "inner")
    dataset = AnnDataset(files, backed=backed, sparse=sparse, return_index=True)
    assert list(dataset.var_names) == list("bcdefgh")  # in every file, in the first's order
    assert len(dataset) == ref.n_obs == 69
    for rows in (ROWS, np.arange(23, 40), np.array([50, 45, 50]), np.arange(69)):
        batch = dataset[rows]
        x = batch["X"].to_dense() if sparse else batch["X"]
        np.testing.assert_array_equal(x.numpy(), expected(ref, rows, dataset.var_names))
        np.testing.assert_array_equal(batch["index"].numpy(), rows)


@pytest.mark.parametrize("sparse", [False, True])
def test_outer_join_reads_absent_genes_as_zero(files, sparse):
    ref = concat(files, "outer")
    dataset = AnnDataset(files, join="outer", sparse=sparse)
    assert list(dataset.var_names) == list("abcdefghz")
    x = dataset[ROWS]
    x = x.to_dense() if sparse else x
    want = np.nan_to_num(expected(ref, ROWS, dataset.var_names))
    np.testing.assert_array_equal(x.numpy(), want)
    outside = (ROWS < 23) | (ROWS >= 40)
    assert (x.numpy()[outside, -1] == 0).all()  # 'z' is only in part1


def test_a_list_of_genes_fixes_the_columns(files):
    ref = concat(files, "outer")
    genes = ["z", "b", "a"]
    dataset = AnnDataset(files, join=genes, layer="counts")
    assert list(dataset.var_names) == genes
    want = np.nan_to_num(expected(ref, ROWS, genes, layer="counts"))
    np.testing.assert_array_equal(dataset[ROWS].numpy(), want)


def test_memory_backed_and_paths_mix(files, parts):
    data = [parts[0], ad.read_h5ad(files[1], backed="r"), files[2]]
    dataset = AnnDataset(data, obsm_keys="X_pca", obs_keys=["cell_type", "source"])
    ref = concat(files)
    batch = dataset[ROWS]
    np.testing.assert_array_equal(batch["X"].numpy(), expected(ref, ROWS, dataset.var_names))
    np.testing.assert_array_equal(batch["X_pca"].numpy(), ref.obsm["X_pca"][ROWS])
    labels = dataset.decode("source", batch["source"])
    assert list(labels) == list(
        np.array(["adata0", "part1.h5ad", "part2.h5ad"])[[0, 2, 0, 1, 2, 0, 2, 2, 2, 1, 0, 2]]
    )


@pytest.mark.parametrize("sparse", [False, True])
def test_views_and_half_precision(files, parts, sparse):
    view = parts[0][parts[0].obs["cell_type"] == "T"]
    dataset = AnnDataset([view, files[2]], dtype=torch.float16, sparse=sparse)
    ref = concat([view, ad.read_h5ad(files[2])])
    rows = np.array([len(view) + 3, 0, len(view), 1, len(view) + 28])
    x = dataset[rows]
    x = x.to_dense() if sparse else x
    assert x.dtype == torch.float16
    np.testing.assert_array_equal(x.numpy(), expected(ref, rows, dataset.var_names))


def test_obs_is_concatenated_from_obs_alone(files):
    dataset = AnnDataset(files, obs_keys=["cell_type", "size", "batch", "source"])
    ref = concat(files)
    obs = dataset.obs
    assert list(obs.index) == list(ref.obs_names)
    assert obs["source"].dtype == "category"
    assert list(obs["source"].cat.categories) == dataset.source.keys
    # one encoder over every file's categories
    assert set(dataset.encoders["cell_type"].categories) == {"T", "B", "NK", "mono"}
    batch = dataset[ROWS]
    np.testing.assert_array_equal(
        dataset.decode("cell_type", batch["cell_type"]),
        ref.obs["cell_type"].astype(str).to_numpy()[ROWS],
    )
    np.testing.assert_array_equal(batch["size"].numpy(), ref.obs["size"].to_numpy()[ROWS])
    np.testing.assert_array_equal(batch["batch"].numpy(), [0, 2, 0, 1, 2, 0, 2, 2, 2, 1, 0, 2])


def test_a_column_missing_from_a_source_needs_na_code(tmp_path, parts):
    paths = []
    for i, adata in enumerate(parts):
        adata = adata.copy()
        if i == 1:
            del adata.obs["cell_type"]
            del adata.obs["size"]
        path = tmp_path / f"p{i}.h5ad"
        write_h5ad(adata, path)
        paths.append(str(path))
    before = file_state(paths)
    with pytest.raises(
        KeyError,
        match=r"'cell_type' is missing from 1 of the 3 sources \('.*p1\.h5ad'\).*na='code'",
    ):
        AnnDataset(paths, obs_keys="cell_type")
    dataset = AnnDataset(paths, obs_keys=["cell_type", "size"], na="code")
    batch = dataset[np.arange(69)]
    codes = batch["cell_type"].numpy()
    assert (codes[23:40] == -1).all() and (codes[:23] >= 0).all() and (codes[40:] >= 0).all()
    assert np.isnan(batch["size"].numpy()[23:40]).all()
    assert file_state(paths) == before


# --------------------------------------------------------------------------- workers


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers_read_every_cell_once(files, context):
    ref = concat(files)
    dataset = AnnDataset(files, return_index=True, obs_keys="source")
    sampler = UniformBatchSampler(len(dataset), 8, seed=3)
    loader = torch.utils.data.DataLoader(
        dataset,
        sampler=sampler,
        batch_size=None,
        collate_fn=ta.collate,
        num_workers=2,
        multiprocessing_context=context,
    )
    seen = []
    for batch in loader:
        rows = batch["index"].numpy()
        np.testing.assert_array_equal(batch["X"].numpy(), expected(ref, rows, dataset.var_names))
        seen.append(rows)
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(69))


def test_a_collection_pickles(files):
    dataset = AnnDataset(files, obs_keys="cell_type")
    copy = pickle.loads(pickle.dumps(dataset))
    np.testing.assert_array_equal(copy[ROWS]["X"].numpy(), dataset[ROWS]["X"].numpy())


# --------------------------------------------------------------------------- readers


def test_a_batch_in_one_source_passes_through(files):
    dataset = AnnDataset(files)
    reader = dataset.fields["X"].reader
    assert isinstance(reader, ConcatReader)
    calls = []
    inner = reader.readers[2]
    original = inner.dense

    def spy(rows, dtype, out=None):
        calls.append(out)
        return original(rows, dtype, out)

    inner.dense = spy
    out = np.empty((3, 8), dtype=np.float32)
    got = reader.dense(np.array([41, 40, 60]), np.float32, out)
    assert got is out and calls[0] is out  # straight into the caller's array


# --------------------------------------------------------------------------- samplers


def test_block_shuffle_blocks_stay_within_a_file():
    offsets = np.array([0, 23, 40, 69])
    sampler = BlockShuffleSampler(69, 8, block_size=10, pool_batches=1, boundaries=offsets)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        order = np.concatenate(list(sampler))
        np.testing.assert_array_equal(np.sort(order), np.arange(69))  # exactly once
    # the blocks: 0-9, 10-19, 20-22, 23-32, 33-39, 40-49, 50-59, 60-68
    starts, lengths = sampler._blocks
    np.testing.assert_array_equal(starts, [0, 10, 20, 23, 33, 40, 50, 60])
    np.testing.assert_array_equal(lengths, [10, 10, 3, 10, 7, 10, 10, 9])
    file_of = np.searchsorted(offsets, np.arange(69), side="right")
    for s, n in zip(starts, lengths, strict=True):
        assert len(set(file_of[s : s + n])) == 1
    # without boundaries: the same draws as before
    plain = BlockShuffleSampler(69, 8, block_size=10, seed=1)
    same = BlockShuffleSampler(69, 8, block_size=10, seed=1, boundaries=[0, 69])
    np.testing.assert_array_equal(np.concatenate(list(plain)), np.concatenate(list(same)))


# --------------------------------------------------------------------------- time points


def test_each_file_one_time_point(files):
    dataset = TimeResolvedAnnDataset(
        files, time_key={"part0.h5ad": 0, "part1.h5ad": 2, "part2.h5ad": 7}
    )
    np.testing.assert_array_equal(dataset.time_points, [0, 2, 7])
    np.testing.assert_array_equal(dataset.indices_at(2), np.arange(23, 40))
    batch = dataset[np.array([0, 30, 50])]
    np.testing.assert_array_equal(batch["t"].numpy(), [0, 2, 7])
    keyed = TimeResolvedAnnDataset(
        {"d0": files[0], "d2": files[1], "d7": files[2]}, time_key={"d0": 0, "d2": 2, "d7": 7}
    )
    np.testing.assert_array_equal(keyed.time_index, dataset.time_index)
    by_column = TimeResolvedAnnDataset(files, time_key="batch")  # a per-file obs column
    np.testing.assert_array_equal(by_column.time_index, dataset.time_index)
    with pytest.raises(ValueError, match=r"no time for the sources \['part2\.h5ad'\]"):
        TimeResolvedAnnDataset(files, time_key={"part0.h5ad": 0, "part1.h5ad": 2})


# --------------------------------------------------------------------------- bad input


@pytest.fixture
def copies(tmp_path, parts):
    """The three files, written afresh for tests that change or break them."""
    paths = []
    for i, adata in enumerate(parts):
        path = tmp_path / f"part{i}.h5ad"
        write_h5ad(adata, path)
        paths.append(str(path))
    return paths


def write_variant(path, adata: ad.AnnData) -> str:
    write_h5ad(adata, path)
    return str(path)


def test_an_empty_collection(tmp_path):
    for empty in ([], (), {}):
        with pytest.raises(ValueError, match=r"The collection is empty: pass at least one"):
            AnnDataset(empty)
    with pytest.raises(FileNotFoundError, match=r"glob pattern '.*nothing\*\.h5ad' matches no"):
        AnnDataset(str(tmp_path / "nothing*.h5ad"))


def test_a_missing_path_in_a_list(copies, tmp_path):
    before = file_state(copies)
    with pytest.raises(FileNotFoundError, match=r"No such file: '.*absent\.h5ad'"):
        AnnDataset([copies[0], str(tmp_path / "absent.h5ad")])
    assert file_state(copies) == before


def test_a_file_that_is_not_h5ad(copies, tmp_path):
    text = tmp_path / "notes.h5ad"
    text.write_text("cell,gene\n")
    before = file_state([*copies, str(text)])
    with pytest.raises(ValueError, match=r"'.*notes\.h5ad' is not an \.h5ad file \(not HDF5\)"):
        AnnDataset([*copies, str(text)])
    assert file_state([*copies, str(text)]) == before


def test_no_common_gene(tmp_path, parts):
    a = write_variant(tmp_path / "human.h5ad", parts[0])
    mouse = parts[1].copy()
    mouse.var_names = [f"m{g}" for g in mouse.var_names]
    b = write_variant(tmp_path / "mouse.h5ad", mouse)
    before = file_state([a, b])
    with pytest.raises(
        ValueError,
        match=r"No gene is common to all 2 sources \('.*human\.h5ad': 8 genes, e\.g\. "
        r"\['a', 'b', 'c'\]; '.*mouse\.h5ad': 8 genes.*pass join='outer'",
    ):
        AnnDataset([a, b])
    assert list(AnnDataset([a, b], join="outer").var_names)[:9] == [*"abcdefgh", "mh"]
    assert file_state([a, b]) == before


def test_duplicate_var_names(tmp_path, parts):
    dup = parts[1].copy()
    dup.var_names = ["a", "b", "c", "d", "e", "f", "g", "a"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paths = [
            write_variant(tmp_path / "ok.h5ad", parts[0]),
            write_variant(tmp_path / "dup.h5ad", dup),
        ]
    before = file_state(paths)
    with pytest.raises(
        ValueError,
        match=r"'.*dup\.h5ad' has duplicate var_names \(\['a'\]\).*var_names_make_unique",
    ):
        AnnDataset(paths)
    assert file_state(paths) == before


def test_an_obs_column_missing_without_na_code(tmp_path, parts):
    lacking = parts[2].copy()
    del lacking.obs["cell_type"]
    paths = [
        write_variant(tmp_path / "a.h5ad", parts[0]),
        write_variant(tmp_path / "b.h5ad", lacking),
    ]
    before = file_state(paths)
    with pytest.raises(
        KeyError,
        match=r"obs column 'cell_type' is missing from 1 of the 2 sources \('.*b\.h5ad'\)\. "
        r"Add it to those files, or pass na='code'",
    ):
        AnnDataset(paths, obs_keys="cell_type")
    with pytest.raises(KeyError, match=r"Unknown obs column 'donor': no source has it"):
        AnnDataset(paths, obs_keys="donor")
    assert file_state(paths) == before


def test_categories_that_clash_in_dtype(tmp_path, parts):
    numbered = parts[1].copy()
    numbered.obs["cell_type"] = pd.Categorical(np.arange(numbered.n_obs) % 3)
    paths = [
        write_variant(tmp_path / "labels.h5ad", parts[0]),
        write_variant(tmp_path / "numbers.h5ad", numbered),
    ]
    before = file_state(paths)
    with pytest.raises(
        TypeError,
        match=r"obs column 'cell_type' holds values of different types across the sources "
        r"\(number in '.*numbers\.h5ad'; string in '.*labels\.h5ad'\)",
    ):
        AnnDataset(paths, obs_keys="cell_type")
    AnnDataset(paths, obs_keys="size")  # the other columns are fine
    assert file_state(paths) == before


def test_a_file_replaced_between_construction_and_reading(copies, parts):
    dataset = AnnDataset(copies)
    rows_in_part1 = np.arange(23, 30)
    first = dataset[rows_in_part1].numpy()
    other = parts[1].copy()
    other.X = other.X * 3
    write_h5ad(other, copies[1] + ".new")
    os.replace(copies[1] + ".new", copies[1])  # another file at the same path
    with pytest.raises(
        SourceChangedError, match=r"'.*part1\.h5ad' changed on disk after the dataset was built"
    ):
        dataset[rows_in_part1]
    with pytest.raises(SourceChangedError, match=r"part1\.h5ad"):
        dataset[ROWS]  # a batch over every file
    assert dataset[np.arange(0, 23)].shape == (23, 7)  # the other files still read
    fresh = AnnDataset(copies)
    np.testing.assert_array_equal(fresh[rows_in_part1].numpy(), first * 3)


def test_a_file_touched_or_removed_after_construction(copies):
    dataset = AnnDataset(copies, sparse=True)
    st = os.stat(copies[2])
    os.utime(copies[2], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes, new mtime
    with pytest.raises(SourceChangedError, match=r"'.*part2\.h5ad' changed on disk"):
        dataset[ROWS]
    os.remove(copies[0])
    with pytest.raises(
        FileNotFoundError, match=r"'.*part0\.h5ad' is gone: it was part of the collection"
    ):
        dataset[np.arange(5)]


def test_other_bad_collections(copies, parts):
    with pytest.raises(ValueError, match=r"Two sources are named 'part0\.h5ad'.*Pass a mapping"):
        AnnDataset([copies[0], copies[0]])
    with pytest.raises(ValueError, match=r"join must be 'inner', 'outer' or a list of genes"):
        AnnDataset(copies, join="left")
    with pytest.raises(ValueError, match=r"2 genes of join= are in none of the 3 sources"):
        AnnDataset(copies, join=["a", "nope", "never"])
    labelled = parts[0].copy()
    labelled.obs["source"] = "lab A"
    with pytest.raises(
        ValueError, match=r"'adata0' already has an obs column 'source'.*source_key='source_file'"
    ):
        AnnDataset([labelled, parts[1]], obs_keys="cell_type")
    dataset = AnnDataset([labelled, parts[1]], obs_keys="origin", source_key="origin")
    assert list(dataset.decode("origin", dataset[[0, 30]]["origin"])) == ["adata0", "adata1"]
    assert dataset.obs["source"].iloc[0] == "lab A"
    no_layer = parts[1].copy()
    del no_layer.layers["counts"]
    with pytest.raises(
        KeyError, match=r"layers\['counts'\] is missing from 1 of the 2 sources \('adata1'\)"
    ):
        AnnDataset([parts[0], no_layer], layer="counts")
    wide = parts[1].copy()
    wide.obsm["X_pca"] = np.zeros((wide.n_obs, 5), dtype=np.float32)
    with pytest.raises(ValueError, match=r"obsm\['X_pca'\] has a different number of columns"):
        AnnDataset([parts[0], wide], obsm_keys="X_pca")
    with pytest.raises(TypeError, match=r"time_key as a mapping"):
        TimeResolvedAnnDataset(copies[0], time_key={"part0.h5ad": 0})


def test_backed_csc_stays_an_error(tmp_path, parts):
    csc = parts[1].copy()
    csc.X = sp.csc_matrix(csc.X)
    paths = [
        write_variant(tmp_path / "a.h5ad", parts[0]),
        write_variant(tmp_path / "csc.h5ad", csc),
    ]
    with pytest.raises(ValueError, match=r"csc\.h5ad'?:X is stored as CSC"):
        AnnDataset(paths)
    ref = concat(paths)
    dataset = AnnDataset(paths, backed=False)  # in memory it reads
    np.testing.assert_array_equal(
        dataset[ROWS[ROWS < 40]].numpy(), expected(ref, ROWS[ROWS < 40], dataset.var_names)
    )


# --------------------------------------------------------------------------- many files


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd (Linux)")
def test_a_hundred_files_cost_a_small_constant_each(tmp_path):
    rng = np.random.default_rng(0)
    genes = [f"g{k}" for k in range(50)]
    paths, parts = [], []
    for i in range(100):
        x = sp.random(12, 50, density=0.2, format="csr", dtype=np.float32, random_state=rng)
        adata = ad.AnnData(x, var=pd.DataFrame(index=genes))
        adata.obs_names = [f"f{i}c{j}" for j in range(12)]
        path = tmp_path / f"s{i:03d}.h5ad"
        write_h5ad(adata, path)
        paths.append(str(path))
        parts.append(adata)
    fds, rss = _open_fds(), _rss_mib()
    dataset = AnnDataset(str(tmp_path), sparse=True)
    assert len(dataset.source.sources) == 100 and len(dataset) == 1200
    ref = ad.concat(parts)
    for batch in UniformBatchSampler(1200, 64, seed=0):  # every file, many times
        got = dataset[batch].to_dense().numpy()
        np.testing.assert_array_equal(got, ref.X[batch].toarray())
    # two descriptors per file (h5py's and the one direct reads use), nothing per batch
    assert _open_fds() - fds <= 2 * 100 + 5
    assert _rss_mib() - rss < 2.5 * 100  # about 1.2 MiB per open file (HDF5's own state)


@pytest.fixture
def aligned(tmp_path):
    """Three CSR files with the same genes: read by two compiled calls per batch."""
    genes = list("abcdefghij")
    paths = []
    for i, n in enumerate((31, 9, 40)):
        path = tmp_path / f"same{i}.h5ad"
        write_h5ad(make_part(10 + i, n, genes, "csr", ["T", "B"]), path)
        paths.append(str(path))
    return paths


@pytest.mark.parametrize("engine", ["numba", "numpy"])
@pytest.mark.parametrize("sparse", [False, True])
def test_files_with_the_same_genes_read_in_one_pass(aligned, engine, sparse):
    from torch_adata import _kernels

    if engine == "numba" and not (_kernels.HAVE_NUMBA and _kernels.MULTI_FILE_READS):
        pytest.skip("needs numba and a C pread")
    ref = concat(aligned)
    dataset = AnnDataset(aligned, engine=engine, sparse=sparse)
    reader = dataset.fields["X"].reader
    assert (reader._direct is not None) == (engine == "numba")
    for rows in (np.array([79, 0, 35, 31, 31, 40, 39, 30, 2]), np.arange(80)[::-1].copy()):
        x = dataset[rows]
        x = x.to_dense() if sparse else x
        np.testing.assert_array_equal(x.numpy(), expected(ref, rows, dataset.var_names))
    os.utime(aligned[1], ns=(0, 10**9))
    with pytest.raises(SourceChangedError, match=r"same1\.h5ad' changed on disk"):
        dataset[np.array([0, 35])]
    assert dataset[np.array([0, 45])].shape[0] == 2  # the other files still read


@pytest.mark.parametrize("backed", [True, False])
def test_one_pass_reads_in_forked_and_spawned_workers(aligned, backed):
    ref = concat(aligned)
    dataset = AnnDataset(aligned, return_index=True, backed=backed)
    for context in ("fork", "spawn"):
        loader = torch.utils.data.DataLoader(
            dataset,
            sampler=BlockShuffleSampler(80, 16, block_size=8, boundaries=dataset.source.offsets),
            batch_size=None,
            collate_fn=ta.collate,
            num_workers=2,
            multiprocessing_context=context,
        )
        seen = []
        for batch in loader:
            rows = batch["index"].numpy()
            want = expected(ref, rows, dataset.var_names)
            np.testing.assert_array_equal(batch["X"].numpy(), want)
            seen.append(rows)
        np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(80))


# in memory, CSR sources: one compiled call writes every source's rows into the batch

# rows of the 80 aligned cells: few (a serial call) and many (a parallel one), repeats, reversed
MANY = np.concatenate([np.arange(80)[::-1], [79, 0, 35, 31, 31, 40, 39, 30, 2]])


def memory_path(dataset) -> bool:
    return dataset.fields["X"].reader._memory is not None


@pytest.mark.parametrize("engine", ["numba", "numpy"])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int64])
def test_csr_in_memory_read_in_one_pass(aligned, engine, sparse, dtype):
    from torch_adata import _kernels

    if engine == "numba" and not _kernels.HAVE_NUMBA:
        pytest.skip("needs numba")
    ref = concat(aligned)
    adatas = [ad.read_h5ad(p) for p in aligned]
    for data in (aligned, adatas):  # paths loaded into memory, or AnnData objects
        dataset = AnnDataset(data, backed=False, engine=engine, sparse=sparse, dtype=dtype)
        assert memory_path(dataset) == (engine == "numba")
        for rows in (np.array([79, 0, 35, 31, 31, 40, 39, 30, 2]), MANY):
            x = dataset[rows]
            x = x.to_dense() if sparse else x
            assert x.dtype == dtype
            want = expected(ref, rows, dataset.var_names).astype(x.numpy().dtype)
            np.testing.assert_array_equal(x.numpy(), want)
    if engine == "numba":  # read in place: the sources' arrays are the AnnData objects' own
        pieces = dataset.fields["X"].reader._memory.parts
        for p, a in zip(pieces, adatas, strict=True):
            assert p[2] is a.X.data and p[1] is a.X.indices


@pytest.fixture(scope="module")
def csr_parts(parts):
    """The three parts (genes in other orders, one with a gene of its own), all CSR."""
    out = []
    for a in parts:
        a = a.copy()
        a.X = sp.csr_matrix(a.X)
        out.append(a)
    return out


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("join", ["inner", "outer", ["z", "b", "a", "h"]])
def test_csr_in_memory_with_gene_maps(csr_parts, sparse, join):
    """Each source's columns mapped to the joined genes (a column map, filled genes, both)."""
    ref = concat(csr_parts, "outer")
    dataset = AnnDataset(csr_parts, join=join, sparse=sparse)
    assert memory_path(dataset)
    rows = np.concatenate([ROWS, np.arange(69)[::-1]])
    for batch in (ROWS, rows):
        x = dataset[batch]
        x = x.to_dense() if sparse else x
        want = np.nan_to_num(expected(ref, batch, dataset.var_names))
        np.testing.assert_array_equal(x.numpy(), want)


def test_mixed_storage_and_dtypes_fall_back(csr_parts, parts, files):
    ref = concat(csr_parts)
    wider = csr_parts[1].copy()
    wider.X = wider.X.astype(np.float64)  # another value dtype
    long_index = csr_parts[2].copy()
    long_index.X.indices = long_index.X.indices.astype(np.int64)  # another index dtype
    for data in (
        [csr_parts[0], wider, csr_parts[2]],
        [csr_parts[0], csr_parts[1], long_index],
        [csr_parts[0], parts[1], csr_parts[2]],  # a dense source
        [csr_parts[0], csr_parts[1][2:], csr_parts[2]],  # a view
    ):
        dataset = AnnDataset(data)
        assert not memory_path(dataset)
        for sparse in (False, True):
            dataset = AnnDataset(data, sparse=sparse, return_index=True)
            batch = dataset[ROWS[ROWS < dataset.source.n_obs]]
            x = batch["X"].to_dense() if sparse else batch["X"]
            want = concat(data)[batch["index"].numpy()][:, list(dataset.var_names)]
            np.testing.assert_array_equal(x.numpy(), to_numpy(want.X).astype(np.float32))
    assert memory_path(AnnDataset(csr_parts))  # and all CSR alike takes the one call
    np.testing.assert_array_equal(
        AnnDataset(csr_parts)[ROWS].numpy(), expected(ref, ROWS, ref.var_names)
    )
