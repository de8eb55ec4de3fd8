"""write_shuffled and ``torch-adata shuffle``: values under the permutation, atomicity, errors."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import torch_adata as ta
from torch_adata import _kernels, cli, shuffle
from torch_adata.samplers import BlockShuffleSampler, UniformBatchSampler

REPO = Path(__file__).parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def rich_adata(n: int = 240, g: int = 30, x: str = "csr", seed: int = 0) -> ad.AnnData:
    """An AnnData with every per-cell and per-gene element the writer handles."""
    rng = np.random.default_rng(seed)
    counts = sp.random(n, g, 0.2, format="csr", dtype=np.float32, random_state=seed)
    counts.data = rng.integers(1, 50, counts.nnz).astype(np.float32)
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(rng.choice(["B", "T", "NK"], n)),
            "score": rng.random(n),
            "donor": rng.choice(["d1", "d2"], n).astype(object),
        },
        index=[f"cell{i}" for i in range(n)],
    )
    var = pd.DataFrame(
        {"gene_id": [f"ENSG{i}" for i in range(g)]}, index=[f"g{i}" for i in range(g)]
    )
    adata = ad.AnnData(counts if x == "csr" else counts.toarray(), obs=obs, var=var)
    adata.layers["counts"] = counts.copy()
    adata.layers["scaled"] = rng.standard_normal((n, g)).astype(np.float32)
    adata.obsm["X_pca"] = rng.standard_normal((n, 5))
    adata.obsm["peaks"] = sp.random(n, 7, 0.3, format="csr", random_state=seed + 1)
    adata.obsm["meta"] = pd.DataFrame({"a": rng.random(n)}, index=obs.index)
    adata.obsp["connectivities"] = sp.random(n, n, 0.02, format="csr", random_state=seed + 2)
    adata.varm["PCs"] = rng.standard_normal((g, 5))
    adata.uns["neighbors"] = {"params": {"n_neighbors": 15}}
    adata.uns["colors"] = np.array(["red", "blue"], dtype=object)
    adata.raw = adata
    return adata


def dense(m) -> np.ndarray:
    return m.toarray() if sp.issparse(m) else np.asarray(m)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(folder: Path) -> list[str]:
    """Hidden files: the temporary copy (``.partial``) and spill (``.spill``) files."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def assert_rows_under(copy: ad.AnnData, adata: ad.AnnData, perm: np.ndarray) -> None:
    """Every per-cell element of ``copy`` holds the rows of ``adata``'s under ``perm``."""
    np.testing.assert_array_equal(dense(copy.X), dense(adata.X)[perm])
    for key in adata.layers:
        np.testing.assert_array_equal(dense(copy.layers[key]), dense(adata.layers[key])[perm])
    for key, value in adata.obsm.items():
        if isinstance(value, pd.DataFrame):
            pd.testing.assert_frame_equal(copy.obsm[key], value.iloc[perm])
        else:
            np.testing.assert_array_equal(dense(copy.obsm[key]), dense(value)[perm])
    if adata.raw is not None:
        np.testing.assert_array_equal(dense(copy.raw.X), dense(adata.raw.X)[perm])


