"""AnnDataModule: sources, split loaders, checkpointed splits, workers, predictions back to AnnData."""

import pickle
import warnings

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
    Fields,
    Loader,
    Split,
    TimeResolvedAnnDataset,
    TimeSampling,
    UnknownCategoryError,
)
from torch_adata.splits import fingerprint, make_splits

TENTHS = Split(val_size=0.1, test_size=0.1)  # validation and test splits of 10% each


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
    dm = AnnDataModule(
        adata,
        fields=Fields(return_index=True),
        split=TENTHS,
        batch_size=32,
        seed=5,
    )
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
        fields=Fields(obs_keys=["Cell type annotation"], obsm_keys=["X_pca"], return_index=True),
        split=TENTHS,
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
    dm = AnnDataModule(
        adata, fields=Fields(obs_keys=["Cell type annotation"]), split=Split(stratify_key="Well")
    )
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
        dm = AnnDataModule(
            str(path),
            fields=Fields(return_index=True),
            split=TENTHS,
            batch_size=64,
            seed=1,
            backed=backed,
        )
        dm.setup()
        batches.append(next(iter(dm.train_dataloader())))
    for key in ("X", "index"):
        assert torch.equal(batches[0][key], batches[1][key])


def test_state_dict_restores_the_split(adata):
    dm = AnnDataModule(adata, split=TENTHS, seed=1)
    dm.setup()
    state = dm.state_dict()
    other = AnnDataModule(adata, split=TENTHS, seed=2)
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
    dm = AnnDataModule(adata, split=TENTHS, batch_size=64, seed=11)
    trainer = _trainer(tmp_path, max_epochs=1, limit_val_batches=0)
    trainer.fit(_Linear(), datamodule=dm)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = AnnDataModule(
        adata, split=TENTHS, batch_size=64, seed=99
    )  # a different seed would re-split
    _trainer(tmp_path, max_epochs=2, limit_val_batches=0).fit(
        _Linear(), datamodule=resumed, ckpt_path=ckpt
    )
    for name in ("train", "val", "test"):
        assert np.array_equal(resumed.splits[name], dm.splits[name])


def _fit_and_checkpoint(adata, tmp_path, **kw):
    dm = AnnDataModule(adata, split=TENTHS, batch_size=64, seed=11, **kw)
    trainer = _trainer(tmp_path, max_epochs=1, limit_val_batches=0)
    trainer.fit(_Linear(), datamodule=dm)
    ckpt = tmp_path / "trained.ckpt"
    trainer.save_checkpoint(ckpt)
    return dm, ckpt


def test_checkpoint_hyperparameters_rebuild_the_module(adata, tmp_path):
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    dm = AnnDataModule(
        str(path),
        fields=Fields(obs_keys=[LABEL], return_index=True),
        time=TimeSampling("Time point", cells_per_time=8),
        split=Split(val_size=0.2, stratify_key="Well"),
        batch_size=32,
        loader=Loader(drop_last=True),
        seed=4,
    )
    trainer = _trainer(tmp_path, max_epochs=1, limit_val_batches=0, limit_train_batches=1)
    trainer.fit(_Linear(), datamodule=dm)
    ckpt = tmp_path / "hp.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)["datamodule_hyper_parameters"]
    assert saved["fields"]["obs_keys"] == [LABEL] and saved["time"]["time_key"] == "Time point"
    rebuilt = AnnDataModule.load_from_checkpoint(ckpt, weights_only=True)
    assert rebuilt.fields == dm.fields and rebuilt.time == dm.time
    assert rebuilt.split == dm.split and rebuilt.loader_options == dm.loader_options
    assert (rebuilt.batch_size, rebuilt.seed) == (32, 4)
    rebuilt.setup("fit")
    for name in ("train", "val", "test"):
        assert np.array_equal(rebuilt.splits[name], dm.splits[name])


