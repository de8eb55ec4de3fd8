"""AnnDataModule: sources, split loaders, checkpointed splits, workers, predictions back to AnnData."""

import pickle

import anndata as ad
import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from torch_adata import (
    AnnDataModule,
    CategoryEncoder,
    TimeResolvedAnnDataset,
    UnknownCategoryError,
)
from torch_adata.splits import fingerprint, make_splits


@pytest.fixture
def adata():
    rng = np.random.default_rng(0)
    n = 300
    obs = pd.DataFrame(
        {
            "Cell type annotation": pd.Categorical(rng.choice(["undiff", "Neu", "Mono"], n)),
            "Time point": rng.choice([2, 4, 6], n),
            "Well": rng.choice([0, 1, 2], n),
        },
        index=[f"cell{i}" for i in range(n)],
    )
    X = sp.random(n, 40, density=0.2, format="csr", dtype=np.float32, random_state=1)
    a = ad.AnnData(X, obs=obs)
    a.obsm["X_pca"] = rng.normal(size=(n, 5)).astype(np.float32)
    return a


def _rows_of(loader):
    return [batch["index"].numpy() for batch in loader]


def test_split_loaders_cover_their_split_once(adata):
    dm = AnnDataModule(adata, return_index=True, batch_size=32, seed=5)
    dm.setup("fit")
    expected = make_splits(adata.obs, seed=5)
    for name in ("train", "val", "test", "predict"):
        assert np.array_equal(dm.splits[name], expected[name])
        loader = dm.loader(name)
        assert np.array_equal(loader.dataset.indices, expected[name])
        rows = np.concatenate(_rows_of(loader))
        assert np.array_equal(np.sort(rows), expected[name])
    # evaluation loaders keep AnnData order; training is shuffled
    assert np.array_equal(np.concatenate(_rows_of(dm.val_dataloader())), expected["val"])
    assert not np.array_equal(np.concatenate(_rows_of(dm.train_dataloader())), expected["train"])


def test_batch_values_match_anndata(adata):
    dm = AnnDataModule(
        adata,
        obs_keys=["Cell type annotation"],
        obsm_keys=["X_pca"],
        return_index=True,
        batch_size=50,
    )
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    rows = batch["index"].numpy()
    np.testing.assert_array_equal(batch["X"].numpy(), adata.X[rows].toarray())
    np.testing.assert_array_equal(batch["X_pca"].numpy(), adata.obsm["X_pca"][rows])
    codes = adata.obs["Cell type annotation"].cat.codes.to_numpy()[rows]
    np.testing.assert_array_equal(batch["Cell type annotation"].numpy(), codes)


def test_never_mutates_the_users_anndata(adata):
    before = adata.copy()
    dm = AnnDataModule(adata, obs_keys=["Cell type annotation"], stratify_key="Well")
    dm.setup()
    for _ in dm.train_dataloader():
        pass
    pd.testing.assert_frame_equal(adata.obs, before.obs)
    assert list(adata.obsm) == list(before.obsm) and list(adata.layers) == list(before.layers)
    assert (adata.X != before.X).nnz == 0


def test_path_sources_backed_and_in_memory(adata, tmp_path):
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    batches = []
    for backed in (True, False):
        dm = AnnDataModule(str(path), backed=backed, return_index=True, batch_size=64, seed=1)
        dm.setup()
        batches.append(next(iter(dm.train_dataloader())))
    for key in ("X", "index"):
        assert torch.equal(batches[0][key], batches[1][key])


def test_state_dict_restores_the_split(adata):
    dm = AnnDataModule(adata, seed=1)
    dm.setup()
    state = dm.state_dict()
    other = AnnDataModule(adata, seed=2)
    other.setup()
    assert not np.array_equal(other.splits["train"], dm.splits["train"])
    other.load_state_dict(state)
    for name in ("train", "val", "test"):
        assert np.array_equal(other.splits[name], dm.splits[name])


class _Linear(pl.LightningModule):
    def __init__(self, n_vars=40):
        super().__init__()
        self.net = torch.nn.Linear(n_vars, 2)

    def training_step(self, batch, batch_idx):
        return self.net(batch["X"] if isinstance(batch, dict) else batch).pow(2).mean()

    def predict_step(self, batch, batch_idx):
        x = batch["X"] if isinstance(batch, dict) else batch
        # deterministic, row-identifying outputs: row sum and row max
        return torch.stack([x.sum(1), x.max(1).values], dim=1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _trainer(tmp_path, **kw):
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kw,
    )