@pytest.mark.parametrize("x", ["csr", "dense"])
@pytest.mark.parametrize("chunk_mib", [0.002, 256])  # many small chunks; one chunk
@pytest.mark.parametrize("source_compression", [None, "gzip"])
def test_copy_holds_the_source_rows_under_the_permutation(
    tmp_path, x, chunk_mib, source_compression
):
    source, destination = tmp_path / "sorted.h5ad", tmp_path / "shuffled.h5ad"
    adata = rich_adata(x=x)
    adata.write_h5ad(source, compression=source_compression)
    before = digest(source)

    perm = ta.write_shuffled(source, destination, seed=7, chunk_mib=chunk_mib)

    assert digest(source) == before  # never touched
    np.testing.assert_array_equal(perm, np.random.default_rng(7).permutation(adata.n_obs))
    assert not np.array_equal(perm, np.arange(adata.n_obs))
    copy = ad.read_h5ad(destination)
    assert type(copy.X) is type(adata.X)
    assert_rows_under(copy, adata, perm)  # X, layers counts/scaled, obsm, raw.X
    graph = dense(adata.obsp["connectivities"])
    np.testing.assert_array_equal(dense(copy.obsp["connectivities"]), graph[perm][:, perm])
    pd.testing.assert_frame_equal(copy.raw.var, adata.raw.var)
    # obs reordered (names and categories kept); the source positions are recorded
    np.testing.assert_array_equal(copy.obs["source_index"].to_numpy(), perm)
    pd.testing.assert_frame_equal(copy.obs.drop(columns="source_index"), adata.obs.iloc[perm])
    pd.testing.assert_frame_equal(copy.var, adata.var)
    np.testing.assert_array_equal(copy.varm["PCs"], adata.varm["PCs"])
    assert copy.uns["neighbors"]["params"]["n_neighbors"] == 15
    assert list(copy.uns["colors"]) == ["red", "blue"]
    # backed, as the engine reads it: rows equal anndata's rows of the source
    rows = np.array([3, 0, 100])
    np.testing.assert_array_equal(
        ta.AnnDataset(destination)[rows].numpy(), dense(adata.X)[perm[rows]].astype(np.float32)
    )
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("x", ["csr", "dense"])
def test_a_compressed_copy_in_several_bands_goes_through_a_spill_file(tmp_path, x):
    source, destination = tmp_path / "sorted.h5ad", tmp_path / "shuffled.h5ad"
    adata = rich_adata(x=x, seed=3)
    adata.write_h5ad(source)
    bands, seen = [], set()
    sort_band = shuffle._sort_band

    def watched(*args):  # pass 2, once per band: what lies beside the copy meanwhile
        bands.append(args[4:6])
        seen.update(leftovers(tmp_path))
        return sort_band(*args)

    shuffle._sort_band = watched
    try:
        perm = ta.write_shuffled(source, destination, seed=3, chunk_mib=0.004, compression="gzip")
    finally:
        shuffle._sort_band = sort_band
    assert len(bands) > 10  # several bands for each matrix
    assert any(name.endswith(".spill") for name in seen), seen
    assert any(name.endswith(".partial") for name in seen), seen
    assert leftovers(tmp_path) == []  # the spill is removed with the copy in place
    with h5py.File(destination) as f:
        assert f["layers/scaled"].compression == "gzip"
        assert f["X/data" if x == "csr" else "X"].compression == "gzip"
    copy = ad.read_h5ad(destination)
    assert_rows_under(copy, adata, perm)
    pd.testing.assert_frame_equal(copy.obs.drop(columns="source_index"), adata.obs.iloc[perm])


def test_without_numba_the_numpy_kernels_write_the_same_copy(tmp_path, monkeypatch):
    source, destination = tmp_path / "sorted.h5ad", tmp_path / "shuffled.h5ad"
    adata = rich_adata(seed=5)
    adata.write_h5ad(source)
    monkeypatch.setattr(_kernels, "HAVE_NUMBA", False)  # as where numba is not installed
    assert _kernels.get_kernels("auto").name == "numpy"
    perm = ta.write_shuffled(source, destination, seed=5, chunk_mib=0.003)
    assert_rows_under(ad.read_h5ad(destination), adata, perm)


def test_bands_cut_the_copy_within_the_budget():
    costs = np.array([5, 5, 5, 20, 1, 1, 1, 1, 9])
    cuts = shuffle._cuts(costs, 10)
    np.testing.assert_array_equal(cuts, [0, 2, 3, 4, 8, 9])  # a row above the budget: alone
    assert list(shuffle._chunks(costs, 10)) == [(0, 2), (2, 3), (3, 4), (4, 8), (8, 9)]
    np.testing.assert_array_equal(shuffle._cuts(costs, 10**6), [0, 9])
    np.testing.assert_array_equal(shuffle._cuts(np.zeros(0, np.int64), 10), [0])


