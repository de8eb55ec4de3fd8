"""Shared fixtures: small AnnData objects and the ``.h5ad`` files anndata writes from them.

Every builder is deterministic (seeded) and small, so the whole suite stays fast. Helpers that
compute what anndata itself returns (the expected values of a batch) live here too, so tests
compare the engine with anndata's own slicing rather than with a re-implementation.
"""

from __future__ import annotations

import copy
import importlib
import os
from types import ModuleType

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from torch_adata import AnnDataset, SparseBatch
from torch_adata._compat import sparse_arrays_supported
from torch_adata._gather import BackedCSRReader, MappedReader


def load_example(name: str) -> ModuleType:
    """The installed example model module ``torch_adata.models.<name>`` (what the scripts in
    ``examples/`` and the configs in ``examples/configs/`` use)."""
    return importlib.import_module(f"torch_adata.models.{name}")


def cli_args(config: str, root, *extra: str, accelerator: str = "cpu") -> list[str]:
    """LightningCLI arguments: ``config`` on ``accelerator``, writing under ``root``, then
    ``extra`` overrides."""
    return [
        "--config",
        config,
        "--trainer.accelerator",
        accelerator,
        "--trainer.default_root_dir",
        str(root),
        *extra,
    ]


N_OBS, N_VARS = 37, 11
# scipy sparse arrays as X: anndata 0.11 and later (CI also runs the oldest anndata)
SPARSE_ARRAYS = sparse_arrays_supported()


def make_adata(
    x: str = "csr",
    n_obs: int = N_OBS,
    n_vars: int = N_VARS,
    seed: int = 0,
    x_dtype=np.float32,
) -> ad.AnnData:
    """An AnnData with X stored as ``x`` ("dense", "csr", "csc", or scipy's sparse arrays
    "csr_array", "csc_array"), layers, obsm and obs.

    - X: about 30 % non-zeros, every 5th row all zero (empty CSR rows), values that differ
      per cell and gene (so a misplaced value is caught);
    - layers: ``counts`` (CSR int32), ``scaled`` (dense float64);
    - obsm: ``X_pca`` (dense float64), ``sp`` (CSR float32), ``frame`` (numeric DataFrame);
    - obs: float64, float32, int64, int32, bool, an ordered-by-hand categorical with an unused
      category, and a string (object) column;
    - uns: a string and an array.
    """
    if x.endswith("_array") and not SPARSE_ARRAYS:
        pytest.skip("this anndata stores no scipy sparse arrays as X (0.11 and later do)")
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((n_obs, n_vars)) + 3.0
    mask = rng.random((n_obs, n_vars)) < 0.3
    dense = np.where(mask, values, 0.0).astype(x_dtype)
    dense[::5] = 0
    X = {
        "dense": dense,
        "csr": sp.csr_matrix(dense),
        "csc": sp.csc_matrix(dense),
        "csr_array": sp.csr_array(dense),
        "csc_array": sp.csc_array(dense),
    }[x]
    counts = rng.poisson(1.0, (n_obs, n_vars)).astype(np.int32)
    obs = pd.DataFrame(
        {
            "size": rng.random(n_obs) * 10,
            "score32": rng.random(n_obs).astype(np.float32),
            "n_genes": rng.integers(0, 1000, n_obs).astype(np.int64),
            "plate": rng.integers(0, 4, n_obs).astype(np.int32),
            "is_doublet": rng.random(n_obs) < 0.2,
            "cell_type": pd.Categorical(
                rng.choice(["T", "B", "NK"], n_obs), categories=["T", "B", "NK", "unused"]
            ),
            "batch": rng.choice(["b2", "b10", "b1"], n_obs).astype(object),
        },
        # object-dtype names: anndata 0.12 refuses to write pandas 3's default string arrays
        index=pd.Index([f"cell{i}" for i in range(n_obs)], dtype=object),
    )
    var = pd.DataFrame(index=pd.Index([f"gene{j}" for j in range(n_vars)], dtype=object))
    adata = ad.AnnData(X, obs=obs, var=var)
    adata.layers["counts"] = sp.csr_matrix(counts)
    adata.layers["scaled"] = dense.astype(np.float64) * 2
    adata.obsm["X_pca"] = rng.standard_normal((n_obs, 3))
    adata.obsm["sp"] = sp.csr_matrix(
        np.where(rng.random((n_obs, 4)) < 0.4, rng.random((n_obs, 4)), 0).astype(np.float32)
    )
    adata.obsm["frame"] = pd.DataFrame(
        {"u": rng.random(n_obs), "v": rng.integers(0, 9, n_obs)}, index=obs.index
    )
    adata.uns["note"] = "do not touch"
    adata.uns["arr"] = np.arange(3)
    return adata


