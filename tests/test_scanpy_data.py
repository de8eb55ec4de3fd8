"""Data processed the usual scanpy way (issue 19), on scanpy's bundled real data.

``pbmc68k_reduced``: scaled ``X`` (negative values), log-normalised data in ``.raw``,
``bulk_labels``, ``X_pca``. Every row of the issue's table is a test here: inputs a model
cannot use fail early with a message naming the matrix that fits.
"""

from __future__ import annotations

import warnings

import anndata as ad
import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from conftest import load_example

import torch_adata as ta
from torch_adata import AnnDataset
from torch_adata.datasets import preprocess

pytestmark = pytest.mark.filterwarnings("ignore:Observation names are not unique")


@pytest.fixture(scope="session")
def pbmc_file(tmp_path_factory) -> str:
    import scanpy as sc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata = sc.datasets.pbmc68k_reduced()
    path = tmp_path_factory.mktemp("scanpy") / "pbmc68k_reduced.h5ad"
    adata.write_h5ad(path)
    return str(path)


@pytest.fixture
def pbmc(pbmc_file) -> ad.AnnData:
    return ad.read_h5ad(pbmc_file)


def raw_rows(adata: ad.AnnData, rows) -> np.ndarray:
    matrix = adata.raw.X
    return (matrix[rows].toarray() if sp.issparse(matrix) else matrix[rows]).astype(np.float32)


def trainer(tmp_path, max_epochs: int = 1) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )


# --------------------------------------------------------------------------- counts checks


def test_classifier_on_scaled_x_fails_before_training_and_names_raw(pbmc, tmp_path):
    classifier = load_example("classifier")
    dm = ta.AnnDataModule(pbmc, fields=ta.Fields(obs_keys=["bulk_labels"]), batch_size=128)
    model = classifier.CellTypeClassifier(label_key="bulk_labels")
    with pytest.raises(
        ValueError,
        match=r"CellTypeClassifier \(log1p of its input\) needs non-negative values.*adata\.X "
        r"has negative values \(min -2\.03\).*These hold .*: use_raw=True",
    ):
        trainer(tmp_path).fit(model, datamodule=dm)
    # the advice works: the log-normalised data of .raw train with a finite loss
    dm = ta.AnnDataModule(
        pbmc, fields=ta.Fields(obs_keys=["bulk_labels"], layer="raw"), batch_size=128
    )
    fit = trainer(tmp_path)
    fit.fit(classifier.CellTypeClassifier(label_key="bulk_labels"), datamodule=dm)
    assert np.isfinite(float(fit.callback_metrics["train_loss"]))


def test_classifier_label_key_that_is_not_batched_lists_the_columns(pbmc, tmp_path):
    classifier = load_example("classifier")
    dm = ta.AnnDataModule(pbmc, fields=ta.Fields(obs_keys=["bulk_labels"], layer="raw"))
    with pytest.raises(
        ValueError,
        match=r"label_key 'cell_type' is not a categorical obs field.*\['bulk_labels'\].*"
        r"obs columns: \[.*'louvain'\]",
    ):
        trainer(tmp_path).fit(classifier.CellTypeClassifier(label_key="cell_type"), datamodule=dm)


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({}, r"adata\.X has negative values"),
        ({"layer": "raw"}, r"adata\.raw\.X has non-integer values \(e\.g\. [\d.]+; max 6\.49\)"),
    ],
    ids=["scaled_X", "log_normalised_raw"],
)
def test_vae_needs_counts_and_says_so(pbmc, tmp_path, kwargs, problem):
    embedding = load_example("embedding")
    dm = ta.AnnDataModule(pbmc, fields=ta.Fields(**kwargs), batch_size=128)
    with pytest.raises(
        ValueError,
        match=r"CountVAE \(a count model\) needs non-negative integer counts, but "
        + problem
        + r".*None of the AnnData's other matrices .*layers\['counts'\] = adata\.X\.copy\(\)",
    ):
        trainer(tmp_path).fit(embedding.CountVAE(), datamodule=dm)


