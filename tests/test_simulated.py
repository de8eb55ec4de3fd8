"""The embedded simulated time course: schema, determinism, matrices and ground truth."""

from __future__ import annotations

import time

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from torch_adata.datasets import simulated

N_CELLS, N_GENES = 2_000, 300
OBS_COLUMNS = [
    "Library",
    "Cell barcode",
    "Time point",
    "Starting population",
    "Cell type annotation",
    "Well",
    "SPRING-x",
    "SPRING-y",
    "clone_id",
    "fate_bias_oracle",
    "clone_fate_bias",
]


@pytest.fixture(scope="module")
def adata() -> ad.AnnData:
    return simulated(n_cells=N_CELLS, n_genes=N_GENES, seed=0)


def _assert_same(a: ad.AnnData, b: ad.AnnData) -> None:
    pd.testing.assert_frame_equal(a.obs, b.obs)
    pd.testing.assert_frame_equal(a.var, b.var)
    for x, y in [(a.X, b.X), (a.layers["counts"], b.layers["counts"])]:
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x.indptr, y.indptr)
        np.testing.assert_array_equal(x.indices, y.indices)
        np.testing.assert_array_equal(x.data, y.data)
    assert a.obsm.keys() == b.obsm.keys()
    for key in a.obsm:
        x, y = a.obsm[key], b.obsm[key]
        assert type(x) is type(y)
        np.testing.assert_array_equal(
            x.toarray() if sp.issparse(x) else x, np.asarray(y.toarray() if sp.issparse(y) else y)
        )


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_data(adata):
    _assert_same(adata, simulated(n_cells=N_CELLS, n_genes=N_GENES, seed=0))


def test_different_seed_different_data(adata):
    other = simulated(n_cells=N_CELLS, n_genes=N_GENES, seed=1)
    assert other.shape == adata.shape
    assert not np.allclose(other.obsm["X_latent"], adata.obsm["X_latent"])
    assert not np.array_equal(other.obs["Cell barcode"], adata.obs["Cell barcode"])
    assert (other.X != adata.X).nnz > 0


def test_gene_count_leaves_cells_unchanged(adata):
    """Separate random streams: the genes do not change the lineages (documented)."""
    fewer = simulated(n_cells=N_CELLS, n_genes=40, seed=0)
    pd.testing.assert_frame_equal(fewer.obs, adata.obs)
    np.testing.assert_array_equal(fewer.obsm["X_latent"], adata.obsm["X_latent"])


def test_latent_dimension_leaves_fates_unchanged(adata):
    small = simulated(n_cells=N_CELLS, n_genes=N_GENES, n_latent=2, seed=0)
    assert small.obsm["X_latent"].shape == (N_CELLS, 2)
    np.testing.assert_array_equal(small.obsm["X_latent"], adata.obsm["X_latent"][:, :2])
    for column in ["Cell type annotation", "fate_bias_oracle", "clone_id", "Well"]:
        pd.testing.assert_series_equal(small.obs[column], adata.obs[column])


# --------------------------------------------------------------------------- schema


def test_obs_schema(adata):
    obs = adata.obs
    assert list(obs.columns) == OBS_COLUMNS
    assert obs.index.is_unique and all(isinstance(i, str) for i in obs.index)
    assert obs["Cell barcode"].is_unique
    assert all(isinstance(b, str) and len(b) == 16 for b in obs["Cell barcode"])
    for column in ["Library", "Starting population", "Cell type annotation"]:
        assert isinstance(obs[column].dtype, pd.CategoricalDtype), column
    assert all(isinstance(c, str) for c in obs["Library"].cat.categories)
    assert list(obs["Cell type annotation"].cat.categories) == ["undiff", "Neutrophil", "Monocyte"]
    assert set(obs["Starting population"].cat.categories) == {"Lin-Kit+Sca1+", "Lin-Kit+Sca1-"}
    for column in ["Time point", "Well", "clone_id"]:
        assert obs[column].dtype == np.int64, column
    for column in ["SPRING-x", "SPRING-y", "fate_bias_oracle", "clone_fate_bias"]:
        assert obs[column].dtype == np.float64, column
    assert adata.var_names.is_unique
    assert adata.var_names[0] == "Gene0001" and adata.var_names[-1] == f"Gene{N_GENES:04d}"