def test_seed_fixes_the_order_and_index_key_is_optional(tmp_path, capsys):
    source = tmp_path / "s.h5ad"
    rich_adata(n=50).write_h5ad(source)
    a = ta.write_shuffled(source, tmp_path / "a.h5ad", seed=1, progress=True)
    assert "a.h5ad: 100%" in capsys.readouterr().err  # the progress bar, forced on
    (tmp_path / "plain.txt").write_text("")  # the copy has the permissions of any new file
    assert (tmp_path / "a.h5ad").stat().st_mode == (tmp_path / "plain.txt").stat().st_mode
    b = ta.write_shuffled(source, tmp_path / "b.h5ad", seed=1, index_key=None, compression="gzip")
    c = ta.write_shuffled(source, tmp_path / "c.h5ad", seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert "source_index" not in ad.read_h5ad(tmp_path / "b.h5ad").obs
    with h5py.File(tmp_path / "b.h5ad") as f:
        assert f["X/data"].compression == "gzip"
    np.testing.assert_array_equal(
        dense(ad.read_h5ad(tmp_path / "b.h5ad").X), dense(ad.read_h5ad(tmp_path / "a.h5ad").X)
    )
    with pytest.raises(ValueError, match=r"already has a column 'source_index'.*index_key"):
        ta.write_shuffled(tmp_path / "a.h5ad", tmp_path / "again.h5ad")
    assert not (tmp_path / "again.h5ad").exists() and leftovers(tmp_path) == []


def test_destination_must_differ_and_exist_only_with_overwrite(tmp_path):
    source = tmp_path / "s.h5ad"
    rich_adata(n=40).write_h5ad(source)
    before = digest(source)
    with pytest.raises(ValueError, match=r"is the source file.*new path"):
        ta.write_shuffled(source, tmp_path / "sub" / ".." / "s.h5ad")
    (tmp_path / "link.h5ad").symlink_to(source)
    with pytest.raises(ValueError, match=r"is the source file"):
        ta.write_shuffled(source, tmp_path / "link.h5ad", overwrite=True)
    assert digest(source) == before

    destination = tmp_path / "d.h5ad"
    destination.write_text("keep me")
    with pytest.raises(FileExistsError, match=r"exists. Pass overwrite=True"):
        ta.write_shuffled(source, destination)
    assert destination.read_text() == "keep me"
    ta.write_shuffled(source, destination, overwrite=True)
    assert ad.read_h5ad(destination).n_obs == 40
    with pytest.raises(FileNotFoundError, match=r"folder .* does not exist"):
        ta.write_shuffled(source, tmp_path / "missing" / "d.h5ad")
    (tmp_path / "table.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match=r"is not an HDF5 file.*write_h5ad"):
        ta.write_shuffled(tmp_path / "table.csv", tmp_path / "e.h5ad")
    with pytest.raises(ValueError, match="chunk_mib must be positive"):
        ta.write_shuffled(source, tmp_path / "e.h5ad", chunk_mib=0)


def test_csc_source_is_refused_with_the_conversion(tmp_path):
    source = tmp_path / "csc.h5ad"
    adata = rich_adata(n=30)
    adata.X = adata.X.tocsc()
    adata.write_h5ad(source)
    with pytest.raises(ValueError, match=r"X is stored CSC.*tocsr\(\)"):
        ta.write_shuffled(source, tmp_path / "d.h5ad")
    assert not (tmp_path / "d.h5ad").exists() and leftovers(tmp_path) == []


def test_not_enough_disk_space_is_refused_before_writing(tmp_path):
    source = tmp_path / "huge.h5ad"
    ad.AnnData(obs=pd.DataFrame(index=[f"c{i}" for i in range(10)])).write_h5ad(source)
    with h5py.File(source, "a") as f:  # 40 TB declared, nothing allocated: a tiny real file
        x = f.create_dataset("X", shape=(10, 10**12), dtype="float32", chunks=(1, 4096))
        x.attrs["encoding-type"] = "array"
        x.attrs["encoding-version"] = "0.2.0"
    assert source.stat().st_size < 2**20
    with pytest.raises(OSError, match=r"needs about [\d,]+ MiB .* has [\d,]+ MiB free") as plain:
        ta.write_shuffled(source, tmp_path / "d.h5ad")
    assert "spill" not in str(plain.value)  # an uncompressed copy sorts its bands in place
    assert not (tmp_path / "d.h5ad").exists() and leftovers(tmp_path) == []
    # a compressed copy also needs the spill file of its largest matrix: about twice as much
    with pytest.raises(OSError, match=r"plus [\d,]+ MiB of temporary spill\) but") as spilled:
        ta.write_shuffled(source, tmp_path / "d.h5ad", compression="gzip")
    need = [
        int(m.replace(",", ""))
        for e in (plain, spilled)
        for m in re.findall(r"needs about ([\d,]+) MiB", str(e.value))
    ]
    assert 1.99 * need[0] < need[1] < 2.01 * need[0], need
    assert not (tmp_path / "d.h5ad").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("compression", [None, "gzip"])  # bands in place; in a spill file
def test_a_source_that_fails_partway_leaves_nothing(tmp_path, compression):
    source = tmp_path / "corrupt.h5ad"
    rich_adata(n=200).write_h5ad(source)
    with h5py.File(source, "a") as f:  # the last cells point past the stored values
        indptr = f["X/indptr"][:]
        indptr[-5:] += 10**6
        f["X/indptr"][:] = indptr
    with pytest.raises((ValueError, OSError, TypeError)):
        ta.write_shuffled(source, tmp_path / "d.h5ad", chunk_mib=0.001, compression=compression)
    assert not (tmp_path / "d.h5ad").exists() and leftovers(tmp_path) == []


INTERRUPTED = """
import os, signal, sys
import torch_adata as ta
from torch_adata import shuffle

hook, compression = sys.argv[3], sys.argv[4] if sys.argv[4] != "none" else None
original = getattr(shuffle, hook)


def tick():
    # a real SIGINT, delivered to this process at the 4th window read (pass 1) or the 4th band
    # sorted (pass 2): the same signal Ctrl-C sends, at a point that does not depend on the
    # machine's speed
    tick.calls += 1
    if tick.calls == 4:
        print(sorted(p for p in os.listdir(os.path.dirname(sys.argv[2])) if p[0] == "."))
        os.kill(os.getpid(), signal.SIGINT)


def interrupted_windows(*args):
    for window in original(*args):
        tick()
        yield window


def interrupted_band(*args):
    tick()
    return original(*args)


tick.calls = 0
setattr(shuffle, hook, interrupted_windows if hook == "_chunks" else interrupted_band)
ta.write_shuffled(
    sys.argv[1], sys.argv[2], chunk_mib=0.0005, compression=compression, progress=False
)
"""


@pytest.mark.parametrize(
    "hook, compression",
    [("_chunks", "none"), ("_sort_band", "none"), ("_sort_band", "gzip")],
    ids=["pass 1", "pass 2", "pass 2 with a spill file"],
)
def test_ctrl_c_midway_leaves_no_destination_and_no_temporary(tmp_path, hook, compression):
    source, destination = tmp_path / "s.h5ad", tmp_path / "d.h5ad"
    n = 4_000
    x = sp.random(n, 500, 0.02, format="csr", dtype=np.float32, random_state=0)
    ad.AnnData(x, obs=pd.DataFrame(index=[f"c{i}" for i in range(n)])).write_h5ad(source)
    out = subprocess.run(
        [sys.executable, "-c", INTERRUPTED, str(source), str(destination), hook, compression],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0 and "KeyboardInterrupt" in out.stderr, out.stderr
    assert "in interrupted_" in out.stderr  # it stopped inside the matrix, not before it
    beside = out.stdout  # the hidden files beside the copy when the signal came
    assert ".partial" in beside
    assert (".spill" in beside) == (compression == "gzip")
    assert not destination.exists() and leftovers(tmp_path) == []


def test_command_line_shuffle(tmp_path, capsys):
    source, destination = tmp_path / "s.h5ad", tmp_path / "d.h5ad"
    adata = rich_adata(n=60)
    adata.write_h5ad(source)
    command = [sys.executable, "-m", "torch_adata.cli", "shuffle", str(source), str(destination)]
    out = subprocess.run([*command, "--seed", "5"], env=ENV, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "60 cells written" in out.stdout
    perm = np.random.default_rng(5).permutation(60)
    copy = ad.read_h5ad(destination)
    np.testing.assert_array_equal(copy.obs["source_index"].to_numpy(), perm)
    np.testing.assert_array_equal(dense(copy.X), dense(adata.X)[perm])

    again = subprocess.run(command, env=ENV, capture_output=True, text=True)
    assert again.returncode == 1
    assert "torch-adata shuffle:" in again.stderr and "--overwrite" in again.stderr
    assert "Traceback" not in again.stderr
    # in-process, the same entry point as the console script
    cli.main(["shuffle", str(source), str(destination), "--overwrite", "--chunk-mib", "0.01"])
    assert "60 cells written" in capsys.readouterr().out
    np.testing.assert_array_equal(
        ad.read_h5ad(destination).obs["source_index"].to_numpy(),
        np.random.default_rng(0).permutation(60),
    )


def mean_tv(labels: np.ndarray, sampler, epochs: int = 4) -> float:
    """Mean over batches of the total-variation distance of a batch's label mix from the whole's."""
    k = int(labels.max()) + 1
    overall = np.bincount(labels, minlength=k) / len(labels)
    distances = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for batch in sampler:
            mix = np.bincount(labels[np.asarray(batch)], minlength=k) / len(batch)
            distances.append(0.5 * np.abs(mix - overall).sum())
    return float(np.mean(distances))


def test_block_shuffle_on_the_copy_mixes_batches_like_uniform_sampling(tmp_path):
    n, types = 16_000, 20
    rng = np.random.default_rng(0)
    labels = np.sort(rng.integers(0, types, n))  # stored sorted by cell type
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical.from_codes(labels, [f"type{i}" for i in range(types)])},
        index=[f"c{i}" for i in range(n)],
    )
    x = sp.random(n, 20, 0.1, format="csr", dtype=np.float32, random_state=0)
    source, destination = tmp_path / "sorted.h5ad", tmp_path / "shuffled.h5ad"
    ad.AnnData(x, obs=obs).write_h5ad(source)
    ta.write_shuffled(source, destination, seed=0)
    copied = ad.read_h5ad(destination, backed="r").obs["cell_type"].cat.codes.to_numpy()

    uniform = mean_tv(labels, UniformBatchSampler(n, 256, seed=1))
    block_on_source = mean_tv(labels, BlockShuffleSampler(n, 256, seed=1))
    block_on_copy = mean_tv(copied.astype(np.int64), BlockShuffleSampler(n, 256, seed=1))
    assert block_on_source > 1.5 * uniform  # the problem the copy solves (2x here)
    assert block_on_copy <= 1.1 * uniform, (block_on_copy, uniform)
