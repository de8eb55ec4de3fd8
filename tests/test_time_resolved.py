"""TimeResolvedAnnDataset on the LARRY-shaped simulated time course."""

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader

from torch_adata import TimeResolvedAnnDataset, collate
from torch_adata.datasets import simulated


@pytest.fixture(scope="module")
def larry_like():
    return simulated(n_cells=1500, n_genes=60, seed=0)


def _loader(ds, sampler):
    return DataLoader(ds, sampler=sampler, batch_size=None, collate_fn=collate)


def test_time_points_and_groups(larry_like):
    ds = TimeResolvedAnnDataset(larry_like, time_key="Time point")
    assert ds.time_points.tolist() == [2.0, 4.0, 6.0]
    days = larry_like.obs["Time point"].to_numpy()
    for t, rows in ds.indices_by_time.items():
        assert np.array_equal(rows, np.flatnonzero(days == t))
    batch = ds[[0, 5, 9]]  # documented: the cells with their fields and time values
    assert set(batch) == {"X", "t", "t_eval"}
    np.testing.assert_array_equal(batch["t"].numpy(), days[[0, 5, 9]].astype(np.float32))


def test_population_batches_cover_without_repeats(larry_like):
    ds = TimeResolvedAnnDataset(
        larry_like, time_key="Time point", X=False, obsm_keys=["X_latent"], return_index=True
    )
    n = 50
    sampler = ds.batch_sampler(cells_per_time=n, seed=4)
    days = larry_like.obs["Time point"].to_numpy()
    seen = []
    for batch in _loader(ds, sampler):
        rows = batch["index"].numpy()
        assert batch["X_latent"].shape == (3 * n, larry_like.obsm["X_latent"].shape[1])
        for k, t in enumerate((2, 4, 6)):
            assert np.all(days[rows[k * n : (k + 1) * n]] == t)
        np.testing.assert_array_equal(batch["X_latent"].numpy(), larry_like.obsm["X_latent"][rows])
        seen.append(rows)
    seen = np.concatenate(seen)
    assert len(seen) == len(np.unique(seen))
    smallest = np.bincount(days)[[2, 4, 6]].min()
    assert len(seen) == (smallest // n) * n * 3
    again = np.concatenate(
        [b["index"].numpy() for b in _loader(ds, ds.batch_sampler(cells_per_time=n, seed=4))]
    )
    assert np.array_equal(seen, again), "same seed, same draw"


def test_population_ranks_are_disjoint(larry_like):
    ds = TimeResolvedAnnDataset(larry_like, time_key="Time point", return_index=True)
    shares = [
        np.concatenate(list(ds.batch_sampler(cells_per_time=20, rank=r, num_replicas=2)))
        for r in (0, 1)
    ]
    assert len(shares[0]) == len(shares[1]) > 0
    assert not np.intersect1d(shares[0], shares[1]).size


def test_initial_cells_mode(larry_like):
    ds = TimeResolvedAnnDataset(
        larry_like, "Time point", mode="initial", X=False, obsm_keys=["X_latent"]
    )
    batch = next(iter(_loader(ds, ds.batch_sampler(batch_size=64))))
    assert torch.all(batch["t"] == 2.0)
    assert batch["t_eval"].tolist() == [2.0, 4.0, 6.0]
    later = TimeResolvedAnnDataset(
        larry_like, "Time point", mode="initial", start_time=4, X=False, obsm_keys=["X_latent"]
    )
    batch = next(iter(_loader(later, later.batch_sampler(batch_size=16))))
    assert torch.all(batch["t"] == 4.0) and batch["t_eval"].tolist() == [4.0, 6.0]


@pytest.mark.parametrize("clone_key", ["clone_id", "X_clone"])
def test_lineage_batches_group_whole_clones(larry_like, clone_key):
    with pytest.warns(UserWarning, match="single time point"):
        ds = TimeResolvedAnnDataset(
            larry_like, "Time point", mode="lineage", clone_key=clone_key, return_index=True
        )
    truth = larry_like.obs["clone_id"].to_numpy()
    sampler = ds.batch_sampler(clones_per_batch=8, seed=1)
    seen = []
    for batch in _loader(ds, sampler):
        rows, clones = batch["index"].numpy(), batch["clone"].numpy()
        np.testing.assert_array_equal(clones, truth[rows])  # each cell belongs to its clone
        for c in np.unique(clones):
            assert (clones == c).sum() == (truth == c).sum()  # whole clone
        seen.extend(np.unique(clones).tolist())
    assert len(seen) == len(set(seen))


def test_single_time_clones_reported_and_dropped(larry_like):
    with pytest.warns(UserWarning, match="seen at a single time point") as record:
        undecided = TimeResolvedAnnDataset(larry_like, "Time point", clone_key="clone_id")
    single = undecided.single_time_clones
    assert len(single) > 0 and str(len(single)) in str(record[0].message)
    assert (undecided.clone_table.loc[single, "n_time_points"] == 1).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the user chose: no warning either way
        dropped = TimeResolvedAnnDataset(
            larry_like, "Time point", clone_key="clone_id", drop_single_time_clones=True
        )
        kept = TimeResolvedAnnDataset(
            larry_like, "Time point", clone_key="clone_id", drop_single_time_clones=False
        )
    np.testing.assert_array_equal(dropped.single_time_clones, single)  # the report stays
    assert (dropped.clone_table["n_time_points"] >= 2).all()
    assert not np.isin(dropped.clone_ids, single).any()
    np.testing.assert_array_equal(kept.clone_ids, undecided.clone_ids)
    assert np.isin(kept.clone_ids, single).any()


@pytest.mark.parametrize("dataset_mode", ["populations", "initial", "lineage"])
def test_batch_keys_do_not_depend_on_the_dataset_mode(larry_like, dataset_mode):
    ds = TimeResolvedAnnDataset(
        larry_like,
        "Time point",
        mode=dataset_mode,
        clone_key="clone_id",
        drop_single_time_clones=True,
        X=False,
        obsm_keys=["X_latent"],
    )
    batches = {
        mode: next(iter(_loader(ds, ds.batch_sampler(mode=mode, batch_size=32, seed=0))))
        for mode in ("populations", "initial", "lineage")
    }
    for mode, batch in batches.items():
        assert set(batch) == {"X_latent", "t", "t_eval", "clone"}, mode
        assert batch["t_eval"].tolist() == [2.0, 4.0, 6.0], mode
    assert torch.all(batches["initial"]["t"] == 2.0)
    assert set(batches["populations"]["t"].tolist()) == {2.0, 4.0, 6.0}
    batches["initial"]["t_eval"][0] = -1.0  # a batch owns its tensors
    assert ds[[0]]["t_eval"][0] == 2.0


def test_gather_checks_its_rows(larry_like):
    ds = TimeResolvedAnnDataset(larry_like, "Time point", X=False, obsm_keys=["X_latent"])
    n = len(ds)
    with pytest.raises(IndexError, match=rf"Index {n} is out of range for a dataset of {n}"):
        ds.gather(np.array([0, n]))
    with pytest.raises(TypeError, match="Indices must be integers"):
        ds.gather(np.array([0.5]))
    assert ds.gather([n - 1])["t"].tolist() == [float(larry_like.obs["Time point"].iloc[-1])]


def test_backed_equals_in_memory(larry_like, tmp_path):
    path = tmp_path / "sim.h5ad"
    larry_like.write_h5ad(path)
    batches = []
    for source in (larry_like, str(path), ad.read_h5ad(path, backed="r")):
        ds = TimeResolvedAnnDataset(
            source, "Time point", obs_keys=["Cell type annotation"], obsm_keys=["X_clone"]
        )
        batches.append(next(iter(_loader(ds, ds.batch_sampler(cells_per_time=30, seed=2)))))
    for other in batches[1:]:
        for key in batches[0]:
            assert torch.equal(batches[0][key], other[key]), key


def test_time_column_kinds(larry_like):
    a = larry_like[::5].copy()
    a.obs["day"] = a.obs["Time point"].astype(str)  # strings that parse as numbers
    a.obs["stage"] = pd.Categorical(
        a.obs["Time point"].map({2: "early", 4: "mid", 6: "late"}),
        categories=["early", "mid", "late"],
        ordered=True,
    )
    assert TimeResolvedAnnDataset(a, "day").time_points.tolist() == [2.0, 4.0, 6.0]
    ds = TimeResolvedAnnDataset(a, "stage")
    assert ds.time_points.tolist() == [0.0, 1.0, 2.0]  # category order is the time


@pytest.mark.parametrize(
    ("mutate", "kwargs", "error", "match"),
    [
        (None, {"time_key": "Day"}, KeyError, "Unknown time_key 'Day'"),
        ("nan", {}, ValueError, r"has 3 missing \(NaN\) time values"),
        ("one", {}, ValueError, "single time point"),
        ("words", {}, TypeError, "not times"),
        (None, {"clones": sp.csr_matrix(np.ones((7, 2)))}, ValueError, "has 7 rows but"),
        ("multi", {"clone_key": "X_clone"}, ValueError, "belong to several clones"),
        (None, {"clone_key": "nope"}, KeyError, "neither an obs column"),
        (None, {"mode": "lineage"}, ValueError, "needs a clone assignment"),
        (None, {"start_time": 3}, ValueError, "start_time=3 is not a time point"),
    ],
)
def test_bad_inputs(larry_like, mutate, kwargs, error, match):
    a = larry_like[::7].copy()
    if mutate == "nan":
        a.obs["Time point"] = a.obs["Time point"].astype(float)
        a.obs.iloc[:3, a.obs.columns.get_loc("Time point")] = np.nan
    elif mutate == "one":
        a.obs["Time point"] = 2
    elif mutate == "words":
        a.obs["Time point"] = "day two"
    elif mutate == "multi":
        clones = a.obsm["X_clone"].tolil()
        clones[0, :2] = 1
        a.obsm["X_clone"] = clones.tocsr()
    with pytest.raises(error, match=match):
        TimeResolvedAnnDataset(a, **{"time_key": "Time point", **kwargs})


def test_multi_clone_policies(larry_like):
    a = larry_like[::7].copy()
    clones = a.obsm["X_clone"].tolil()
    clones[0, :2] = 1
    a.obsm["X_clone"] = clones.tocsr()
    with pytest.warns(UserWarning):
        dropped = TimeResolvedAnnDataset(a, "Time point", clone_key="X_clone", multi_clone="drop")
        first = TimeResolvedAnnDataset(a, "Time point", clone_key="X_clone", multi_clone="first")
    assert dropped.clone_ids[0] == -1 and first.clone_ids[0] == 0


def test_time_key_is_required(larry_like):
    # no column name is assumed: a time course of one's own must say where its times are
    with pytest.raises(TypeError, match="time_key"):
        TimeResolvedAnnDataset(larry_like)