def test_checkpoint_split_restored_on_the_same_cells_read_from_a_file(adata, tmp_path):
    dm, ckpt = _fit_and_checkpoint(adata, tmp_path)
    saved = torch.load(ckpt, weights_only=True)["AnnDataModule"]
    assert saved["data"] == {"n_obs": 300, **fingerprint(adata.obs_names)}
    path = tmp_path / "same.h5ad"
    adata.write_h5ad(path)
    resumed = AnnDataModule(str(path), split=TENTHS, batch_size=64, seed=99)
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
    dm = AnnDataModule(
        str(path),
        fields=Fields(return_index=True),
        split=TENTHS,
        batch_size=64,
    )
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
    resumed = AnnDataModule(other, split=TENTHS, batch_size=64, seed=11)
    match = (
        r"split was drawn on other cells \((300 cells; this data has 420|300 cells too, but "
        r"other obs_names or another order)\).*same AnnData.*split=Split\(indices="
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
        _trainer(tmp_path).test(
            _Scored(),
            datamodule=AnnDataModule(other, split=TENTHS),
            ckpt_path=ckpt,
        )
    chosen = {"train": np.arange(300), "test": np.arange(300, 420)}
    dm = AnnDataModule(
        other, fields=Fields(return_index=True), split=Split(indices=chosen), batch_size=64
    )
    model = _Scored()
    _trainer(tmp_path).test(model, datamodule=dm, ckpt_path=ckpt)
    np.testing.assert_array_equal(np.sort(np.concatenate(model.rows)), chosen["test"])


def test_state_loaded_by_hand_onto_other_cells_warns_and_keeps_their_split(adata):
    dm = AnnDataModule(adata, split=TENTHS, seed=1)
    dm.setup()
    state = dm.state_dict()
    other = _more_cells(adata)
    by_hand = AnnDataModule(other, split=TENTHS, seed=1)
    by_hand.load_state_dict(state)  # before setup: applied there
    assert by_hand.state_dict()["splits"] == state["splits"], "kept until setup"
    with pytest.warns(UserWarning, match="split was not applied"):
        by_hand.setup()
    own = make_splits(other.obs, seed=1)
    for name in ("train", "val", "test", "predict"):
        np.testing.assert_array_equal(by_hand.splits[name], own[name])
    assert by_hand.state_dict()["data"] == fingerprint(other.obs_names)


def test_checkpoints_without_a_fingerprint_apply_their_split_where_it_fits(adata):
    dm = AnnDataModule(adata, split=TENTHS, seed=1)
    dm.setup()
    legacy = {k: v for k, v in dm.state_dict().items() if k != "data"}
    more = AnnDataModule(_more_cells(adata), split=TENTHS, seed=2)
    more.load_state_dict(legacy)
    more.setup("fit")
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(more.splits[name], dm.splits[name])
    np.testing.assert_array_equal(more.splits["predict"], np.arange(420))
    fewer = adata[:100].copy()
    predicting = AnnDataModule(fewer, split=TENTHS)
    predicting.load_state_dict(legacy)
    predicting.setup("predict")
    np.testing.assert_array_equal(predicting.splits["predict"], np.arange(100))
    fitting = AnnDataModule(fewer, split=TENTHS)
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
    dm = AnnDataModule(
        adata,
        fields=Fields(obs_keys=[LABEL]),
        split=TENTHS,
        batch_size=64,
        seed=0,
    )
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
    fresh = AnnDataModule(str(path), fields=Fields(obs_keys=[LABEL]), split=TENTHS)
    fresh.setup()
    assert fresh.dataset.encoders[LABEL] != trained, "without the checkpoint, codes differ"

    new = AnnDataModule(
        str(path),
        fields=Fields(obs_keys=[LABEL], return_index=True),
        split=TENTHS,
        batch_size=64,
    )
    outputs = _trainer(tmp_path).predict(_EchoCodes(), datamodule=new, ckpt_path=ckpt)
    assert new.dataset.encoders[LABEL] == trained
    codes = torch.cat([o["codes"] for o in outputs]).numpy()
    rows = torch.cat([o["index"] for o in outputs]).numpy()
    labels = other.obs[LABEL].to_numpy()[rows]
    np.testing.assert_array_equal(codes, trained.categories.get_indexer(labels))
    np.testing.assert_array_equal(new.decode(LABEL, codes), labels)
    assert new.state_dict()["encoders"][LABEL] == trained.to_dict()


def test_checkpoint_encoders_decode_without_the_column_and_refuse_conflicts(adata):
    dm = AnnDataModule(adata, fields=Fields(obs_keys=[LABEL]), split=TENTHS)
    dm.setup()
    state = dm.state_dict()
    unlabelled = AnnDataModule(adata, split=TENTHS)  # e.g. new cells without annotations
    unlabelled.load_state_dict(state)
    unlabelled.setup()
    assert unlabelled.decode(LABEL, [2, 0]).tolist() == ["undiff", "Mono"]
    assert unlabelled.state_dict()["encoders"] == state["encoders"]  # kept for the next save

    reversed_order = {LABEL: CategoryEncoder(["undiff", "Neu", "Mono"])}
    conflicting = AnnDataModule(
        adata,
        fields=Fields(obs_keys=[LABEL], encoders=reversed_order),
        split=TENTHS,
    )
    conflicting.setup()
    with pytest.raises(ValueError, match="other categories than the checkpoint"):
        conflicting.load_state_dict(state)

    fewer = adata.copy()
    fewer.obs[LABEL] = fewer.obs[LABEL].cat.rename_categories({"Neu": "Neutrophil"})
    unknown = AnnDataModule(fewer, fields=Fields(obs_keys=[LABEL]), split=TENTHS)
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
    trained = AnnDataModule(adata, fields=Fields(obs_keys=[LABEL]), split=TENTHS)
    trained.setup()
    state = trained.state_dict()  # holds the encoder of LABEL only
    donors = adata.copy()
    donors.obs["Donor"] = pd.Categorical(np.where(np.arange(300) % 2, "d1", "d2"))
    dm = AnnDataModule(
        donors,
        fields=Fields(obs_keys=[LABEL, "Donor"], encoders={"Donor": CategoryEncoder(["d1"])}),
        split=TENTHS,
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
        fields=Fields(
            obs_keys=[LABEL, "Well"],
            obsm_keys=["X_pca"],
            return_index=True,
            dtype=torch.float64,
            obsm_dtype=torch.float16,
            obs_dtypes={"Well": torch.int32},
            encoders={LABEL: order},
        ),
        split=TENTHS,
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
    dm = AnnDataModule(adata, fields=Fields(return_index=True), split=TENTHS, seed=0)
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
    dm = AnnDataModule(adata, split=TENTHS, batch_size=37)
    predictions = _trainer(tmp_path).predict(_Linear(), datamodule=dm)
    out = dm.write_predictions(predictions, key="X_pred")
    assert "X_pred" not in adata.obsm, "the user's AnnData must stay untouched"
    dense = adata.X.toarray()
    np.testing.assert_allclose(out.obsm["X_pred"][:, 0], dense.sum(1), rtol=1e-5)
    np.testing.assert_allclose(out.obsm["X_pred"][:, 1], dense.max(1), rtol=1e-6)
    one_d = dm.write_predictions([p[:, 0] for p in predictions], key="row_sum")
    np.testing.assert_allclose(one_d.obs["row_sum"].to_numpy(), dense.sum(1), rtol=1e-5)


class _Outputs(pl.LightningModule):
    """predict_step returns a tensor, a tuple or a dict of what identifies each cell."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def predict_step(self, batch, batch_idx):
        rows, codes = batch["index"], batch[LABEL]
        scores = torch.nn.functional.one_hot(codes, 3).float()  # "probabilities" of the label
        if self.kind == "tensor":
            return scores
        if self.kind == "tuple":
            return scores, codes, rows.double()
        return {"scores": scores, "codes": codes, "row": rows.double()}


def _predict(adata, tmp_path, kind, split="predict", **kw):
    dm = AnnDataModule(
        adata, fields=Fields(obs_keys=[LABEL], return_index=True), split=TENTHS, batch_size=64
    )
    dm.setup("predict")
    loader = dm.loader(split)
    predictions = _trainer(tmp_path).predict(_Outputs(kind), dataloaders=loader)
    return dm, predictions


def test_write_predictions_key_rule_for_tensor_tuple_and_dict(adata, tmp_path):
    labels = adata.obs[LABEL].to_numpy()
    dm, tensor = _predict(adata, tmp_path, "tensor")
    out = dm.write_predictions(tensor, key="X_mine")
    codes = dm.encoders[LABEL].encode(labels)
    np.testing.assert_array_equal(out.obsm["X_mine"].argmax(1), codes)
    with pytest.raises(TypeError, match="predict_step returns a tensor: pass key= a string"):
        dm.write_predictions(tensor)

    _, pieces = _predict(adata, tmp_path, "tuple")
    out = dm.write_predictions(pieces, key=["X_scores", "code", "row"])
    np.testing.assert_array_equal(out.obsm["X_scores"].argmax(1), codes)
    np.testing.assert_array_equal(out.obs["code"].to_numpy(), codes)
    np.testing.assert_array_equal(out.obs["row"].to_numpy(), np.arange(adata.n_obs))
    with pytest.raises(TypeError, match="tuple of 3 tensors: pass key= a list of 3 names"):
        dm.write_predictions(pieces, key="X_mine")

    _, named = _predict(adata, tmp_path, "dict")
    out = dm.write_predictions(named)  # key=None: every entry under its own name
    assert {"codes", "row"} <= set(out.obs) and "scores" in out.obsm
    out = dm.write_predictions(named, key={"scores": "X_mine"})  # only what key names
    written = set(out.obs) | set(out.obsm)
    assert "X_mine" in written and not {"scores", "codes", "row"} & written
    # a string key cannot name a dict's entries: an error, not silently ignored
    with pytest.raises(TypeError, match=r"returns a dict \(\['scores', 'codes', 'row'\]\)"):
        dm.write_predictions(named, key="X_mine")
    with pytest.raises(KeyError, match=r"names outputs \['missing'\]"):
        dm.write_predictions(named, key={"missing": "x"})

    arrays = dm.prediction_arrays(named)
    np.testing.assert_array_equal(arrays["row"], np.arange(adata.n_obs))
    scores, code, row = dm.prediction_arrays(pieces)
    np.testing.assert_array_equal(code, codes)
    np.testing.assert_array_equal(scores.argmax(1), codes)
    np.testing.assert_array_equal(row, np.arange(adata.n_obs))


def test_class_predictions_as_scanpy_expects_with_missing_cells(adata, tmp_path):
    dm, named = _predict(adata, tmp_path, "dict", split="test")
    test = dm.splits["test"]
    out = dm.write_predictions(
        named,
        key={"codes": "predicted", "scores": "proba"},
        labels={"predicted": LABEL, "proba": LABEL},
        split="test",
    )
    categories = list(dm.encoders[LABEL].categories)
    for column in ("predicted", "proba"):  # codes and per-class scores both give labels
        assert isinstance(out.obs[column].dtype, pd.CategoricalDtype)
        assert list(out.obs[column].cat.categories) == categories
        np.testing.assert_array_equal(
            out.obs[column].iloc[test].astype(str), adata.obs[LABEL].iloc[test].astype(str)
        )
        others = np.setdiff1d(np.arange(adata.n_obs), test)
        assert out.obs[column].iloc[others].isna().all(), "no prediction: a missing label"
    assert np.isnan(out.obsm["proba"][others]).all() and not np.isnan(out.obsm["proba"][test]).any()
    trained = dm.encoders[LABEL].encode(adata.obs[LABEL].iloc[test])
    np.testing.assert_array_equal(out.obsm["proba"][test].argmax(1), trained)
    row = dm.write_predictions(named, key={"row": "row"}, split="test").obs["row"]
    assert row.isna().sum() == len(others) and row.dtype == np.float64
    code = dm.write_predictions(named, key={"codes": "code"}, split="test").obs["code"]
    assert str(code.dtype) == "Int64" and code.isna().sum() == len(others)
    # decode does not fail on cells without a prediction
    decoded = dm.decode(LABEL, code)
    assert all(label is None for label in decoded[others])
    np.testing.assert_array_equal(decoded[test], adata.obs[LABEL].to_numpy()[test])
    # the written AnnData saves and reads back as h5ad
    path = tmp_path / "predicted.h5ad"
    out.write_h5ad(path)
    assert ad.read_h5ad(path).obs["predicted"].isna().sum() == len(others)


def test_label_errors_name_the_problem(adata, tmp_path):
    dm, named = _predict(adata, tmp_path, "dict")
    with pytest.raises(KeyError, match="labels: no encoder for obs column 'Well'"):
        dm.write_predictions(named, labels={"codes": "Well"})
    with pytest.raises(ValueError, match="must be integer label codes"):
        dm.write_predictions(named, labels={"row": LABEL})
    with pytest.raises(KeyError, match=r"labels= names \['nope'\], which are not written"):
        dm.write_predictions(named, labels={"nope": LABEL})
    with pytest.raises(TypeError, match="names one label column, but 3 outputs"):
        dm.write_predictions(named, labels=LABEL)
    bad = [{"codes": p["codes"] + 5} for p in named]
    with pytest.raises(ValueError, match=r"outside the 3 labels"):
        dm.write_predictions(bad, labels={"codes": LABEL})
    with pytest.raises(TypeError, match="predict_step must return a tensor, a tuple"):
        dm.write_predictions([np.zeros(3)] * len(named), key="x")


class _Logs(pl.LightningModule):
    """No validation_step, no on_after_batch_transfer; logs without batch_size."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(40, 3)
        self.seen_dense = []

    def training_step(self, batch, batch_idx):
        self.seen_dense.append(batch["X"].layout == torch.strided)
        loss = torch.nn.functional.cross_entropy(self.net(batch["X"]), batch[LABEL])
        self.log("loss", loss, on_epoch=True)  # Lightning infers the batch size
        return loss

    def predict_step(self, batch, batch_idx):
        return self.net(batch["X"]).argmax(1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


NOISE = (
    "but have no `validation_step`",
    "Couldn't infer the batch indices",
    "ambiguous collection",
    "overridden `on_after_batch_transfer`",
)


def _noise(record):
    return [str(w.message) for w in record if any(n in str(w.message) for n in NOISE)]


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse-densified"])
def test_fit_and_predict_raise_no_lightning_warnings_of_our_making(adata, tmp_path, sparse):
    from torch_adata.cli import AnnDataPredictionWriter

    fields = Fields(obs_keys=[LABEL], sparse=sparse, densify=sparse)
    dm = AnnDataModule(adata, fields=fields, batch_size=64)
    model = _Logs()  # sparse: densified by the data module, not by a hook of the model
    writer = AnnDataPredictionWriter(tmp_path / "out.h5ad", key="predicted", decode={})
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer = _trainer(tmp_path, max_epochs=1, callbacks=[writer])
        trainer.fit(model, datamodule=dm)
        trainer.predict(model, datamodule=dm)
    assert _noise(record) == []
    assert all(model.seen_dense), "the model got dense batches"
    assert len(ad.read_h5ad(tmp_path / "out.h5ad").obs["predicted"]) == adata.n_obs
    # the control: asking for a validation split that the model cannot use still warns
    asked = AnnDataModule(adata, fields=fields, split=Split(val_size=0.1), batch_size=64)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _trainer(tmp_path, max_epochs=1).fit(_Logs(), datamodule=asked)
    assert any("but have no `validation_step`" in m for m in _noise(record))


def test_loaders_exist_only_for_the_splits_asked_for(adata):
    plain = AnnDataModule(adata)
    assert plain.val_dataloader is None and plain.test_dataloader is None
    held = AnnDataModule(adata, split=Split(holdout={"Well": [2]}), batch_size=64)
    held.setup()
    assert held.val_dataloader is None
    held_out = sum(len(batch) for batch in held.test_dataloader())  # X only: plain tensors
    assert held_out == (adata.obs["Well"] == 2).sum()
    model = _Logs()
    model.validation_step = lambda batch, batch_idx: None
    with pytest.raises(ValueError, match=r"trainer.validate needs a val split.*Split\(val_size"):
        pl.Trainer(logger=False, enable_progress_bar=False).validate(model, datamodule=plain)
    with pytest.raises(ValueError, match=r"densify=True\) densifies sparse batches.*sparse=True"):
        Fields(densify=True)


def test_workers_cover_train_split_once(adata):
    dm = AnnDataModule(
        adata,
        fields=Fields(return_index=True),
        split=TENTHS,
        batch_size=20,
        num_workers=2,
        loader=Loader(multiprocessing_context="fork"),
    )
    dm.setup()
    loader = dm.train_dataloader()
    assert loader.persistent_workers  # the default with workers: they start once
    respawning = AnnDataModule(adata, num_workers=2, loader=Loader(persistent_workers=False))
    respawning.setup()
    assert not respawning.train_dataloader().persistent_workers
    no_workers = AnnDataModule(adata)
    no_workers.setup()
    assert not no_workers.train_dataloader().persistent_workers
    for _ in range(2):
        rows = np.concatenate(_rows_of(loader))
        assert np.array_equal(np.sort(rows), dm.splits["train"])


@pytest.mark.slow
def test_time_resolved_population_batches_respect_holdout(adata):
    dm = AnnDataModule(
        adata,
        fields=Fields(X=False, obsm_keys=["X_pca"], return_index=True),
        time=TimeSampling(time_key="Time point", cells_per_time=10),
        split=Split(holdout={"Time point": [4]}, val_size=0.0, test_size=0.0),
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
        fields=Fields(obs_keys=["Cell type annotation"]),
        split=TENTHS,
        batch_size=64,
        load_kwargs={"n_cells": 600, "n_genes": 50, "seed": 0},
    )
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    # 480 train cells in batches of 64: 7 of 64 and a last one of 32
    assert batch["X"].shape == (64, 50)
    assert [len(b["X"]) for b in dm.train_dataloader()] == [64] * 7 + [32]
    assert dm.adata.n_obs == len(dm.dataset)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"batch_size": 0}, ValueError, "batch_size must be >= 1"),
        ({"num_workers": -1}, ValueError, "num_workers must be >= 0"),
        ({"loader": {"sampler": "random"}}, ValueError, "sampler must be"),
        ({"fields": {"obs_keys": ["donor"]}}, KeyError, "Unknown obs column 'donor'"),
        ({}, ValueError, r"test split is empty: ask for one with split=Split\(test_size=0.1\)"),
        (
            {"fields": {"obs_key": ["a"]}},
            TypeError,
            r"fields= has unknown option\(s\) \['obs_key'\]",
        ),
        ({"fields": 3}, TypeError, "fields= must be a torch_adata.Fields or a dict"),
        ({"time": {"mode": "initial"}}, TypeError, "time_key"),
        # the former flat keywords name their new place
        ({"obs_keys": ["a"]}, TypeError, r"obs_keys= -> fields=Fields\(obs_keys=...\)"),
        ({"val_size": 0.2}, TypeError, r"val_size= -> split=Split\(val_size=...\)"),
        ({"split_indices": {}}, TypeError, r"split=Split\(indices=...\)"),
        ({"sampling": "initial"}, TypeError, r"time=TimeSampling\(time_key=..., mode=...\)"),
        ({"shuffle": False}, TypeError, r"loader=Loader\(shuffle=...\)"),
        ({"colour": 1}, TypeError, "unknown keyword 'colour'"),
    ],
)
def test_bad_arguments(adata, kwargs, error, match):
    with pytest.raises(error, match=match):
        dm = AnnDataModule(adata, **kwargs)
        dm.setup()
        dm.loader("test")