def test_checkpoint_resume_sees_the_same_split(adata, tmp_path):
    dm = AnnDataModule(adata, seed=11, batch_size=64)
    trainer = _trainer(tmp_path, max_epochs=1, limit_val_batches=0)
    trainer.fit(_Linear(), datamodule=dm)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = AnnDataModule(adata, seed=99, batch_size=64)  # a different seed would re-split
    _trainer(tmp_path, max_epochs=2, limit_val_batches=0).fit(
        _Linear(), datamodule=resumed, ckpt_path=ckpt
    )
    for name in ("train", "val", "test"):
        assert np.array_equal(resumed.splits[name], dm.splits[name])


def _fit_and_checkpoint(adata, tmp_path, **kw):
    dm = AnnDataModule(adata, seed=11, batch_size=64, **kw)
    trainer = _trainer(tmp_path, max_epochs=1, limit_val_batches=0)
    trainer.fit(_Linear(), datamodule=dm)
    ckpt = tmp_path / "trained.ckpt"
    trainer.save_checkpoint(ckpt)
    return dm, ckpt


def test_checkpoint_split_restored_on_the_same_cells_read_from_a_file(adata, tmp_path):
    dm, ckpt = _fit_and_checkpoint(adata, tmp_path)
    saved = torch.load(ckpt, weights_only=True)["AnnDataModule"]
    assert saved["data"] == {"n_obs": 300, **fingerprint(adata.obs_names)}
    path = tmp_path / "same.h5ad"
    adata.write_h5ad(path)
    resumed = AnnDataModule(str(path), seed=99, batch_size=64)
    _trainer(tmp_path, max_epochs=2, limit_val_batches=0).fit(
        _Linear(), datamodule=resumed, ckpt_path=ckpt
    )
    for name in ("train", "val", "test", "predict"):
        assert np.array_equal(resumed.splits[name], dm.splits[name])


def _more_cells(adata):
    extra = adata[:120].copy()
    extra.obs_names = [f"new{i}" for i in range(extra.n_obs)]
    extra.X = extra.X * 2
    return ad.concat([adata, extra])


@pytest.mark.parametrize("new", ["more", "fewer"])
def test_predict_on_new_data_with_a_checkpoint_covers_every_cell(adata, tmp_path, new):
    _, ckpt = _fit_and_checkpoint(adata, tmp_path)
    other = _more_cells(adata) if new == "more" else adata[50:200].copy()
    path = tmp_path / "new.h5ad"
    other.write_h5ad(path)
    dm = AnnDataModule(str(path), return_index=True, batch_size=64)
    outputs = _trainer(tmp_path).predict(_EchoRows(), datamodule=dm, ckpt_path=ckpt)
    rows = torch.cat([o["index"] for o in outputs]).numpy()
    np.testing.assert_array_equal(rows, np.arange(other.n_obs))
    written = dm.write_predictions(outputs, key={"row_sum": "row_sum"})
    np.testing.assert_allclose(
        written.obs["row_sum"].to_numpy(), np.asarray(other.X.sum(1)).ravel(), rtol=1e-5
    )


@pytest.mark.parametrize("change", ["more cells", "renamed", "reordered"])
def test_resuming_fit_on_other_cells_raises(adata, tmp_path, change):
    _, ckpt = _fit_and_checkpoint(adata, tmp_path)
    if change == "more cells":
        other = _more_cells(adata)
    elif change == "renamed":
        other = adata.copy()
        other.obs_names = [f"other{i}" for i in range(other.n_obs)]
    else:
        other = adata[::-1].copy()
    resumed = AnnDataModule(other, seed=11, batch_size=64)
    match = (
        r"split was drawn on other cells \((300 cells; this data has 420|300 cells too, but "
        r"other obs_names or another order)\).*same AnnData.*split_indices="
    )
    with pytest.raises(ValueError, match=match):
        _trainer(tmp_path, max_epochs=2, limit_val_batches=0).fit(
            _Linear(), datamodule=resumed, ckpt_path=ckpt
        )
    # The failed stage is over: loading the state by hand now warns instead of raising.
    with pytest.warns(UserWarning, match="split was not applied"):
        resumed.load_state_dict(torch.load(ckpt, weights_only=True)["AnnDataModule"])