def test_time_points_follow_larry_proportions(adata):
    counts = adata.obs["Time point"].value_counts().sort_index()
    assert counts.index.tolist() == [2, 4, 6]
    assert counts.tolist() == [440, 740, 820]  # 22 / 37 / 41 % of 2,000
    assert adata.uns["simulation"]["cells_per_time_point"] == [440, 740, 820]
    # rows are ordered by day
    assert np.all(np.diff(adata.obs["Time point"].to_numpy()) >= 0)


def test_well_rule(adata):
    obs = adata.obs
    early = obs["Time point"] == 2
    assert (obs.loc[early, "Well"] == 0).all()
    assert set(obs.loc[~early, "Well"]) == {1, 2}
    later = obs[~early & (obs["clone_id"] >= 0)]
    assert (later.groupby("clone_id")["Well"].nunique() == 1).all()
    # both wells hold a sizeable share of the clones (they are the held-out split)
    share = later.groupby("clone_id")["Well"].first().value_counts(normalize=True)
    assert share.min() > 0.3


def test_clone_less_cells_and_clone_coverage(adata):
    obs = adata.obs
    clone_less = (obs["clone_id"] == -1).mean()
    assert 0.08 < clone_less < 0.25
    cloned = obs[obs["clone_id"] >= 0]
    spans = cloned.groupby("clone_id")["Time point"].agg(lambda t: (t == 2).any() and (t > 2).any())
    assert spans.mean() > 0.7, "most clones need cells on day 2 and on a later day"


def test_cell_types_follow_the_latent_state(adata):
    obs, latent = adata.obs, adata.obsm["X_latent"]
    margin = adata.uns["simulation"]["fate_margin"]
    x0, x1 = latent[:, 0], latent[:, 1]
    label = obs["Cell type annotation"].to_numpy()
    expected = np.where(
        (x0 > 0) & (x1 > margin),
        "Neutrophil",
        np.where((x0 > 0) & (x1 < -margin), "Monocyte", "undiff"),
    )
    np.testing.assert_array_equal(label, expected)
    undiff = (obs["Cell type annotation"] == "undiff").groupby(obs["Time point"]).mean()
    assert undiff[2] > 0.8, "day-2 cells are mostly undifferentiated"
    assert undiff[2] > undiff[4] > undiff[6]
    late = obs.loc[obs["Time point"] == 6, "Cell type annotation"].value_counts(normalize=True)
    assert late["Neutrophil"] > 0.25 and late["Monocyte"] > 0.25


def test_spring_is_a_view_of_the_latent_state(adata):
    latent = adata.obsm["X_latent"].astype(np.float64)
    spring = adata.obs[["SPRING-x", "SPRING-y"]].to_numpy()
    np.testing.assert_allclose(adata.obsm["X_spring"], spring, rtol=1e-6, atol=1e-3)
    for dim in range(2):
        assert np.corrcoef(spring[:, dim], latent[:, dim])[0, 1] > 0.95


def test_uns_records_parameters(adata):
    params = adata.uns["simulation"]
    assert params["n_cells"] == N_CELLS and params["n_genes"] == N_GENES
    assert params["seed"] == 0 and params["diffusion"] == 0.001 and params["dt"] == 0.01
    assert isinstance(params["n_founders"], int) and params["n_founders"] > 0
    assert params["mean_counts"] == 0.5 * N_GENES  # the default, resolved
    assert params["n_clones"] == adata.obsm["X_clone"].shape[1]


# --------------------------------------------------------------------------- matrices