def test_source_is_required():
    # no dataset is assumed: AnnDataModule() must not fall back to simulated data
    with pytest.raises(TypeError, match="source"):
        AnnDataModule()


def test_unknown_source_names_the_choices():
    dm = AnnDataModule("not-a-dataset")
    with pytest.raises((KeyError, ValueError, FileNotFoundError), match="simulated"):
        dm.setup()


class _GeneWeights(pl.LightningModule):
    """The smallest model whose predictions depend on each gene's column."""

    def __init__(self, n_vars: int):
        super().__init__()
        self.layer = torch.nn.Linear(n_vars, 3)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).square().mean()

    def predict_step(self, batch, batch_idx):
        return self.layer(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_checkpoint_aligns_the_genes_of_new_data_by_name(adata, tmp_path):
    adata.var_names = [f"g{i}" for i in range(adata.n_vars)]
    trainer = pl.Trainer(
        max_epochs=1, logger=False, enable_progress_bar=False, default_root_dir=tmp_path
    )
    model = _GeneWeights(adata.n_vars)
    trainer.fit(model, datamodule=AnnDataModule(adata, batch_size=64))
    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    assert torch.load(ckpt, weights_only=True)["AnnDataModule"]["var_names"][:2] == ["g0", "g1"]

    def predict(data, **fields):
        dm = AnnDataModule(data, fields=Fields(**fields), batch_size=64)
        out = trainer.predict(model, datamodule=dm, ckpt_path=ckpt)
        return torch.cat(out).numpy()

    expected = predict(adata)
    order = np.random.default_rng(0).permutation(adata.n_vars)
    assert np.allclose(predict(adata[:, order].copy()), expected, atol=1e-6)
    subset = adata[:, order[:-3]].copy()  # three genes the model knows are missing
    with pytest.raises(ValueError, match=r"3 of the 40"):
        predict(subset)
    with pytest.warns(UserWarning, match="3"):
        filled = predict(subset, fill_missing=True)
    assert filled.shape == expected.shape and np.isfinite(filled).all()
