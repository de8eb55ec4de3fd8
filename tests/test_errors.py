"""Every bad input fails at once, with a message that says what is wrong and how to fix it."""

from __future__ import annotations

import re

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import N_OBS, make_adata, write_h5ad

from torch_adata import AnnDataset, CategoryEncoder


@pytest.fixture(scope="module")
def adata():
    return make_adata("csr")


@pytest.fixture(scope="module")
def dataset(adata):
    return AnnDataset(adata, obs_keys=["cell_type", "size"])


# --------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize("as_path", [False, True])
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"layer": "count"}, r"Unknown layer 'count'\. adata\.layers has: \['counts', 'scaled'\]"),
        (
            {"layer": "raw"},
            r"The AnnData has no \.raw .*Its layers: \['counts', 'scaled'\]; batch one with layer=",
        ),
        (
            {"obs_keys": ["cell_type", "celltype"]},
            r"Unknown obs column 'celltype'\. adata\.obs has: \[.*'cell_type'.*'batch'\]",
        ),
        (
            {"obsm_keys": "X_umap"},
            r"Unknown obsm key 'X_umap'\. adata\.obsm has: \['X_pca', 'frame', 'sp'\]",
        ),
    ],
    ids=["layer", "raw", "obs", "obsm"],
)
def test_unknown_keys_list_what_exists(adata, h5ad_files, kwargs, match, as_path):
    source = h5ad_files["csr"] if as_path else adata
    with pytest.raises(KeyError, match=match):
        AnnDataset(source, **kwargs)


def test_key_error_message_is_readable(adata):
    with pytest.raises(KeyError) as info:
        AnnDataset(adata, layer="raww")
    assert str(info.value).startswith("Unknown layer 'raww'")  # not a quoted repr


def test_decode_of_a_field_that_is_not_categorical(dataset):
    with pytest.raises(KeyError, match=r"'size' is not a categorical obs field.*\['cell_type'\]"):
        dataset.decode("size", [0])


# --------------------------------------------------------------------------- obsm / obs types


def with_obsm(adata, key, value):
    adata = adata.copy()
    adata.obsm[key] = value
    return adata


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (
            pd.DataFrame({"label": ["a", "b"] * 18 + ["c"], "n": np.arange(N_OBS)}),
            r"obsm 'bad' is a DataFrame with non-numeric columns.*to_numpy\(dtype='float32'\)",
        ),
        (
            np.array([[object(), 1]] * N_OBS, dtype=object),
            r"obsm 'bad' has dtype object, which is not numeric",
        ),
        (np.full((N_OBS, 2), "x"), r"obsm 'bad' has dtype <U1, which is not numeric"),
    ],
    ids=["dataframe_with_strings", "object_array", "string_array"],
)
def test_non_numeric_obsm_in_memory(adata, value, match):
    if isinstance(value, pd.DataFrame):
        value.index = adata.obs_names
    with pytest.raises(TypeError, match=match):
        AnnDataset(with_obsm(adata, "bad", value), obsm_keys="bad")


def test_non_numeric_obsm_in_a_file(adata, tmp_path):
    strings = pd.DataFrame({"s": np.array(["a"] * N_OBS, dtype=object)}, index=adata.obs_names)
    bad = with_obsm(adata, "frame_str", strings)
    bad.obsm["strings"] = np.full((N_OBS, 2), "x")
    path = tmp_path / "bad_obsm.h5ad"
    write_h5ad(bad, path)
    with pytest.raises(TypeError, match=r"obsm 'frame_str' is a DataFrame with non-numeric"):
        AnnDataset(path, obsm_keys="frame_str")
    # obsm entries are read into memory once, and checked there
    with pytest.raises(TypeError, match=r"obsm 'strings' has dtype object, which is not numeric"):
        AnnDataset(path, obsm_keys="strings")
    # entries that are not asked for do not matter
    assert AnnDataset(path, obsm_keys="X_pca")[[0]]["X_pca"].shape == (1, 3)


def with_obs(adata, key, values):
    adata = adata.copy()
    adata.obs[key] = values
    return adata