def test_other_cells_evaluate_with_explicit_split_indices_and_raise_without(adata, tmp_path):
    _, ckpt = _fit_and_checkpoint(adata, tmp_path)
    other = _more_cells(adata)
    with pytest.raises(ValueError, match="split was drawn on other cells"):
        _trainer(tmp_path).test(_Scored(), datamodule=AnnDataModule(other), ckpt_path=ckpt)
    chosen = {"train": np.arange(300), "test": np.arange(300, 420)}
    dm = AnnDataModule(other, split_indices=chosen, return_index=True, batch_size=64)
    model = _Scored()
    _trainer(tmp_path).test(model, datamodule=dm, ckpt_path=ckpt)
    np.testing.assert_array_equal(np.sort(np.concatenate(model.rows)), chosen["test"])


def test_state_loaded_by_hand_onto_other_cells_warns_and_keeps_their_split(adata):
    dm = AnnDataModule(adata, seed=1)
    dm.setup()
    state = dm.state_dict()
    other = _more_cells(adata)
    by_hand = AnnDataModule(other, seed=1)
    by_hand.load_state_dict(state)  # before setup: applied there
    assert by_hand.state_dict()["splits"] == state["splits"], "kept until setup"
    with pytest.warns(UserWarning, match="split was not applied"):
        by_hand.setup()
    own = make_splits(other.obs, seed=1)
    for name in ("train", "val", "test", "predict"):
        np.testing.assert_array_equal(by_hand.splits[name], own[name])
    assert by_hand.state_dict()["data"] == fingerprint(other.obs_names)


def test_checkpoints_without_a_fingerprint_apply_their_split_where_it_fits(adata):
    dm = AnnDataModule(adata, seed=1)
    dm.setup()
    legacy = {k: v for k, v in dm.state_dict().items() if k != "data"}
    more = AnnDataModule(_more_cells(adata), seed=2)
    more.load_state_dict(legacy)
    more.setup("fit")
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(more.splits[name], dm.splits[name])
    np.testing.assert_array_equal(more.splits["predict"], np.arange(420))
    fewer = adata[:100].copy()
    predicting = AnnDataModule(fewer)
    predicting.load_state_dict(legacy)
    predicting.setup("predict")
    np.testing.assert_array_equal(predicting.splits["predict"], np.arange(100))
    fitting = AnnDataModule(fewer)
    fitting.load_state_dict(legacy)
    with pytest.raises(ValueError, match="drawn on more cells than the 100 this data module"):
        fitting.setup("fit")


def test_fingerprint_follows_names_and_order():
    names = [f"c{i}" for i in range(5)]
    assert fingerprint(names) == fingerprint(pd.Index(names, dtype=object))
    assert fingerprint(names)["n_obs"] == 5
    digests = {
        fingerprint(v)["obs_names_sha256"]
        for v in (names, names[::-1], names[:4], [*names[:4], "c5"], ["c0c1", "c2", "c3", "c4"])
    }
    assert len(digests) == 5


class _EchoRows(_Linear):
    def predict_step(self, batch, batch_idx):
        return {"index": batch["index"], "row_sum": batch["X"].sum(1)}


class _Scored(_Linear):
    def __init__(self):
        super().__init__()
        self.rows = []

    def test_step(self, batch, batch_idx):
        self.rows.append(batch["index"].numpy())


LABEL = "Cell type annotation"


class _EchoCodes(_Linear):
    def predict_step(self, batch, batch_idx):
        return {"codes": batch[LABEL], "index": batch["index"]}