def test_vae_check_suggests_a_counts_layer(pbmc):
    counts = pbmc.raw.to_adata()
    counts.layers["counts"] = sp.csr_matrix(np.round(np.expm1(counts.X.toarray())))
    with pytest.raises(ValueError, match=r"These hold non-negative integer counts: layer='counts'"):
        AnnDataset(counts).check_counts(needed_by="CountVAE")
    AnnDataset(counts, layer="counts").check_counts(needed_by="CountVAE")  # passes


def test_preprocess_on_scaled_data_names_raw_instead_of_a_scikit_learn_nan(pbmc):
    match = (
        r"preprocess\(\) .*needs non-negative values .*adata\.X has negative values.*"
        r"preprocess\(adata\.raw\.to_adata\(\)\).*log1p=False"
    )
    with pytest.raises(ValueError, match=match):
        preprocess(pbmc, n_pcs=20)
    with pytest.raises(ValueError, match=match):
        ta.AnnDataModule(pbmc, preprocess={"n_pcs": 20}).setup("fit")
    done = preprocess(pbmc.raw.to_adata(), n_pcs=20)
    assert done.obsm["X_pca"].shape == (700, 20) and np.isfinite(done.obsm["X_pca"]).all()


def test_check_counts_on_tensors_and_sparse_batches():
    ta.check_counts(torch.tensor([[0.0, 3.0], [1.0, 0.0]]))
    with pytest.raises(ValueError, match=r"has 1 NaN or infinite values"):
        ta.check_counts(torch.tensor([[0.0, float("nan")]]), integer=False)
    with pytest.raises(ValueError, match=r"the data has non-integer values \(e\.g\. 0\.5"):
        ta.check_counts(sp.csr_matrix(np.array([[0.0, 0.5]])))


# --------------------------------------------------------------------------- adata.raw


@pytest.mark.parametrize("how", ["memory", "path", "path_loaded", "backed", "view"])
@pytest.mark.parametrize("kwargs", [{"use_raw": True}, {"layer": "raw"}])
def test_raw_is_batched_with_its_own_genes(pbmc, pbmc_file, how, kwargs):
    source = {
        "memory": pbmc,
        "path": pbmc_file,
        "path_loaded": pbmc_file,
        "backed": ad.read_h5ad(pbmc_file, backed="r") if how == "backed" else None,
        "view": pbmc[100:300],
    }[how]
    dataset = AnnDataset(source, backed=how != "path_loaded", sparse=True, **kwargs)
    ref = pbmc[100:300] if how == "view" else pbmc
    rows = np.array([5, 0, 150, 42])
    np.testing.assert_array_equal(ta.densify(dataset[rows]).numpy(), raw_rows(ref, rows))
    assert list(dataset.var_names) == list(pbmc.raw.var_names)
    assert dataset.n_vars == pbmc.raw.n_vars


def test_raw_and_a_layer_are_exclusive_and_raw_must_exist(pbmc):
    with pytest.raises(ValueError, match=r"Pass either layer='x' or use_raw=True"):
        AnnDataset(pbmc, layer="x", use_raw=True)
    del pbmc.raw
    with pytest.raises(KeyError, match=r"The AnnData has no \.raw .*Its layers: none"):
        AnnDataset(pbmc, use_raw=True)


# --------------------------------------------------------------------------- obs NaN


def test_float_obs_column_with_nan_follows_the_na_rule(pbmc):
    pbmc.obs.loc[pbmc.obs_names[[3, 7]], "percent_mito"] = np.nan
    with pytest.raises(
        ValueError, match=r"obs column 'percent_mito' has 2 missing \(NaN\) values out of 700"
    ):
        AnnDataset(pbmc, obs_keys="percent_mito")
    with pytest.raises(ValueError, match=r"'percent_mito' has 2 missing"):
        ta.AnnDataModule(pbmc, fields=ta.Fields(obs_keys=["percent_mito"])).setup("fit")
    values = AnnDataset(pbmc, obs_keys="percent_mito", na="code")[:]["percent_mito"]
    assert torch.isnan(values[[3, 7]]).all() and not torch.isnan(values[:3]).any()


# --------------------------------------------------------------------------- time points

DAYS = ["day 0", "day 2", "day 4", "day 10"]