@pytest.mark.parametrize(
    ("values", "error", "match"),
    [
        (
            pd.Series([1, "a"] * 18 + [2.5], dtype=object),
            TypeError,
            r"obs column 'bad' has dtype object holding \['float', 'int', 'str'\]; it is "
            r"neither categorical nor numeric\. Convert it.*astype\(str\)\.astype\('category'\)",
        ),
        (
            pd.Series([True, False] * 18 + [None], dtype=object),
            TypeError,
            r"holding \['bool'\]; it is neither categorical nor numeric",
        ),
        (
            pd.date_range("2020-01-01", periods=N_OBS),
            TypeError,
            r"obs column 'bad' has dtype datetime64\[.s\], which cannot become a tensor",
        ),
        (
            pd.array([1, None] * 18 + [3], dtype="Int64"),
            ValueError,
            r"obs column 'bad' has 18 missing values out of 37.*Fill or drop",
        ),
    ],
    ids=["mixed_object", "object_bools_with_none", "datetime", "nullable_int_with_na"],
)
def test_obs_columns_that_cannot_become_tensors(adata, values, error, match):
    bad = with_obs(adata, "bad", values.to_numpy() if isinstance(values, pd.Series) else values)
    assert bad.obs["bad"].dtype == getattr(values, "dtype", None)
    with pytest.raises(error, match=match):
        AnnDataset(bad, obs_keys="bad")


def test_float_nan_with_an_integer_override(adata):
    bad = with_obs(adata, "size", np.where(np.arange(N_OBS) < 2, np.nan, 1.0))
    with pytest.raises(ValueError, match=r"'size' has 2 missing \(NaN\) values out of 37"):
        AnnDataset(bad, obs_keys="size")
    AnnDataset(bad, obs_keys="size", na="code")  # float NaN stays NaN in a float tensor
    with pytest.raises(ValueError, match=r"'size' has 2 missing values out of 37"):
        AnnDataset(bad, obs_keys="size", obs_dtypes={"size": torch.int64})


def test_nan_in_a_categorical_column_gives_count_and_fix(adata):
    bad = adata.copy()
    bad.obs.loc[bad.obs_names[[1, 4, 9]], "cell_type"] = np.nan
    msg = (
        r"obs column 'cell_type' has 3 missing \(NaN\) values out of 37\. Fix: drop those cells "
        r".*notna\(\).*fillna\('unknown'\).*na='code'"
    )
    with pytest.raises(ValueError, match=msg):
        AnnDataset(bad, obs_keys="cell_type")
    codes = AnnDataset(bad, obs_keys="cell_type", na="code", X=False)[:]
    assert (codes == -1).sum() == 3 and codes[1] == -1


def test_nan_in_a_string_column(adata):
    bad = with_obs(adata, "batch", adata.obs["batch"].where(np.arange(N_OBS) != 0, None))
    with pytest.raises(ValueError, match=r"'batch' has 1 missing \(NaN\) values out of 37"):
        AnnDataset(bad, obs_keys="batch")


# --------------------------------------------------------------------------- empty / no X


@pytest.mark.parametrize(
    "select",
    [lambda a: a[[]], lambda a: a[np.zeros(a.n_obs, dtype=bool)], lambda a: a[[]].copy()],
    ids=["empty_list_view", "false_mask_view", "empty_copy"],
)
def test_an_anndata_without_cells(adata, select):
    with pytest.raises(ValueError, match=r"The AnnData has no cells \(n_obs == 0\)"):
        AnnDataset(select(adata))


def test_a_file_without_cells(adata, tmp_path):
    path = tmp_path / "empty.h5ad"
    write_h5ad(adata[[]].copy(), path)
    with pytest.raises(ValueError, match=r"no cells"):
        AnnDataset(path)


def test_x_is_none(adata, tmp_path):
    no_x = ad.AnnData(obs=adata.obs.copy())
    with pytest.raises(ValueError, match=r"adata\.X is None\. Pass layer="):
        AnnDataset(no_x)
    path = tmp_path / "no_x.h5ad"
    write_h5ad(no_x, path)
    with pytest.raises(ValueError, match=r"has no matrix X; nothing to batch"):
        AnnDataset(path)
    assert AnnDataset(path, X=False, obs_keys="size")[[0, 1]].shape == (2,)


def test_x_false_with_nothing_else(adata):
    with pytest.raises(ValueError, match=r"Nothing to batch: X=False and no obs_keys"):
        AnnDataset(adata, X=False)


@pytest.mark.parametrize("kwargs", [{"layer": "counts"}, {"sparse": True}, {"use_raw": True}])
def test_x_options_without_x(adata, kwargs):
    with pytest.raises(
        ValueError, match=r"layer=, use_raw=, var_names= and sparse= apply to the expression field"
    ):
        AnnDataset(adata, X=False, obs_keys="size", **kwargs)


# --------------------------------------------------------------------------- indexing


@pytest.mark.parametrize(
    "index",
    [N_OBS, -N_OBS - 1, [0, 99], np.array([3, -40]), torch.tensor([N_OBS])],
    ids=["int", "negative_int", "list", "array", "tensor"],
)
def test_index_out_of_range(dataset, index):
    bad = index if isinstance(index, int) else max(np.asarray(index).tolist(), key=abs)
    with pytest.raises(IndexError, match=rf"Index {bad} is out of range for a dataset of 37"):
        dataset[index]
    with pytest.raises(IndexError, match=r"out of range"):
        dataset.__getitems__(np.atleast_1d(np.asarray(index)).tolist())
    with pytest.raises(IndexError, match=rf"Index {bad} is out of range for a dataset of 37"):
        dataset.gather(index)  # public, so checked like indexing