def test_checkpoint_restores_the_trained_label_codes(adata, tmp_path):
    dm = AnnDataModule(adata, obs_keys=[LABEL], batch_size=64, seed=0)
    trainer = _trainer(tmp_path, max_epochs=1, limit_val_batches=0)
    trainer.fit(_Linear(), datamodule=dm)
    ckpt = tmp_path / "trained.ckpt"
    trainer.save_checkpoint(ckpt)
    trained = dm.dataset.encoders[LABEL]
    assert list(trained.categories) == ["Mono", "Neu", "undiff"]

    # The same cells, written to a file whose category order codes the labels differently.
    other = adata.copy()
    other.obs[LABEL] = other.obs[LABEL].cat.reorder_categories(["undiff", "Neu", "Mono"])
    path = tmp_path / "reordered.h5ad"
    other.write_h5ad(path)
    fresh = AnnDataModule(str(path), obs_keys=[LABEL])
    fresh.setup()
    assert fresh.dataset.encoders[LABEL] != trained, "without the checkpoint, codes differ"

    new = AnnDataModule(str(path), obs_keys=[LABEL], return_index=True, batch_size=64)
    outputs = _trainer(tmp_path).predict(_EchoCodes(), datamodule=new, ckpt_path=ckpt)
    assert new.dataset.encoders[LABEL] == trained
    codes = torch.cat([o["codes"] for o in outputs]).numpy()
    rows = torch.cat([o["index"] for o in outputs]).numpy()
    labels = other.obs[LABEL].to_numpy()[rows]
    np.testing.assert_array_equal(codes, trained.categories.get_indexer(labels))
    np.testing.assert_array_equal(new.decode(LABEL, codes), labels)
    assert new.state_dict()["encoders"][LABEL] == trained.to_dict()


def test_checkpoint_encoders_decode_without_the_column_and_refuse_conflicts(adata):
    dm = AnnDataModule(adata, obs_keys=[LABEL])
    dm.setup()
    state = dm.state_dict()
    unlabelled = AnnDataModule(adata)  # e.g. new cells without annotations
    unlabelled.load_state_dict(state)
    unlabelled.setup()
    assert unlabelled.decode(LABEL, [2, 0]).tolist() == ["undiff", "Mono"]
    assert unlabelled.state_dict()["encoders"] == state["encoders"]  # kept for the next save

    reversed_order = {LABEL: CategoryEncoder(["undiff", "Neu", "Mono"])}
    conflicting = AnnDataModule(adata, obs_keys=[LABEL], encoders=reversed_order)
    conflicting.setup()
    with pytest.raises(ValueError, match="other categories than the checkpoint"):
        conflicting.load_state_dict(state)

    fewer = adata.copy()
    fewer.obs[LABEL] = fewer.obs[LABEL].cat.rename_categories({"Neu": "Neutrophil"})
    unknown = AnnDataModule(fewer, obs_keys=[LABEL])
    unknown.setup()
    with pytest.raises(
        UnknownCategoryError, match=r"checkpoint's encoders do not know.*'Neutrophil'"
    ) as raised:
        unknown.load_state_dict(state)
    assert isinstance(raised.value, ValueError)
    assert (raised.value.column, raised.value.labels) == (LABEL, ["Neutrophil"])
    copied = pickle.loads(pickle.dumps(raised.value))  # e.g. from a worker process
    assert (str(copied), copied.column, copied.labels) == (str(raised.value), LABEL, ["Neutrophil"])


def test_unknown_labels_of_a_given_encoder_are_not_blamed_on_the_checkpoint(adata):
    trained = AnnDataModule(adata, obs_keys=[LABEL])
    trained.setup()
    state = trained.state_dict()  # holds the encoder of LABEL only
    donors = adata.copy()
    donors.obs["Donor"] = pd.Categorical(np.where(np.arange(300) % 2, "d1", "d2"))
    dm = AnnDataModule(
        donors, obs_keys=[LABEL, "Donor"], encoders={"Donor": CategoryEncoder(["d1"])}
    )
    dm.load_state_dict(state)
    with pytest.raises(UnknownCategoryError, match="encoder has never seen") as raised:
        dm.setup()
    assert "checkpoint" not in str(raised.value)
    assert (raised.value.column, raised.value.labels) == ("Donor", ["d2"])


def test_dtype_and_encoder_options_reach_the_batches(adata):
    order = CategoryEncoder(["undiff", "Neu", "Mono"])
    dm = AnnDataModule(
        adata,
        obs_keys=[LABEL, "Well"],
        obsm_keys=["X_pca"],
        return_index=True,
        dtype=torch.float64,
        obsm_dtype=torch.float16,
        obs_dtypes={"Well": torch.int32},
        encoders={LABEL: order},
        batch_size=50,
    )
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    assert batch["X"].dtype == torch.float64
    assert batch["X_pca"].dtype == torch.float16
    assert batch["Well"].dtype == torch.int32
    labels = adata.obs[LABEL].to_numpy()[batch["index"].numpy()]
    np.testing.assert_array_equal(batch[LABEL].numpy(), order.categories.get_indexer(labels))
    assert dm.encoders[LABEL] is order