def test_x_is_normalised_csr_and_counts_are_integers(adata):
    X, counts = adata.X, adata.layers["counts"]
    assert isinstance(X, sp.csr_matrix) and X.dtype == np.float32
    assert isinstance(counts, sp.csr_matrix) and counts.dtype == np.float32
    assert X.shape == counts.shape == (N_CELLS, N_GENES)
    np.testing.assert_array_equal(counts.data, np.round(counts.data))
    assert counts.data.min() >= 1
    np.testing.assert_array_equal(X.indptr, counts.indptr)
    np.testing.assert_array_equal(X.indices, counts.indices)
    totals = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    target = adata.uns["simulation"]["target_sum"]
    assert target == pytest.approx(totals.mean(), rel=1e-6)
    np.testing.assert_allclose(
        np.asarray(X.sum(axis=1), dtype=np.float64).ravel(), target, rtol=1e-5
    )
    scale = np.repeat(target / totals, np.diff(counts.indptr))
    np.testing.assert_allclose(X.data, counts.data * scale, rtol=1e-6)
    density = X.nnz / (X.shape[0] * X.shape[1])
    assert 0.05 < density < 0.25


def test_expression_separates_cell_types(adata):
    """The gene programs make the fates differ in log-normalised expression."""
    logx = np.log1p(adata.X.toarray().astype(np.float64))
    label = adata.obs["Cell type annotation"].to_numpy()
    neu, mono = logx[label == "Neutrophil"].mean(axis=0), logx[label == "Monocyte"].mean(axis=0)
    program = adata.var["program"].to_numpy()
    assert (neu - mono)[program == "neutrophil"].mean() > 0.5
    assert (mono - neu)[program == "monocyte"].mean() > 0.5
    # the first principal component of the centred log data follows the fate axis
    centred = logx - logx.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    pc1 = centred @ vt[0]
    assert abs(np.corrcoef(pc1, adata.obsm["X_latent"][:, 1])[0, 1]) > 0.8


def test_x_clone_matches_clone_id(adata):
    clone_id = adata.obs["clone_id"].to_numpy()
    x_clone = adata.obsm["X_clone"]
    assert isinstance(x_clone, sp.csr_matrix) and x_clone.dtype == np.float32
    assert x_clone.shape == (N_CELLS, clone_id.max() + 1)
    np.testing.assert_array_equal(x_clone.data, 1.0)
    per_row = np.diff(x_clone.indptr)
    np.testing.assert_array_equal(per_row, (clone_id >= 0).astype(int))
    rows = np.flatnonzero(clone_id >= 0)
    np.testing.assert_array_equal(x_clone.indices, clone_id[rows])
    assert (np.asarray(x_clone.sum(axis=0)).ravel() > 0).all(), "every clone column has a cell"


def test_clone_fate_bias_recomputed_from_clone_table(adata):
    obs = adata.obs
    later = obs[(obs["clone_id"] >= 0) & (obs["Time point"] > 2)]
    neu = (later["Cell type annotation"] == "Neutrophil").groupby(later["clone_id"]).sum()
    mono = (later["Cell type annotation"] == "Monocyte").groupby(later["clone_id"]).sum()
    committed = neu + mono
    per_clone = (neu / committed)[committed > 0]
    expected = obs["clone_id"].map(per_clone).astype(np.float64)
    np.testing.assert_allclose(obs["clone_fate_bias"], expected, equal_nan=True)
    assert obs.loc[obs["clone_id"] == -1, "clone_fate_bias"].isna().all()
    assert obs["clone_fate_bias"].notna().mean() > 0.5


# --------------------------------------------------------------------------- the oracle


def test_oracle_defined_exactly_for_day_2(adata):
    obs = adata.obs
    early = obs["Time point"] == 2
    oracle = obs.loc[early, "fate_bias_oracle"]
    assert oracle.notna().all() and oracle.between(0, 1).all()
    assert obs.loc[~early, "fate_bias_oracle"].isna().all()
    assert oracle.std() > 0.2, "day-2 cells are already biased"