def evict(path) -> None:
    """Drop the file's pages from the page cache (written pages are flushed first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def write_h5ad(adata: ad.AnnData, path, **kwargs) -> None:
    """``adata.write_h5ad(path)``, also where pandas 3 made names and labels ``str`` arrays
    (anndata 0.12 writes those only when ``allow_write_nullable_strings`` is on)."""
    settings = getattr(ad, "settings", None)  # anndata 0.10 has none
    if settings is None or not hasattr(settings, "allow_write_nullable_strings"):
        adata.write_h5ad(path, **kwargs)
        return
    with settings.override(allow_write_nullable_strings=True):
        adata.write_h5ad(path, **kwargs)


def to_numpy(m) -> np.ndarray:
    """Dense numpy form of a matrix, sparse matrix, DataFrame or tensor."""
    if isinstance(m, torch.Tensor):
        return m.numpy()
    if sp.issparse(m):
        return m.toarray()
    if isinstance(m, pd.DataFrame):
        return m.to_numpy()
    return np.asarray(m)


def expected_matrix(adata: ad.AnnData, rows, kind: str = "X", key: str | None = None):
    """What anndata's own slicing returns for ``rows`` of X, a layer or an obsm entry."""
    sub = adata[np.asarray(rows, dtype=np.int64)]
    if kind == "X":
        m = sub.X
    elif kind == "layer":
        m = sub.layers[key]
    else:
        m = sub.obsm[key]
    return to_numpy(m)


def check_batch(dataset: AnnDataset, ref, rows, batch, *, layer=None, obsm_keys=()) -> None:
    """Compare every field of ``batch`` with anndata's slicing of ``ref`` at ``rows``."""
    rows = np.asarray(rows, dtype=np.int64)
    x = batch["X"] if isinstance(batch, dict) else batch
    want = expected_matrix(ref, rows, "layer" if layer else "X", layer)
    if isinstance(x, SparseBatch):
        assert x.indptr.dtype == torch.int32 and x.indices.dtype == torch.int32  # columns fit
        assert x.shape == want.shape
        assert int(x.indptr[-1]) == np.count_nonzero(want)
        x = x.to_dense()
    assert x.dtype == dataset.fields["X"].dtype
    assert tuple(x.shape) == want.shape
    np.testing.assert_array_equal(x.numpy(), want.astype(x.numpy().dtype))
    if not isinstance(batch, dict):
        return
    for key in obsm_keys:
        want = expected_matrix(ref, rows, "obsm", key).astype(np.float32)
        np.testing.assert_array_equal(batch[key].numpy(), want)
    for key, field in dataset.fields.items():
        if key in ("X", *obsm_keys):
            continue
        if key == "index":
            np.testing.assert_array_equal(batch[key].numpy(), rows)
            continue
        column = ref.obs[key].iloc[rows]
        if field.encoder is not None:
            labels = dataset.decode(key, batch[key])
            np.testing.assert_array_equal(labels, column.astype(object).to_numpy())
        else:
            got = batch[key].numpy()
            np.testing.assert_array_equal(got, column.to_numpy().astype(got.dtype))


def snapshot(adata: ad.AnnData) -> dict:
    """A deep copy of everything a dataset could modify, for before/after comparisons."""
    return {
        "obs": adata.obs.copy(deep=True),
        "var": adata.var.copy(deep=True),
        "X": to_numpy(adata.X).copy(),
        "X_type": type(adata.X),
        "layers": {k: to_numpy(v).copy() for k, v in adata.layers.items()},
        "obsm": {k: to_numpy(v).copy() for k, v in adata.obsm.items()},
        "obsm_types": {k: type(v) for k, v in adata.obsm.items()},
        "uns": copy.deepcopy(dict(adata.uns)),
    }