@pytest.fixture
def krumsiek() -> ad.AnnData:
    """scanpy's krumsiek11 time course with a time column of day labels (160 cells a day)."""
    import scanpy as sc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata = sc.datasets.krumsiek11()
    adata.obs_names_make_unique()
    adata.obs["day"] = np.repeat(DAYS, adata.n_obs // 4)
    return adata


def time_dataset(adata, **kwargs) -> ta.TimeResolvedAnnDataset:
    return ta.TimeResolvedAnnDataset(adata, time_key="day", **kwargs)


@pytest.mark.parametrize(
    "make",
    [
        lambda day: pd.Categorical(day, categories=DAYS, ordered=True),
        lambda day: pd.Categorical(day),  # unordered: the labels are the times
        lambda day: np.asarray(day, dtype=object),
    ],
    ids=["ordered_categorical", "categorical", "strings"],
)
def test_day_labels_become_their_days(krumsiek, make):
    krumsiek.obs["day"] = make(krumsiek.obs["day"].to_numpy())
    dataset = time_dataset(krumsiek)
    assert dataset.time_points.tolist() == [0.0, 2.0, 4.0, 10.0]
    rows = np.array([0, 200, 400, 639])
    expected = [float(label.split()[1]) for label in krumsiek.obs["day"].to_numpy()[rows]]
    assert dataset[rows]["t"].tolist() == expected
    assert dataset[rows]["t_eval"].tolist() == [0.0, 2.0, 4.0, 10.0]


def test_an_order_that_disagrees_with_the_labels_warns_and_the_days_win(krumsiek):
    # `.cat.as_ordered()` on the labels orders them as strings: "day 10" before "day 2"
    krumsiek.obs["day"] = krumsiek.obs["day"].astype("category").cat.as_ordered()
    with pytest.warns(UserWarning, match=r"disagrees with the times in its labels.*time_ranks"):
        dataset = time_dataset(krumsiek)
    assert dataset.time_points.tolist() == [0.0, 2.0, 4.0, 10.0]


def test_ranks_only_when_asked(krumsiek):
    krumsiek.obs["day"] = pd.Categorical(krumsiek.obs["day"], categories=DAYS, ordered=True)
    assert time_dataset(krumsiek, time_ranks=True).time_points.tolist() == [0.0, 1.0, 2.0, 3.0]
    dm = ta.AnnDataModule(krumsiek, time=ta.TimeSampling("day", time_ranks=True))
    dm.setup("fit")
    assert dm.dataset.time_points.tolist() == [0.0, 1.0, 2.0, 3.0]
    krumsiek.obs["day"] = krumsiek.obs["day"].astype(str)
    with pytest.raises(TypeError, match=r"time_ranks=True needs obs column 'day' to be an ordered"):
        time_dataset(krumsiek, time_ranks=True)


@pytest.mark.parametrize(
    ("labels", "expected"),
    [(["D0", "D2", "D4", "D10"], [0, 2, 4, 10]), (["0h", "12h", "24h", "48h"], [0, 12, 24, 48])],
)
def test_other_spellings_of_times(krumsiek, labels, expected):
    krumsiek.obs["day"] = np.repeat(labels, krumsiek.n_obs // 4)
    assert time_dataset(krumsiek).time_points.tolist() == expected


def test_mixed_units_are_not_guessed(krumsiek):
    krumsiek.obs["day"] = np.repeat(["12h", "1d", "2d", "36h"], krumsiek.n_obs // 4)
    with pytest.raises(TypeError, match=r"'day' has values that are not times"):
        time_dataset(krumsiek)


def test_labels_that_are_not_times_get_advice_in_the_right_order(krumsiek):
    # a label without a number: no guess, but the advice lists "day 2" before "day 10"
    krumsiek.obs["day"] = np.repeat(["final", "day 10", "day 0", "day 2"], krumsiek.n_obs // 4)
    with pytest.raises(
        TypeError,
        match=r"values that are not times.*categories=\['day 0', 'day 2', 'day 10', 'final'\], "
        r"ordered=True",
    ):
        time_dataset(krumsiek)
    krumsiek.obs["day"] = krumsiek.obs["day"].astype("category")
    with pytest.raises(
        TypeError,
        match=r"no order.*reorder_categories\(\['day 0', 'day 2', 'day 10', 'final'\], ordered=True",
    ):
        time_dataset(krumsiek)
    # an ordered categorical of words is its order
    krumsiek.obs["day"] = pd.Categorical(
        np.repeat(["early", "mid", "late", "end"], krumsiek.n_obs // 4),
        categories=["early", "mid", "late", "end"],
        ordered=True,
    )
    assert time_dataset(krumsiek).time_points.tolist() == [0.0, 1.0, 2.0, 3.0]


# --------------------------------------------------------------------------- splits


def test_stratified_split_keeps_its_size_and_warns_about_small_classes(pbmc):
    dm = ta.AnnDataModule(
        pbmc,
        fields=ta.Fields(obs_keys=["bulk_labels"]),
        split=ta.Split(val_size=0.1, test_size=0.1, stratify_key="bulk_labels"),
    )
    with pytest.warns(
        UserWarning,
        match=r"'bulk_labels': 1 of 10 classes have fewer than the 10 cells a split of 0\.1 "
        r"needs.*CD4\+/CD45RA\+/CD25- Naive T \(8\)",
    ):
        dm.setup("fit")
    sizes = {name: len(dm.splits[name]) for name in ("train", "val", "test")}
    assert sizes == {"train": 560, "val": 70, "test": 70}
    labels = pbmc.obs["bulk_labels"].to_numpy()
    val_share = pd.Series(labels[dm.splits["val"]]).value_counts()
    assert val_share["Dendritic"] == 24 and val_share["CD14+ Monocyte"] == 13  # 10% of each


def test_a_many_valued_column_keeps_the_split_sizes(pbmc):
    # bulk label x louvain cluster: 80 classes, most of them small (the val split used to
    # shrink from 70 cells to a dozen)
    pbmc.obs["group"] = pbmc.obs["bulk_labels"].astype(str) + "/" + pbmc.obs["louvain"].astype(str)
    with pytest.warns(UserWarning, match=r"'group': \d+ of \d+ classes have fewer than"):
        splits = ta.splits.make_splits(pbmc.obs, stratify_key="group")
    assert (len(splits["val"]), len(splits["test"])) == (70, 70)


def test_a_continuous_column_cannot_be_stratified(pbmc):
    dm = ta.AnnDataModule(
        pbmc, split=ta.Split(val_size=0.1, test_size=0.1, stratify_key="percent_mito")
    )
    with pytest.raises(
        ValueError,
        match=r"stratify_key 'percent_mito' cannot be stratified: it has 696 distinct values "
        r"among 700 cells.*pd\.qcut\(adata\.obs\['percent_mito'\], 5\)",
    ):
        dm.setup("fit")


# --------------------------------------------------------------------------- gene alignment


@pytest.fixture
def shuffled(pbmc, tmp_path) -> tuple[ad.AnnData, str]:
    """pbmc68k_reduced with its genes (X and .raw) in another order, in memory and on disk."""
    order = np.random.default_rng(0).permutation(pbmc.n_vars)
    other = pbmc[:, order].copy()
    other.raw = pbmc.raw.to_adata()[:, order].copy()
    other.X = sp.csr_matrix(other.X)  # sparse on disk, to read CSR rows from the file
    path = tmp_path / "shuffled.h5ad"
    other.write_h5ad(path)
    return other, str(path)


@pytest.mark.parametrize("how", ["memory", "path", "path_loaded", "backed", "view"])
@pytest.mark.parametrize("sparse", [False, True])
def test_reordered_genes_are_put_back_in_the_reference_order(pbmc, shuffled, how, sparse):
    other, path = shuffled
    source = {
        "memory": other,
        "path": path,
        "path_loaded": path,
        "backed": ad.read_h5ad(path, backed="r") if how == "backed" else None,
        "view": other[10:],
    }[how]
    dataset = AnnDataset(
        source, var_names=pbmc.var_names, sparse=sparse, backed=how != "path_loaded"
    )
    assert list(dataset.var_names) == list(pbmc.var_names) and dataset.n_vars == pbmc.n_vars
    rows = np.array([0, 7, 3, 200])
    offset = 10 if how == "view" else 0
    got = dataset[rows]
    got = ta.densify(got) if sparse else got
    np.testing.assert_allclose(got.numpy(), pbmc.X[rows + offset], rtol=1e-6)
    assert dataset.gene_alignment.n_extra == 0 and len(dataset.gene_alignment.missing) == 0


def test_reordered_raw_genes(pbmc, shuffled):
    _, path = shuffled
    dataset = AnnDataset(path, use_raw=True, var_names=pbmc.raw.var_names, sparse=True)
    rows = np.array([4, 1, 650])
    np.testing.assert_array_equal(ta.densify(dataset[rows]).numpy(), raw_rows(pbmc, rows))


def test_a_gene_subset_raises_or_is_zero_filled_when_asked(pbmc, tmp_path):
    keep = np.r_[0:300, 315:765]  # 15 genes missing
    subset = pbmc[:, keep[::-1]].copy()  # and reversed
    path = tmp_path / "subset.h5ad"
    subset.write_h5ad(path)
    with pytest.raises(
        ValueError,
        match=r"15 of the 765 genes the model was trained on are missing from the data "
        r"\(e\.g\. \['.*'\]; 750 found\).*fill_missing=True",
    ):
        AnnDataset(path, var_names=pbmc.var_names)
    with pytest.warns(UserWarning, match=r"15 of the 765 reference genes are missing"):
        dataset = AnnDataset(path, var_names=pbmc.var_names, fill_missing=True)
    assert list(dataset.gene_alignment.missing) == list(pbmc.var_names[300:315])
    rows = np.array([5, 9])
    got, want = dataset[rows].numpy(), pbmc.X[rows].copy()
    want[:, 300:315] = 0
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_extra_genes_are_dropped_and_duplicates_refused(pbmc):
    dataset = AnnDataset(pbmc, var_names=pbmc.var_names[::3])
    assert dataset.gene_alignment.n_extra == pbmc.n_vars - len(pbmc.var_names[::3])
    np.testing.assert_array_equal(dataset[[1]].numpy(), pbmc.X[[1]][:, ::3])
    twice = pbmc.copy()
    twice.var_names = [*pbmc.var_names[:-1], pbmc.var_names[0]]
    with pytest.raises(ValueError, match=r"several columns for the genes \['HES4'\]"):
        AnnDataset(twice, var_names=pbmc.var_names[:5])


def test_a_model_predicts_the_same_on_reordered_genes_once_aligned(pbmc, shuffled, tmp_path):
    classifier = load_example("classifier")
    dm = ta.AnnDataModule(
        pbmc, fields=ta.Fields(obs_keys=["bulk_labels"], layer="raw"), batch_size=128
    )
    model = classifier.CellTypeClassifier(label_key="bulk_labels", lr=1e-2)
    trainer(tmp_path, max_epochs=15).fit(model, datamodule=dm)
    model.eval()
    genes = dm.dataset.var_names  # what a checkpoint records
    labels = torch.from_numpy(dm.dataset.encoders["bulk_labels"].encode(pbmc.obs["bulk_labels"]))
    _, path = shuffled
    with torch.no_grad():
        reference = model(AnnDataset(pbmc, use_raw=True)[:])
        aligned = model(AnnDataset(path, use_raw=True, var_names=genes)[:])
        unaligned = model(AnnDataset(path, use_raw=True)[:])
    torch.testing.assert_close(aligned, reference)
    accuracy = (reference.argmax(1) == labels).float().mean()
    assert accuracy > 0.7
    # without alignment the same model silently lost most of its accuracy
    assert (unaligned.argmax(1) == labels).float().mean() < accuracy - 0.3


def test_raw_and_zero_filled_genes_through_worker_processes(pbmc, tmp_path):
    subset = pbmc.raw.to_adata()[:, ::-1][:, 10:].copy()  # reversed, 10 genes missing
    subset.X = sp.csr_matrix(subset.X)
    path = tmp_path / "raw_subset.h5ad"
    subset.write_h5ad(path)
    with pytest.warns(UserWarning, match=r"10 of the 765 reference genes are missing"):
        dataset = AnnDataset(
            path, var_names=pbmc.raw.var_names, fill_missing=True, sparse=True, obsm_keys=[]
        )
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=100, num_workers=2, collate_fn=ta.collate, persistent_workers=False
    )
    got = torch.cat([ta.densify(batch) for batch in loader]).numpy()
    want = raw_rows(pbmc, np.arange(pbmc.n_obs))
    want[:, -10:] = 0  # the last genes of .raw were dropped from the reversed copy
    np.testing.assert_array_equal(got, want)


def test_backed_obsm_is_read_once_into_memory(pbmc, pbmc_file):
    dataset = AnnDataset(pbmc_file, obsm_keys=["X_pca"], obs_keys=["bulk_labels"])
    assert "in memory" in dataset.fields["X_pca"].reader.describe()
    assert "backed" in dataset.fields["X"].reader.describe()  # X itself stays on disk
    rows = np.array([699, 3, 3, 250])
    batch = dataset[rows]
    np.testing.assert_array_equal(batch["X_pca"].numpy(), pbmc.obsm["X_pca"][rows])
    np.testing.assert_array_equal(batch["X"].numpy(), pbmc.X[rows])


# --------------------------------------------------------------------------- predictions


def test_predicted_classes_go_back_as_scanpy_categoricals(pbmc, tmp_path):
    """The issue's row: int codes in obs (a colourbar in ``sc.pl.umap``), decode failing on
    cells without a prediction, tuple outputs failing in torch. Labels are categoricals now."""
    import matplotlib.pyplot as plt
    import scanpy as sc

    classifier = load_example("classifier")
    dm = ta.AnnDataModule(
        pbmc,
        fields=ta.Fields(obs_keys=["bulk_labels"], layer="raw"),
        split=ta.Split(test_size=0.2),
        batch_size=128,
        seed=0,
    )
    fit = trainer(tmp_path, max_epochs=5)
    fit.fit(classifier.CellTypeClassifier(label_key="bulk_labels"), datamodule=dm)
    named = fit.predict(fit.lightning_module, dataloaders=dm.loader("test"))
    test = dm.splits["test"]
    others = np.setdiff1d(np.arange(pbmc.n_obs), test)
    names = list(pbmc.obs["bulk_labels"].cat.categories)

    out = dm.write_predictions(
        named, key={"predicted": "predicted"}, labels="bulk_labels", split="test"
    )
    column = out.obs["predicted"]
    assert isinstance(column.dtype, pd.CategoricalDtype)
    assert list(column.cat.categories) == names
    assert column.iloc[others].isna().all() and column.iloc[test].notna().all()
    # the codes themselves (no labels=): <NA> outside the split, and decode takes them
    codes = dm.write_predictions(named, key={"predicted": "code"}, split="test").obs["code"]
    assert str(codes.dtype) == "Int64" and codes.isna().sum() == len(others)
    decoded = dm.decode("bulk_labels", codes)
    assert decoded[others].tolist() == [None] * len(others)
    assert set(decoded[test]) <= set(names)
    np.testing.assert_array_equal(decoded[test], column.iloc[test].astype(str).to_numpy())

    # a tuple output: (probabilities, codes), written by position
    pieces = [(p["class_probabilities"], p["predicted"]) for p in named]
    both = dm.write_predictions(
        pieces,
        key=["proba", "from_tuple"],
        labels={"proba": "bulk_labels", "from_tuple": "bulk_labels"},
        split="test",
    )
    for key in ("proba", "from_tuple"):
        pd.testing.assert_series_equal(both.obs[key], column, check_names=False)
    assert np.isnan(both.obsm["proba"][others]).all()

    # scanpy draws the column as categories (a legend of label names), not a colourbar
    ax = sc.pl.umap(out, color="predicted", show=False)
    try:
        legend = {text.get_text() for text in ax.get_legend().get_texts()}
        shown = set(column.dropna().astype(str))
        assert shown <= legend <= set(names) | {"NA"}
        assert len(ax.figure.axes) == 1, "a colourbar would be a second axes"
    finally:
        plt.close(ax.figure)
