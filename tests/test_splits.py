"""Splits: fractions, stratified, held out, explicit; disjoint, complete, seeded."""

import numpy as np
import pandas as pd
import pytest

from torch_adata.splits import make_splits


@pytest.fixture
def obs():
    rng = np.random.default_rng(0)
    n = 1000
    return pd.DataFrame(
        {
            "Cell type annotation": pd.Categorical(
                rng.choice(["undiff", "Neutrophil", "Monocyte"], n, p=[0.6, 0.3, 0.1])
            ),
            "Time point": rng.choice([2, 4, 6], n),
            "Well": rng.choice([0, 1, 2], n),
        },
        index=[f"cell{i}" for i in range(n)],
    )


def _check_partition(splits, n):
    parts = [splits[k] for k in ("train", "val", "test")]
    union = np.concatenate(parts)
    assert len(union) == len(np.unique(union)), "splits overlap"
    assert np.array_equal(np.sort(union), np.arange(n)), "splits do not cover every cell"
    assert np.array_equal(splits["predict"], np.arange(n))
    for p in parts:
        assert np.all(np.diff(p) > 0), "split rows are sorted"


def test_fractions_sizes_and_partition(obs):
    splits = make_splits(obs, val_size=0.2, test_size=0.1, seed=1)
    _check_partition(splits, len(obs))
    assert (len(splits["val"]), len(splits["test"]), len(splits["train"])) == (200, 100, 700)


def test_counts_instead_of_fractions(obs):
    splits = make_splits(obs, val_size=50, test_size=0, seed=1)
    assert len(splits["val"]) == 50 and len(splits["test"]) == 0
    _check_partition(splits, len(obs))


def test_seeded_same_on_every_rank_and_different_across_seeds(obs):
    # Two "ranks" compute the split independently from the same arguments.
    a = make_splits(obs, seed=7)
    b = make_splits(obs.copy(), seed=7)
    c = make_splits(obs, seed=8)
    for k in a:
        assert np.array_equal(a[k], b[k])
    assert not np.array_equal(a["val"], c["val"])


def test_stratified_keeps_class_proportions(obs):
    splits = make_splits(obs, val_size=0.2, test_size=0.2, stratify_key="Cell type annotation")
    _check_partition(splits, len(obs))
    labels = obs["Cell type annotation"].to_numpy()
    overall = pd.Series(labels).value_counts(normalize=True)
    for name in ("train", "val", "test"):
        share = pd.Series(labels[splits[name]]).value_counts(normalize=True)
        assert np.allclose(share[overall.index], overall, atol=0.02), name


def test_holdout_sends_whole_groups_to_test(obs):
    splits = make_splits(obs, holdout={"Time point": [4]}, seed=0)
    _check_partition(splits, len(obs))
    t = obs["Time point"].to_numpy()
    assert np.all(t[splits["train"]] != 4) and np.all(t[splits["val"]] != 4)
    assert np.all(np.isin(np.flatnonzero(t == 4), splits["test"]))


def test_holdout_to_val_and_several_columns(obs):
    splits = make_splits(obs, holdout={"Well": 2, "Time point": [6]}, holdout_split="val")
    _check_partition(splits, len(obs))
    held = (obs["Well"].to_numpy() == 2) | (obs["Time point"].to_numpy() == 6)
    assert np.all(~held[splits["train"]]) and np.all(~held[splits["test"]])
    assert np.all(np.isin(np.flatnonzero(held), splits["val"]))


def test_explicit_indices(obs):
    splits = make_splits(obs, indices={"train": [5, 1, 3], "val": [0], "test": [9, 8]})
    assert splits["train"].tolist() == [1, 3, 5]
    assert splits["val"].tolist() == [0]
    assert splits["test"].tolist() == [8, 9]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"holdout": {"Donor": [1]}}, KeyError, "holdout column 'Donor' is not in obs"),
        ({"holdout": {"Time point": [3]}}, ValueError, r"holdout values \[3\].*match no cell"),
        ({"stratify_key": "nope"}, KeyError, "stratify_key 'nope' is not in obs"),
        ({"val_size": 1.5}, ValueError, "must be a fraction in"),
        ({"val_size": "a"}, TypeError, "must be a fraction"),
        ({"val_size": 600, "test_size": 600}, ValueError, "exceed the 1000 cells"),
        ({"indices": {"train": [1, 2], "val": [2]}}, ValueError, "share 1 cells"),
        ({"indices": {"train": [1, 5000]}}, IndexError, "outside"),
        ({"indices": {"train": [0.5]}}, TypeError, "integer row positions"),
        ({"indices": {"training": [1]}}, ValueError, "unknown splits"),
        ({"holdout": {"Time point": [2, 4, 6]}}, ValueError, "train split is empty"),
        ({"holdout_split": "train", "holdout": {"Well": 1}}, ValueError, "holdout_split"),
    ],
)
def test_bad_split_arguments(obs, kwargs, error, match):
    with pytest.raises(error, match=match):
        make_splits(obs, **kwargs)


def test_no_cells():
    with pytest.raises(ValueError, match="no cells"):
        make_splits(pd.DataFrame(index=[]))