@pytest.mark.parametrize(
    "index",
    [
        1.5,
        np.float64(2.0),
        [0.0, 1.0],
        np.array([1.0, 2.0]),
        torch.tensor([1.0]),
        torch.tensor(1.7),
        "cell0",
        ["cell0", "cell1"],
        None,
    ],
    ids=["float", "np_float", "float_list", "float_array", "float_tensor", "float_0d_tensor",
         "str", "str_list", "none"],
)  # fmt: skip
def test_index_of_the_wrong_dtype(dataset, index):
    with pytest.raises(TypeError, match=r"Indices must be integers .* got dtype"):
        dataset[index]
    with pytest.raises(TypeError, match=r"Indices must be integers .* got dtype"):
        dataset.gather(index)


@pytest.mark.parametrize(
    ("index", "match"),
    [
        (np.zeros((2, 2), dtype=int), r"Index must be 1-D, got shape \(2, 2\)"),
        (np.ones(N_OBS - 1, dtype=bool), r"Boolean mask has length 36; the dataset has 37"),
        (torch.ones(N_OBS + 1, dtype=torch.bool), r"Boolean mask has length 38"),
        (True, r"Boolean mask has length 1; the dataset has 37"),  # not row 1
        (torch.tensor(True), r"Boolean mask has length 1"),
        (np.bool_(False), r"Boolean mask has length 1"),
    ],
    ids=["2d", "short_mask", "long_mask", "bool", "bool_0d_tensor", "np_bool"],
)
def test_index_of_the_wrong_shape(dataset, index, match):
    with pytest.raises(IndexError, match=match):
        dataset[index]
    with pytest.raises(IndexError, match=match):
        dataset.gather(index)


def test_gather_of_valid_rows_equals_indexing(dataset):
    rows = np.array([5, -1, 5, 0])
    expected = dataset[rows]
    for given in (rows, rows.tolist(), torch.from_numpy(rows)):
        got = dataset.gather(given)
        assert set(got) == set(expected)
        for key in expected:
            assert torch.equal(got[key], expected[key]), key


# --------------------------------------------------------------------------- files


def test_a_path_that_does_not_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"No such file: '.*missing\.h5ad'"):
        AnnDataset(tmp_path / "missing.h5ad")
    with pytest.raises(FileNotFoundError, match=r"No such file"):
        AnnDataset(str(tmp_path / "missing.h5ad"), backed=False)


def test_a_folder_without_h5ad_files(tmp_path):
    # a folder is a collection of its .h5ad files (tests/test_collection.py)
    (tmp_path / "notes.txt").write_text("not data")
    with pytest.raises(ValueError, match=r"holds no \.h5ad files\. Pass a folder of \.h5ad"):
        AnnDataset(tmp_path)


def test_a_file_that_is_not_hdf5(tmp_path):
    path = tmp_path / "cells.csv"
    path.write_text("cell,gene\n1,2\n")
    with pytest.raises(ValueError, match=r"is not an \.h5ad file \(not HDF5\)"):
        AnnDataset(path)


def test_an_hdf5_file_that_is_not_h5ad(tmp_path):
    path = tmp_path / "matrix.h5"
    with h5py.File(path, "w") as f:
        f["matrix"] = np.ones((3, 3))
        f.create_group("obs")
    with pytest.raises(ValueError, match=r"HDF5 file but not an \.h5ad file: it has no \['var'\]"):
        AnnDataset(path)


def test_a_file_cut_short_names_it_and_the_fix(tmp_path):
    whole, cut = tmp_path / "whole.h5ad", tmp_path / "cut.h5ad"
    write_h5ad(make_adata(), whole)
    cut.write_bytes(whole.read_bytes()[:4096])  # an interrupted download or copy
    with pytest.raises(
        ValueError,
        match=r"'.*cut\.h5ad' is an HDF5 file that cannot be opened, "
        r"probably cut short or corrupt \(h5py: .*\)\. Download or write it again",
    ):
        AnnDataset(cut)
    with pytest.raises(ValueError, match=r"'.*cut\.h5ad' is an HDF5 file that cannot be opened"):
        AnnDataset([whole, cut])  # in a collection too


def test_not_an_anndata():
    with pytest.raises(TypeError, match=r"Expected an AnnData or a path to an \.h5ad file"):
        AnnDataset(np.zeros((3, 3)))