def test_split_dataset_checks_its_positions(adata):
    dm = AnnDataModule(adata, return_index=True, seed=0)
    split = dm.loader("val").dataset
    n = len(split)
    assert "val" in repr(split) and str(n) in repr(split)
    assert split[-1]["index"].item() == split.indices[-1]
    np.testing.assert_array_equal(split[[0, -1]]["index"].numpy(), split.indices[[0, -1]])
    with pytest.raises(IndexError, match=rf"Index {n} is out of range for a dataset of {n}"):
        split.__getitems__([0, n])
    with pytest.raises(IndexError, match="out of range"):
        split[n]


def test_predictions_written_back_in_original_order(adata, tmp_path):
    dm = AnnDataModule(adata, batch_size=37)
    predictions = _trainer(tmp_path).predict(_Linear(), datamodule=dm)
    out = dm.write_predictions(predictions, key="X_pred")
    assert "X_pred" not in adata.obsm, "the user's AnnData must stay untouched"
    dense = adata.X.toarray()
    np.testing.assert_allclose(out.obsm["X_pred"][:, 0], dense.sum(1), rtol=1e-5)
    np.testing.assert_allclose(out.obsm["X_pred"][:, 1], dense.max(1), rtol=1e-6)
    one_d = dm.write_predictions([p[:, 0] for p in predictions], key="row_sum")
    np.testing.assert_allclose(one_d.obs["row_sum"].to_numpy(), dense.sum(1), rtol=1e-5)


def test_workers_cover_train_split_once(adata):
    dm = AnnDataModule(
        adata, return_index=True, batch_size=20, num_workers=2, multiprocessing_context="fork"
    )
    dm.setup()
    loader = dm.train_dataloader()
    assert loader.persistent_workers  # the default with workers: they start once
    assert not AnnDataModule(adata, num_workers=2, persistent_workers=False).loader_kwargs[
        "persistent_workers"
    ]
    assert not AnnDataModule(adata).loader_kwargs["persistent_workers"]  # no workers
    for _ in range(2):
        rows = np.concatenate(_rows_of(loader))
        assert np.array_equal(np.sort(rows), dm.splits["train"])


@pytest.mark.slow
def test_time_resolved_population_batches_respect_holdout(adata):
    dm = AnnDataModule(
        adata,
        X=False,
        obsm_keys=["X_pca"],
        return_index=True,
        time_key="Time point",
        cells_per_time=10,
        holdout={"Time point": [4]},
        val_size=0.0,
        test_size=0.0,
    )
    dm.setup()
    assert isinstance(dm.dataset, TimeResolvedAnnDataset)
    times = adata.obs["Time point"].to_numpy()
    seen = []
    for batch in dm.train_dataloader():
        rows = batch["index"].numpy()
        assert batch["X_pca"].shape == (20, 5)
        assert np.all(times[rows[:10]] == 2) and np.all(times[rows[10:]] == 6)
        np.testing.assert_array_equal(batch["t"].numpy(), times[rows].astype(np.float32))
        seen.append(rows)
    seen = np.concatenate(seen)
    assert len(seen) == len(np.unique(seen)), "a cell was drawn twice in one epoch"
    assert np.all(times[dm.splits["test"]] == 4)


def test_registry_name_source():
    dm = AnnDataModule(
        "simulated",
        load_kwargs={"n_cells": 600, "n_genes": 50, "seed": 0},
        obs_keys=["Cell type annotation"],
        batch_size=64,
    )
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    # 480 train cells in near-equal batches of at most 64: 8 batches of 60
    assert batch["X"].shape == (60, 50)
    assert dm.adata.n_obs == len(dm.dataset)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"batch_size": 0}, ValueError, "batch_size must be >= 1"),
        ({"sampler": "random"}, ValueError, "sampler must be"),
        ({"obs_keys": ["donor"]}, KeyError, "Unknown obs column 'donor'"),
        ({"test_size": 0.0}, ValueError, "test split is empty"),
    ],
)
def test_bad_arguments(adata, kwargs, error, match):
    with pytest.raises(error, match=match):
        dm = AnnDataModule(adata, **kwargs)
        dm.setup()
        dm.test_dataloader()


def test_unknown_source_names_the_choices():
    dm = AnnDataModule("not-a-dataset")
    with pytest.raises((KeyError, ValueError, FileNotFoundError), match="simulated"):
        dm.setup()