def assert_unchanged(adata: ad.AnnData, before: dict) -> None:
    after = snapshot(adata)
    pd.testing.assert_frame_equal(after["obs"], before["obs"])
    pd.testing.assert_frame_equal(after["var"], before["var"])
    np.testing.assert_array_equal(after["X"], before["X"])
    assert after["X_type"] is before["X_type"]
    assert after["layers"].keys() == before["layers"].keys()
    for k in before["layers"]:
        np.testing.assert_array_equal(after["layers"][k], before["layers"][k])
    assert after["obsm"].keys() == before["obsm"].keys()
    for k in before["obsm"]:
        np.testing.assert_array_equal(after["obsm"][k], before["obsm"][k])
    assert after["obsm_types"] == before["obsm_types"]
    assert after["uns"].keys() == before["uns"].keys()
    assert after["uns"]["note"] == before["uns"]["note"]
    np.testing.assert_array_equal(after["uns"]["arr"], before["uns"]["arr"])


def backed_csr_readers(dataset) -> list[BackedCSRReader]:
    """The backed CSR readers of a dataset's matrix fields (unwrapping views)."""
    readers = []
    for field in dataset.fields.values():
        reader = getattr(field, "reader", None)
        while isinstance(reader, MappedReader):
            reader = reader.base
        if isinstance(reader, BackedCSRReader):
            readers.append(reader)
    return readers


def force_h5py(dataset):
    """Make every backed CSR field read through h5py runs instead of direct ``pread`` reads."""
    readers = backed_csr_readers(dataset)
    assert readers, "the dataset has no backed CSR field"
    for reader in readers:
        reader.direct_reads = False
        reader._state = None
        assert reader.mode == "h5py"
    return dataset


def rechunk(path, keys=("X/data", "X/indices"), chunk: int | None = 7) -> None:
    """Rewrite datasets of an .h5ad file uncompressed, in small chunks or (``chunk=None``)
    contiguous."""
    with h5py.File(path, "r+") as f:
        for key in keys:
            old = f[key]
            data, attrs = old[:], dict(old.attrs)
            del f[key]
            if chunk is None:
                new = f.create_dataset(key, data=data)
            else:
                new = f.create_dataset(key, data=data, chunks=(chunk,), maxshape=(None,))
            new.attrs.update(attrs)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def h5ad_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("h5ad")


@pytest.fixture(scope="session")
def h5ad_files(h5ad_dir):
    """Paths of .h5ad files written by anndata from :func:`make_adata`, by storage kind.

    ``csr``, ``csc``, ``dense``: X in that format; ``gzip``: CSR X written with
    ``compression="gzip"`` (no direct reads possible); ``chunked``: CSR X whose data and indices
    were rewritten in 7-element chunks (the chunked direct-read path); ``contiguous``: the same
    rewritten without chunks (the contiguous direct-read path).
    """
    paths = {}
    for kind in ("csr", "csc", "dense"):
        paths[kind] = h5ad_dir / f"{kind}.h5ad"
        write_h5ad(make_adata(kind), paths[kind])
    paths["gzip"] = h5ad_dir / "gzip.h5ad"
    write_h5ad(make_adata("csr"), paths["gzip"], compression="gzip")
    paths["chunked"] = h5ad_dir / "chunked.h5ad"
    write_h5ad(make_adata("csr"), paths["chunked"])
    rechunk(paths["chunked"])
    paths["contiguous"] = h5ad_dir / "contiguous.h5ad"
    write_h5ad(make_adata("csr"), paths["contiguous"])
    rechunk(paths["contiguous"], chunk=None)
    return paths


@pytest.fixture(scope="session")
def in_memory(h5ad_files):
    """The csr file read fully into memory: the reference for backed reads of that file."""
    return ad.read_h5ad(h5ad_files["csr"])


@pytest.fixture
def backed(h5ad_files):
    """The csr file opened with ``backed="r"`` (closed after the test)."""
    adata = ad.read_h5ad(h5ad_files["csr"], backed="r")
    yield adata
    adata.file.close()