# Measured at n_cells=2000 over seeds 0-19: r from 0.61 to 0.84 (seeds 0, 1, 2: 0.79, 0.66, 0.73).
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_oracle_predicts_clonal_fate(seed):
    obs = simulated(n_cells=N_CELLS, n_genes=20, seed=seed).obs
    both = (obs["Time point"] == 2) & obs["clone_fate_bias"].notna()
    assert both.sum() > 200
    r = np.corrcoef(obs.loc[both, "fate_bias_oracle"], obs.loc[both, "clone_fate_bias"])[0, 1]
    assert r > 0.45


def test_oracle_follows_x1_at_day_2(adata):
    early = (adata.obs["Time point"] == 2).to_numpy()
    oracle = adata.obs["fate_bias_oracle"].to_numpy()[early]
    x1 = adata.obsm["X_latent"][early, 1]
    assert np.corrcoef(oracle, x1)[0, 1] > 0.6  # measured 0.77-0.86 over seeds 0-19
    assert oracle[x1 > 0.1].mean() > 0.7 and oracle[x1 < -0.1].mean() < 0.3


# --------------------------------------------------------------------------- files and sizes


def test_h5ad_round_trip(adata, tmp_path):
    path = tmp_path / "simulated.h5ad"
    adata.write_h5ad(path)
    back = ad.read_h5ad(path)
    _assert_same(adata, back)
    params, read = adata.uns["simulation"], back.uns["simulation"]
    assert params.keys() == read.keys()
    for key, value in params.items():
        np.testing.assert_array_equal(np.asarray(read[key]), np.asarray(value), err_msg=key)


def test_small_and_unusual_sizes():
    tiny = simulated(n_cells=10, n_genes=3, n_latent=2, seed=5)
    assert tiny.shape == (10, 3)
    assert set(tiny.obs["Time point"]) == {2, 4, 6}
    # many fast divisions: the living population is thinned at passaging
    fast = simulated(n_cells=300, n_genes=10, division_interval=0.25, seed=5)
    assert fast.n_obs == 300
    # rare divisions: more founders are needed, and Poisson counts
    slow = simulated(n_cells=300, n_genes=10, division_interval=3.0, dispersion=0.0, seed=5)
    assert slow.uns["simulation"]["n_founders"] > 300 * 0.22


@pytest.mark.slow
def test_builds_10k_cells(record_property):
    start = time.perf_counter()
    big = simulated()
    seconds = time.perf_counter() - start
    record_property("seconds_10k", seconds)
    print(f"simulated() with 10,000 cells x 2,000 genes took {seconds:.2f} s")
    assert big.shape == (10_000, 2_000)
    assert big.obsm["X_latent"].shape == (10_000, 10)


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_cells": 0}, r"n_cells must be an integer >= 10, got 0; pass e\.g\. n_cells=2000"),
        ({"n_cells": 100.5}, "n_cells must be an integer"),
        ({"n_cells": True}, "n_cells must be an integer"),
        ({"n_genes": 0}, "n_genes must be an integer >= 1"),
        ({"n_latent": 1}, "n_latent must be an integer >= 2"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"n_founders": 0}, "n_founders must be an integer >= 1"),
        ({"n_founders": 2}, "raise n_founders"),
        ({"day_proportions": (0.5, 0.5)}, "day_proportions must be three positive numbers"),
        ({"day_proportions": (0.2, 0.0, 0.8)}, "day_proportions must be three positive numbers"),
        ({"clone_detection": 0.0}, r"clone_detection must be a finite number in \(0, 1\]"),
        ({"clone_detection": 1.5}, "clone_detection"),
        ({"branch_day": 6}, "branch_day"),
        ({"diffusion": -0.1}, r"diffusion must be a finite number in \[0, inf\]"),
        ({"dispersion": float("nan")}, "dispersion"),
        ({"dt": 0.5}, "dt must be at most 0.1"),
        ({"speed": 0}, "speed must be a finite number"),
        ({"n_oracle": 0}, "n_oracle must be an integer >= 1"),
        ({"mean_counts": 0}, r"mean_counts must be a finite number in \(0, inf\]"),
    ],
)
def test_bad_arguments(kwargs, match):
    arguments = {"n_cells": 200, "n_genes": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        simulated(**arguments)
