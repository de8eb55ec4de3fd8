"""Fields and encoders: obs dtypes, category encoders (fit, reuse, NaN, serialisation), and
the batch containers (SparseBatch, densify, collate)."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import N_OBS, make_adata

import torch_adata as ta
from torch_adata import AnnDataset, CategoryEncoder, SparseBatch
from torch_adata._fields import ObsField, numpy_dtype

# --------------------------------------------------------------------------- obs dtypes


@pytest.mark.parametrize(
    ("values", "dtype", "want"),
    [
        (np.array([1.25, -2.5]), None, torch.float32),
        (np.array([1.25, -2.5], dtype=np.float32), None, torch.float32),
        (np.array([3, 4], dtype=np.int64), None, torch.int64),
        (np.array([3, 4], dtype=np.int32), None, torch.int64),
        (np.array([3, 4], dtype=np.uint8), None, torch.int64),
        (np.array([True, False]), None, torch.bool),
        (pd.array([True, False], dtype="boolean"), None, torch.bool),
        (pd.array([5, 6], dtype="Int64"), None, torch.int64),
        (np.array([1.25, -2.5]), torch.float64, torch.float64),
        (np.array([3, 4]), torch.float32, torch.float32),
        (np.array([3, 4]), torch.int32, torch.int32),
        (np.array([True, False]), torch.float32, torch.float32),
        (np.array([True, False]), torch.int64, torch.int64),
    ],
)
def test_obs_column_dtypes(values, dtype, want):
    field = ObsField.from_column("c", pd.Series(values), dtype=dtype)
    assert field.encoder is None
    got = field.take(np.array([1, 0, 1]))
    assert got.dtype == want
    expected = np.asarray(values, dtype=float)[[1, 0, 1]]
    np.testing.assert_array_equal(got.double().numpy(), expected)


def test_obs_float_nan_follows_the_na_rule():
    with pytest.raises(ValueError, match=r"'c' has 1 missing \(NaN\) values out of 2.*na='code'"):
        ObsField.from_column("c", pd.Series([1.0, np.nan]))
    field = ObsField.from_column("c", pd.Series([1.0, np.nan]), na="code")
    assert torch.isnan(field.take(np.array([1]))).all()


@pytest.mark.parametrize(
    "column",
    [
        pd.Series(pd.Categorical(["b", "a", "b"], categories=["b", "a"])),
        pd.Series(["b", "a", "b"], dtype=object),
        pd.Series(["b", "a", "b"], dtype="string"),
    ],
    ids=["categorical", "object", "string_dtype"],
)
def test_label_columns_become_int64_codes(column):
    field = ObsField.from_column("c", column)
    assert field.dtype == torch.int64
    codes = field.take(np.array([0, 1, 2]))
    np.testing.assert_array_equal(field.encoder.decode(codes), ["b", "a", "b"])


def test_numpy_dtype_mapping():
    assert numpy_dtype(torch.float16) == np.float16
    assert numpy_dtype(torch.bool) == np.bool_
    with pytest.raises(TypeError, match=r"Unsupported dtype torch\.complex64"):
        numpy_dtype(torch.complex64)


# --------------------------------------------------------------------------- encoders


def test_categorical_order_is_kept_and_strings_are_sorted():
    adata = make_adata("csr")
    dataset = AnnDataset(adata, obs_keys=["cell_type", "batch"], X=False)
    assert list(dataset.encoders["cell_type"].categories) == ["T", "B", "NK", "unused"]
    assert list(dataset.encoders["batch"].categories) == ["b1", "b10", "b2"]
    batch = dataset[:]
    # codes are positions in that order, for every cell
    want_ct = adata.obs["cell_type"].cat.codes.to_numpy()
    np.testing.assert_array_equal(batch["cell_type"].numpy(), want_ct)
    want_b = pd.Index(["b1", "b10", "b2"]).get_indexer(adata.obs["batch"])
    np.testing.assert_array_equal(batch["batch"].numpy(), want_b)


def test_encoder_is_fitted_on_the_whole_column_not_the_batch():
    adata = make_adata("csr")
    dataset = AnnDataset(adata, obs_keys="batch", X=False)
    first_b2 = int(np.flatnonzero(adata.obs["batch"].to_numpy() == "b2")[0])
    # one cell alone gets the same code as in the full column
    assert dataset[first_b2].item() == 2
    assert dataset[[first_b2]].tolist() == [2]


@pytest.mark.parametrize("key", ["cell_type", "batch"])
def test_decode_round_trips(key):
    adata = make_adata("csr")
    dataset = AnnDataset(adata, obs_keys=key, X=False)
    rows = [5, 0, 5, 36]
    codes = dataset[rows]
    labels = dataset.decode(key, codes)
    np.testing.assert_array_equal(labels, adata.obs[key].to_numpy()[rows].astype(object))
    assert dataset.decode(key, codes.numpy()).tolist() == labels.tolist()
    assert dataset.decode(key, codes.tolist()).tolist() == labels.tolist()
    encoder = dataset.encoders[key]
    np.testing.assert_array_equal(encoder.encode(labels), codes.numpy())


def test_reusing_encoders_on_another_anndata_gives_the_same_codes():
    first = make_adata("csr", seed=0)
    train = AnnDataset(first, obs_keys=["cell_type", "batch"])
    other = make_adata("dense", n_obs=15, seed=7)
    # another category order and a subset of the labels: codes must follow the labels
    other.obs["cell_type"] = other.obs["cell_type"].cat.reorder_categories(
        ["NK", "unused", "B", "T"]
    )
    other.obs["batch"] = np.where(other.obs["batch"] == "b10", "b2", other.obs["batch"])
    test = AnnDataset(other, obs_keys=["cell_type", "batch"], encoders=train.encoders)
    assert test.encoders == train.encoders
    batch = test[:]
    for key in ("cell_type", "batch"):
        labels = other.obs[key].to_numpy().astype(object)
        np.testing.assert_array_equal(train.decode(key, batch[key]), labels)
        np.testing.assert_array_equal(
            batch[key].numpy(), train.encoders[key].categories.get_indexer(labels)
        )
    # a fresh fit on the other AnnData would have given different codes
    fresh = AnnDataset(other, obs_keys="cell_type", X=False)
    assert not torch.equal(fresh[:], batch["cell_type"])


def test_reusing_only_some_encoders():
    adata = make_adata("csr")
    given = {"batch": CategoryEncoder(["b2", "b1", "b10"])}
    dataset = AnnDataset(adata, obs_keys=["batch", "cell_type"], encoders=given)
    assert dataset.encoders["batch"] is given["batch"]
    assert list(dataset.encoders["cell_type"].categories)[:3] == ["T", "B", "NK"]
    np.testing.assert_array_equal(
        dataset.decode("batch", dataset[:]["batch"]), adata.obs["batch"].to_numpy()
    )


def test_unseen_labels_raise():
    encoder = CategoryEncoder(["a", "b"])
    with pytest.raises(ValueError, match=r"'lab' has 2 values .* never seen: \['z'\]"):
        encoder.encode(pd.Series(["a", "z", "z"]), name="lab")


@pytest.mark.parametrize("kind", ["categorical", "object"])
def test_na_code_gives_minus_one_and_decodes_to_none(kind):
    adata = make_adata("csr")
    key = "cell_type" if kind == "categorical" else "batch"
    values = adata.obs[key].astype(object).to_numpy().copy()
    values[[2, 7]] = None
    adata.obs[key] = pd.Categorical(values) if kind == "categorical" else values
    dataset = AnnDataset(adata, obs_keys=key, na="code", X=False)
    codes = dataset[:]
    assert codes.dtype == torch.int64
    assert np.flatnonzero(codes.numpy() == -1).tolist() == [2, 7]
    assert (codes.numpy() >= -1).all()
    labels = dataset.decode(key, codes)
    assert labels[2] is None and labels[7] is None
    keep = np.ones(N_OBS, dtype=bool)
    keep[[2, 7]] = False
    np.testing.assert_array_equal(labels[keep], values[keep])


def test_encoder_to_dict_from_dict_round_trip():
    adata = make_adata("csr")
    encoders = AnnDataset(adata, obs_keys=["cell_type", "batch"], X=False).encoders
    for encoder in encoders.values():
        state = json.loads(json.dumps(encoder.to_dict()))  # plain python, JSON-safe
        restored = CategoryEncoder.from_dict(state)
        assert restored == encoder
        labels = list(encoder.categories)[::-1]
        np.testing.assert_array_equal(restored.encode(labels), encoder.encode(labels))
        assert pickle.loads(pickle.dumps(encoder)) == encoder
    # restored encoders work as encoders= for a new dataset
    restored = {k: CategoryEncoder.from_dict(e.to_dict()) for k, e in encoders.items()}
    again = AnnDataset(adata, obs_keys=["cell_type", "batch"], X=False, encoders=restored)
    np.testing.assert_array_equal(
        again[:]["cell_type"].numpy(), adata.obs["cell_type"].cat.codes.to_numpy()
    )


def test_integer_categories():
    column = pd.Series(pd.Categorical([30, 10, 20, 10], categories=[30, 20, 10]))
    encoder = CategoryEncoder.fit(column)
    assert encoder.to_dict() == {"categories": [30, 20, 10]}
    assert type(encoder.to_dict()["categories"][0]) is int
    np.testing.assert_array_equal(encoder.encode(column), [0, 2, 1, 2])
    np.testing.assert_array_equal(encoder.decode([2, 0]), [10, 30])


def test_encoder_validation():
    with pytest.raises(ValueError, match="categories must be unique"):
        CategoryEncoder(["a", "b", "a"])
    with pytest.raises(TypeError, match=r"'mix' mixes value types that cannot be ordered"):
        CategoryEncoder.fit(pd.Series([1, "a"], dtype=object), name="mix")
    encoder = CategoryEncoder(["a", "b", "c"])
    with pytest.raises(ValueError, match=r"codes must lie in \[-1, 2\]; got -2\.\.3"):
        encoder.decode([-2, 3])
    assert encoder.decode([]).shape == (0,)
    assert encoder != CategoryEncoder(["c", "b", "a"])
    assert len(encoder) == 3
    assert "3 categories" in repr(encoder)


# --------------------------------------------------------------------------- batch containers


def sparse_example():
    dense = torch.tensor([[0.0, 1.5, 0.0], [0.0, 0.0, 0.0], [2.0, 0.0, -3.0]])
    batch = SparseBatch(
        torch.tensor([0, 1, 1, 3]), torch.tensor([1, 0, 2]), torch.tensor([1.5, 2.0, -3.0]), 3
    )
    return dense, batch


@pytest.mark.filterwarnings("ignore:Sparse:UserWarning")  # torch: sparse CSR is "beta"
def test_sparse_batch_to_dense_and_back():
    dense, batch = sparse_example()
    assert batch.shape == (3, 3)
    assert batch.device == torch.device("cpu")
    assert torch.equal(batch.to_dense(), dense)
    assert torch.equal(batch.to_dense("cpu"), dense)
    assert torch.equal(batch.to_sparse_csr().to_dense(), dense)
    assert torch.equal(batch.to("cpu").to_dense(), dense)


def test_sparse_batch_without_values_and_without_rows():
    empty_rows = SparseBatch(torch.zeros(3, dtype=torch.int64), torch.zeros(0, dtype=torch.int64),
                             torch.zeros(0), 4)  # fmt: skip
    assert torch.equal(empty_rows.to_dense(), torch.zeros(2, 4))
    no_rows = SparseBatch(torch.zeros(1, dtype=torch.int64), torch.zeros(0, dtype=torch.int64),
                          torch.zeros(0, dtype=torch.float64), 4)  # fmt: skip
    out = no_rows.to_dense()
    assert out.shape == (0, 4) and out.dtype == torch.float64


def test_densify_walks_dicts_lists_and_tuples():
    dense, batch = sparse_example()
    label = torch.tensor([1, 2, 3])
    nested = {"X": batch, "y": label, "pair": (batch, label), "items": [batch], "n": 3}
    out = ta.densify(nested)
    assert torch.equal(out["X"], dense)
    assert out["y"] is label
    assert isinstance(out["pair"], tuple) and torch.equal(out["pair"][0], dense)
    assert isinstance(out["items"], list) and torch.equal(out["items"][0], dense)
    assert out["n"] == 3
    assert torch.equal(ta.densify(batch), dense)
    moved = ta.densify({"y": label}, device="cpu")
    assert torch.equal(moved["y"], label)


def test_collate_is_the_identity():
    _, batch = sparse_example()
    payload = {"X": batch}
    assert ta.collate(payload) is payload


def test_sparse_batch_pickles():
    _, batch = sparse_example()
    clone = pickle.loads(pickle.dumps(batch))
    assert isinstance(clone, SparseBatch) and clone.n_cols == 3
    assert torch.equal(clone.to_dense(), batch.to_dense())