def test_backed_csc_names_the_fix(h5ad_files):
    fix = r"stored as CSC.*Fix: rewrite the file as CSR.*\.tocsr\(\)"
    with pytest.raises(ValueError, match=fix):
        AnnDataset(h5ad_files["csc"])
    backed = ad.read_h5ad(h5ad_files["csc"], backed="r")
    try:
        with pytest.raises(ValueError, match=fix):
            AnnDataset(backed)
        with pytest.raises(ValueError, match=fix):
            AnnDataset(backed[:10, [1, 2]])
    finally:
        backed.file.close()
    # in memory, CSC is fine (read through scipy)
    assert AnnDataset(h5ad_files["csc"], backed=False)[[0, 1]].shape == (2, 11)


def test_backed_csc_layer(adata, tmp_path):
    csc = adata.copy()
    csc.layers["by_gene"] = csc.X.tocsc()
    path = tmp_path / "csc_layer.h5ad"
    write_h5ad(csc, path)
    with pytest.raises(ValueError, match=r"layers/by_gene is stored as CSC.*rewrite"):
        AnnDataset(path, layer="by_gene")


def test_backed_view_that_repeats_genes(h5ad_files):
    backed = ad.read_h5ad(h5ad_files["csr"], backed="r")
    try:
        with pytest.raises(ValueError, match=r"a view that repeats variables is not supported"):
            AnnDataset(backed[:, [1, 1, 2]])
    finally:
        backed.file.close()


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("obs_keys", "obsm_keys", "extra", "name"),
    [
        (["X_pca"], ["X_pca"], {}, "X_pca"),
        (["size", "size"], [], {}, "size"),
        (["X"], [], {}, "X"),
        (["index"], [], {"return_index": True}, "index"),
    ],
    ids=["obs_and_obsm", "repeated_obs", "obs_named_X", "obs_named_index"],
)
def test_duplicate_field_names(adata, obs_keys, obsm_keys, extra, name):
    clash = adata.copy()
    clash.obs["X_pca"] = 1.0
    clash.obs["X"] = 2.0
    clash.obs["index"] = 3
    with pytest.raises(ValueError, match=rf"Two fields are named '{name}'.*Rename one"):
        AnnDataset(clash, obs_keys=obs_keys, obsm_keys=obsm_keys, **extra)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"engine": "fast"}, ValueError, r"engine must be 'auto', 'numba' or 'numpy', got 'fast'"),
        ({"dtype": torch.complex64}, TypeError, r"field 'X': dtype must be a float or int"),
        ({"dtype": torch.bfloat16}, TypeError, r"Unsupported dtype torch\.bfloat16"),
        ({"obsm_keys": "X_pca", "obsm_dtype": torch.bool}, TypeError, r"'X_pca': dtype must be"),
        (
            {"obs_keys": "size", "obs_dtypes": {"size": torch.uint8}},
            TypeError,
            r"Unsupported dtype torch\.uint8; use one of",
        ),
        (
            {"obs_keys": "size", "obs_dtypes": {"n_genes": torch.int32}},
            ValueError,
            r"obs_dtypes names columns that are not in obs_keys: \['n_genes'\]",
        ),
        (
            {"obs_keys": "cell_type", "obs_dtypes": {"cell_type": torch.float32}},
            TypeError,
            r"'cell_type' is categorical; it is encoded as int64 codes",
        ),
        (
            {"obs_keys": "size", "encoders": {"batch": CategoryEncoder(["b1"])}},
            ValueError,
            r"encoders names columns that are not in obs_keys: \['batch'\]",
        ),
        (
            {"obs_keys": "size", "encoders": {"size": CategoryEncoder(["b1"])}},
            TypeError,
            r"obs column 'size' is float, not categorical: it takes no encoder",
        ),
    ],
    ids=[
        "engine",
        "complex_dtype",
        "bfloat16",
        "bool_obsm",
        "uint8_obs",
        "obs_dtypes_unknown",
        "dtype_for_category",
        "encoder_unknown",
        "encoder_for_float",
    ],
)
def test_bad_arguments(adata, kwargs, error, match):
    with pytest.raises(error, match=match):
        AnnDataset(adata, **kwargs)


def test_unseen_labels_with_a_reused_encoder(adata):
    other = adata.copy()
    other.obs["cell_type"] = other.obs["cell_type"].cat.add_categories(["Mono"])
    other.obs.loc[other.obs_names[:2], "cell_type"] = "Mono"
    encoders = AnnDataset(adata, obs_keys="cell_type").encoders
    msg = r"'cell_type' has 2 values whose labels the encoder has never seen: \['Mono'\]"
    with pytest.raises(ValueError, match=msg):
        AnnDataset(other, obs_keys="cell_type", encoders=encoders)


def test_error_messages_quote_paths_as_given(tmp_path):
    path = tmp_path / "a folder with spaces" / "x.h5ad"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        AnnDataset(path)
