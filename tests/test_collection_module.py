"""AnnDataModule over a collection of .h5ad files: sources, splits, checkpoints, predictions,
the block sampler's file boundaries, time points per file, and the command line."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
import yaml

from torch_adata import AnnDataModule, Fields, Loader, Split, TimeSampling
from torch_adata.collection import SourceCollection
from torch_adata.splits import fingerprint

SIZES = {"a.h5ad": 60, "b.h5ad": 45, "c.h5ad": 75}
N = sum(SIZES.values())
GENES = [f"g{j}" for j in range(30)]
LABELS = ["x", "y", "z"]
LABEL = "Cell type annotation"  # the examples' label column, so their configs run as they are
CLASSIFIER = "examples/configs/classifier.yaml"
REPO = Path(__file__).parents[1]


def _part(name: str, n: int, seed: int) -> ad.AnnData:
    """One file's cells: values that identify cell and gene, its own gene order (b), genes
    of its own (c), dense (b) or CSR storage."""
    rng = np.random.default_rng(seed)
    genes = list(GENES)
    if name == "b.h5ad":
        genes = list(rng.permutation(GENES))
    if name == "c.h5ad":
        genes = [*GENES, "c_only_1", "c_only_2"]
    dense = rng.random((n, len(genes))).astype(np.float32) * (rng.random((n, len(genes))) < 0.4)
    dense[:, 0] += np.arange(n, dtype=np.float32) + 100 * seed  # distinct row sums
    obs = pd.DataFrame(
        {
            LABEL: pd.Categorical(rng.choice(LABELS, n), categories=LABELS),
            "donor": rng.choice(["d1", "d2"], n),
        },
        index=[f"{name[0]}{i}" for i in range(n)],
    )
    X = dense if name == "b.h5ad" else sp.csr_matrix(dense)
    return ad.AnnData(X, obs=obs, var=pd.DataFrame(index=genes))


@pytest.fixture(scope="module")
def parts() -> dict[str, ad.AnnData]:
    return {name: _part(name, n, seed) for seed, (name, n) in enumerate(SIZES.items())}


@pytest.fixture(scope="module")
def folder(tmp_path_factory, parts) -> Path:
    root = tmp_path_factory.mktemp("collection")
    for name, adata in parts.items():
        adata.write_h5ad(root / name)
    (root / "notes.txt").write_text("not a source")  # a folder lists only its .h5ad files
    return root


@pytest.fixture(scope="module")
def paths(folder) -> list[str]:
    return [str(folder / name) for name in SIZES]


def expected_rows(parts, genes) -> np.ndarray:
    """anndata's own rows of every cell, source after source, in the columns ``genes``."""
    blocks = []
    for adata in parts.values():
        x = adata[:, list(genes)].X
        blocks.append(x.toarray() if sp.issparse(x) else np.asarray(x))
    return np.vstack(blocks)


def _trainer(root, **kw) -> pl.Trainer:
    options = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=root,
    )
    return pl.Trainer(**{**options, **kw})


class Recorder(pl.LightningModule):
    """Trains a linear layer; records the rows of each training batch; predicts each cell's
    row sum, its label scores and its position."""

    def __init__(self, n_vars: int = len(GENES)):
        super().__init__()
        self.net = torch.nn.Linear(n_vars, 1)
        self.seen: list[np.ndarray] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["index"].numpy().copy())
        return self.net(batch["X"]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.net(batch["X"]).pow(2).mean(), batch_size=len(batch["X"]))

    def predict_step(self, batch, batch_idx):
        out = {"row_sum": batch["X"].sum(1), "row": batch["index"].double()}
        if LABEL in batch:
            out["scores"] = torch.nn.functional.one_hot(batch[LABEL], len(LABELS)).float()
        return out

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


# -- sources --------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["list", "folder", "glob", "mapping"])
@pytest.mark.parametrize("backed", [True, False])
def test_every_form_of_source_reads_every_cell_as_anndata_does(
    form, backed, folder, paths, parts, tmp_path
):
    source = {
        "list": paths,
        "folder": str(folder),
        "glob": str(folder / "*.h5ad"),
        "mapping": {f"sample_{n[0]}": p for n, p in zip(SIZES, paths, strict=True)},
    }[form]
    dm = AnnDataModule(
        source, fields=Fields(return_index=True, obs_keys=["source"]), batch_size=32, backed=backed
    )
    dm.setup("predict")
    collection = dm.collection
    assert isinstance(collection, SourceCollection) and dm.is_collection
    keys = list(source) if form == "mapping" else list(SIZES)
    assert collection.keys == keys
    np.testing.assert_array_equal(collection.offsets, [0, 60, 105, 180])
    assert list(dm.dataset.var_names) == GENES  # inner join, in the first file's order
    # backed= holds per file: rows read from the files, or their matrices loaded
    assert all(s._load is not backed for s in collection.sources)
    batches = list(dm.predict_dataloader())
    rows = np.concatenate([b["index"].numpy() for b in batches])
    np.testing.assert_array_equal(rows, np.arange(N))
    x = np.concatenate([b["X"].numpy() for b in batches])
    np.testing.assert_allclose(x, expected_rows(parts, GENES), rtol=1e-6)
    codes = np.concatenate([b["source"].numpy() for b in batches])
    np.testing.assert_array_equal(codes, np.repeat([0, 1, 2], list(SIZES.values())))
    assert list(dm.decode("source", [0, 2])) == [keys[0], keys[2]]
    # the source is saved as plain values, so a checkpoint rebuilds the module
    expected = {"list": paths, "folder": str(folder), "glob": str(folder / "*.h5ad")}
    assert dm.hparams["source"] == expected.get(form, source)


def test_anndata_objects_in_a_collection_are_read_and_not_saved(parts, paths):
    in_memory = list(parts.values())
    dm = AnnDataModule([in_memory[0], paths[1], in_memory[2]], fields=Fields(return_index=True))
    dm.setup()
    assert dm.collection.keys == ["adata0", "b.h5ad", "adata2"]
    assert "source" not in dm.hparams  # AnnData objects are not saved with a checkpoint
    batch = dm.dataset[np.array([0, 61, 179])]
    np.testing.assert_allclose(batch["X"].numpy(), expected_rows(parts, GENES)[[0, 61, 179]])


def test_outer_join_and_a_collection_without_preprocess(paths, parts):
    dm = AnnDataModule(paths, fields=Fields(join="outer"))
    dm.setup()
    assert list(dm.dataset.var_names) == [*GENES, "c_only_1", "c_only_2"]
    x = dm.dataset[np.array([0, 179])].numpy()
    assert x[0, -2:].tolist() == [0.0, 0.0]  # a gene file a lacks reads as 0
    np.testing.assert_allclose(x[1, -2:], parts["c.h5ad"].X[74, -2:].toarray()[0])
    with pytest.raises(ValueError, match=r"preprocess= runs on one AnnData.*preprocess each file"):
        AnnDataModule(paths, preprocess={"n_pcs": 5}).setup()


# -- splits ---------------------------------------------------------------------------------------


def test_splits_random_stratified_and_held_out_by_value_and_by_source(paths):
    def splits(**kw):
        dm = AnnDataModule(paths, split=Split(**kw), seed=5)
        dm.setup("fit")
        return dm, dm.splits

    dm, random = splits(val_size=0.2, test_size=0.1)
    assert (len(random["val"]), len(random["test"])) == (36, 18)
    union = np.concatenate([random[k] for k in ("train", "val", "test")])
    np.testing.assert_array_equal(np.sort(union), np.arange(N))
    _, again = splits(val_size=0.2, test_size=0.1)
    np.testing.assert_array_equal(again["val"], random["val"])  # seeded

    dm, stratified = splits(val_size=0.2, test_size=0.2, stratify_key=LABEL)
    label = dm.dataset.obs[LABEL].to_numpy()
    for name in ("val", "test"):
        share = pd.Series(label[stratified[name]]).value_counts(normalize=True)
        overall = pd.Series(label).value_counts(normalize=True)
        assert (share - overall).abs().max() < 0.05

    dm, donor = splits(val_size=0.1, test_size=0.0, holdout={"donor": ["d2"]})
    np.testing.assert_array_equal(
        donor["test"], np.flatnonzero(dm.dataset.obs["donor"].to_numpy() == "d2")
    )

    _, by_source = splits(val_size=0.1, test_size=0.0, holdout={"source": ["b.h5ad"]})
    np.testing.assert_array_equal(by_source["test"], np.arange(60, 105))
    assert not np.isin(by_source["train"], np.arange(60, 105)).any()
    with pytest.raises(ValueError, match=r"holdout values \['d.h5ad'\] of obs column 'source'"):
        splits(holdout={"source": ["d.h5ad"]})


@pytest.mark.slow
def test_training_on_a_collection_never_sees_a_held_out_source(paths, tmp_path):
    dm = AnnDataModule(
        paths,
        fields=Fields(return_index=True),
        split=Split(val_size=0.1, holdout={"source": ["c.h5ad"]}),
        batch_size=16,
        num_workers=2,  # forked DataLoader workers read the files too
        seed=1,
    )
    model = Recorder()
    _trainer(tmp_path, max_epochs=2).fit(model, datamodule=dm)
    seen = np.concatenate(model.seen)
    assert len(seen) == 2 * len(dm.splits["train"])
    np.testing.assert_array_equal(np.sort(seen[: len(seen) // 2]), dm.splits["train"])
    assert dm.collection.source_of(seen).tolist().count("c.h5ad") == 0
    assert model.trainer.callback_metrics["val_loss"] >= 0


# -- checkpoints ----------------------------------------------------------------------------------


def test_the_fingerprint_holds_the_sources_keys_and_sizes():
    names = [f"c{i}" for i in range(10)]
    one = fingerprint(names)
    assert set(one) == {"n_obs", "obs_names_sha256"}  # as before for one AnnData
    two = fingerprint(names, [("a.h5ad", 4), ("b.h5ad", 6)])
    assert two["n_sources"] == 2 and two["obs_names_sha256"] == one["obs_names_sha256"]
    assert fingerprint(names, [("a.h5ad", 4), ("b.h5ad", 6)]) == two
    for other in ([("a.h5ad", 5), ("b.h5ad", 5)], [("x.h5ad", 4), ("b.h5ad", 6)]):
        assert fingerprint(names, other)["sources_sha256"] != two["sources_sha256"]


def _fit_checkpoint(source, tmp_path) -> tuple[AnnDataModule, Path]:
    dm = AnnDataModule(
        source,
        fields=Fields(return_index=True),
        split=Split(val_size=0.1, test_size=0.1),
        batch_size=32,
        seed=3,
    )
    trainer = _trainer(tmp_path, max_epochs=1, limit_val_batches=0)
    trainer.fit(Recorder(), datamodule=dm)
    ckpt = tmp_path / "collection.ckpt"
    trainer.save_checkpoint(ckpt)
    return dm, ckpt


@pytest.mark.slow
def test_a_checkpoint_split_is_restored_only_onto_the_same_collection(paths, parts, tmp_path):
    dm, ckpt = _fit_checkpoint(paths, tmp_path)
    saved = torch.load(ckpt, weights_only=True)["AnnDataModule"]["data"]
    assert saved["n_sources"] == 3
    rebuilt = AnnDataModule.load_from_checkpoint(ckpt, weights_only=True)  # paths saved
    rebuilt.setup("fit")
    assert rebuilt.collection.keys == list(SIZES)
    np.testing.assert_array_equal(rebuilt.splits["val"], dm.splits["val"])
    # the same files (here as a mapping with the same keys): the split comes back
    same = AnnDataModule(
        dict(zip(SIZES, paths, strict=True)),
        fields=Fields(return_index=True),
        split=Split(val_size=0.1, test_size=0.1),
        batch_size=32,
        seed=99,
    )
    _trainer(tmp_path, max_epochs=2, limit_val_batches=0).fit(
        Recorder(), datamodule=same, ckpt_path=ckpt
    )
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(same.splits[name], dm.splits[name])
    # the same cells, names and order, cut into other files: not the same data
    cells = ad.concat(list(parts.values()), join="inner")
    moved = tmp_path / "moved"
    moved.mkdir()
    cells[:100].write_h5ad(moved / "a.h5ad")
    cells[100:].write_h5ad(moved / "b.h5ad")
    one = tmp_path / "all.h5ad"
    cells.write_h5ad(one)
    for other, what in ((str(moved), "a collection of 3 sources"), (str(one), "a collection")):
        resumed = AnnDataModule(
            other, fields=Fields(return_index=True), split=Split(val_size=0.1), seed=3
        )
        with pytest.raises(ValueError, match=f"split was drawn on other sources .*{what}"):
            _trainer(tmp_path, max_epochs=2, limit_val_batches=0).fit(
                Recorder(), datamodule=resumed, ckpt_path=ckpt
            )


# -- predictions ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_predictions_into_one_anndata_and_back_into_each_source(paths, parts, tmp_path):
    dm = AnnDataModule(
        paths,
        fields=Fields(obs_keys=[LABEL], return_index=True),
        split=Split(val_size=0.1),
        batch_size=32,
    )
    predictions = _trainer(tmp_path).predict(Recorder(), datamodule=dm)
    row_sums = expected_rows(parts, GENES).sum(1)

    written = dm.write_predictions(predictions, labels={"scores": LABEL})
    assert written.n_obs == N and written.X is None
    assert list(written.obs_names) == [n for a in parts.values() for n in a.obs_names]
    assert list(written.obs["source"]) == [k for k, n in SIZES.items() for _ in range(n)]
    np.testing.assert_allclose(written.obs["row_sum"].to_numpy(), row_sums, rtol=1e-5)
    np.testing.assert_array_equal(written.obs["row"].to_numpy(), np.arange(N))
    truth = pd.concat([a.obs[LABEL] for a in parts.values()]).astype(str).to_numpy()
    np.testing.assert_array_equal(written.obs["scores"].astype(str).to_numpy(), truth)
    assert list(written.var_names) == GENES

    per_source = dm.write_predictions(predictions, labels={"scores": LABEL}, per_source=True)
    assert list(per_source) == list(SIZES)
    start = 0
    for name, adata in per_source.items():
        original = parts[name]
        assert adata.n_obs == original.n_obs and list(adata.var_names) == list(original.var_names)
        np.testing.assert_allclose(
            adata.obs["row_sum"].to_numpy(), row_sums[start : start + adata.n_obs], rtol=1e-5
        )
        np.testing.assert_array_equal(adata.obs["scores"].astype(str), original.obs[LABEL])
        assert adata.obsm["scores"].shape == (adata.n_obs, len(LABELS))
        assert "row_sum" not in original.obs  # the user's objects stay untouched
        start += adata.n_obs
    # a backed module writes into each file opened backed: X stays on disk, the file as it was
    stamps = [(Path(p).stat().st_mtime_ns, Path(p).stat().st_size) for p in paths]
    backed = AnnDataModule(paths, fields=Fields(return_index=True), batch_size=32, backed=True)
    backed.setup("predict")
    opened = backed.write_predictions(predictions, key={"row": "row"}, per_source=True)
    assert all(adata.isbacked for adata in opened.values())
    np.testing.assert_array_equal(opened["b.h5ad"].obs["row"].to_numpy(), np.arange(60, 105))
    copy = tmp_path / "b_predicted.h5ad"
    opened["b.h5ad"].write_h5ad(copy)
    saved = ad.read_h5ad(copy)
    np.testing.assert_allclose(saved.X, parts["b.h5ad"].X)
    np.testing.assert_array_equal(saved.obs["row"].to_numpy(), np.arange(60, 105))
    assert [(Path(p).stat().st_mtime_ns, Path(p).stat().st_size) for p in paths] == stamps
    # into AnnData objects of one's own: each source's obs alone
    targets = {k: ad.AnnData(obs=parts[k].obs.copy()) for k in SIZES}
    into = dm.write_predictions(predictions, key={"row": "row"}, adata=targets, per_source=True)
    assert into["c.h5ad"] is targets["c.h5ad"]
    np.testing.assert_array_equal(targets["c.h5ad"].obs["row"].to_numpy(), np.arange(105, 180))


def test_per_source_predictions_check_their_arguments(paths, tmp_path):
    dm = AnnDataModule(paths, fields=Fields(return_index=True), batch_size=64)
    predictions = _trainer(tmp_path).predict(Recorder(), datamodule=dm)
    with pytest.raises(TypeError, match="only per_source=True writes into"):
        dm.write_predictions(predictions, adata={"a.h5ad": None})
    with pytest.raises(ValueError, match=r"adata= has the sources \['a.h5ad'\] but"):
        dm.write_predictions(predictions, adata={"a.h5ad": None}, per_source=True)
    wrong = {k: ad.AnnData(obs=pd.DataFrame(index=[f"x{i}" for i in range(5)])) for k in SIZES}
    with pytest.raises(ValueError, match=r"adata\['a.h5ad'\] has 5 cells but source 'a.h5ad'"):
        dm.write_predictions(predictions, adata=wrong, per_source=True)
    single = AnnDataModule(paths[0], fields=Fields(return_index=True), batch_size=64)
    with pytest.raises(ValueError, match="per_source=True writes each source of a collection"):
        single.write_predictions(predictions, per_source=True)


# -- samplers -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_block_shuffle_blocks_of_a_split_stay_within_a_file(paths, tmp_path):
    dm = AnnDataModule(
        paths,
        fields=Fields(return_index=True),
        split=Split(val_size=0.2),
        loader=Loader(sampler="block", block_size=10, pool_batches=2),
        batch_size=16,
        seed=2,
    )
    dm.setup("fit")
    sampler = dm.train_dataloader().sampler
    train = dm.splits["train"]
    source = dm.collection.source_of
    starts, lengths = sampler._blocks
    assert (lengths < 10).sum() >= 2  # the files' ends cut blocks short
    for start, length in zip(starts, lengths, strict=True):
        assert len(set(source(train[start : start + length]))) == 1
    model = Recorder()
    _trainer(tmp_path, max_epochs=1, limit_val_batches=0).fit(model, datamodule=dm)
    np.testing.assert_array_equal(np.sort(np.concatenate(model.seen)), train)


@pytest.mark.slow
def test_each_file_is_one_time_point(folder, parts, tmp_path):
    days = {"a.h5ad": 2, "b.h5ad": 4, "c.h5ad": 7}
    dm = AnnDataModule(
        str(folder),
        fields=Fields(return_index=True),
        time=TimeSampling(days, cells_per_time=8),
        batch_size=24,
        seed=0,
    )
    model = Recorder()
    _trainer(tmp_path, max_epochs=1, limit_train_batches=4).fit(model, datamodule=dm)
    assert len(model.seen) == 4
    np.testing.assert_array_equal(dm.dataset.time_points, [2, 4, 7])
    batch = next(iter(dm.train_dataloader()))
    files = dm.collection.source_of(batch["index"])
    assert list(files) == ["a.h5ad"] * 8 + ["b.h5ad"] * 8 + ["c.h5ad"] * 8
    np.testing.assert_array_equal(batch["t"].numpy(), np.repeat([2.0, 4.0, 7.0], 8))
    np.testing.assert_allclose(
        batch["X"].numpy(), expected_rows(parts, GENES)[batch["index"].numpy()], rtol=1e-6
    )


# -- the command line -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("form", ["list", "folder"])
def test_the_command_line_takes_a_list_of_paths_or_a_folder(
    form, folder, paths, tmp_path, monkeypatch
):
    """The classifier example's config, its source replaced by a collection."""
    from torch_adata import cli
    from torch_adata.cli import AnnDataPredictionWriter

    monkeypatch.chdir(REPO)
    source = yaml.safe_dump(paths, default_flow_style=True) if form == "list" else str(folder)
    common = [
        "--config",
        CLASSIFIER,
        "--data.source",
        source.strip(),
        "--data.backed",
        "true",
        "--trainer.accelerator",
        "cpu",
        "--trainer.default_root_dir",
        str(tmp_path),
    ]
    fitted = cli.run_cli(["fit", *common, "--trainer.max_epochs", "1"])
    assert fitted.datamodule.collection.keys == list(SIZES)
    assert fitted.datamodule.hparams["source"] == (paths if form == "list" else str(folder))
    checkpoint = fitted.trainer.checkpoint_callback.best_model_path
    predicted = cli.run_cli(["predict", *common, "--ckpt_path", checkpoint])
    writer = next(c for c in predicted.trainer.callbacks if isinstance(c, AnnDataPredictionWriter))
    written = ad.read_h5ad(writer.written_path)
    assert written.n_obs == N and written.X is None
    assert list(written.obs["source"]) == [k for k, n in SIZES.items() for _ in range(n)]
    assert list(written.obs_names) == list(predicted.datamodule.dataset.obs_names)
    assert set(written.obs["predicted"].dropna()) <= set(LABELS)
    np.testing.assert_allclose(written.obsm["class_probabilities"].sum(1), 1.0, rtol=1e-5)


@pytest.mark.slow
def test_the_prediction_writer_saves_one_file_per_source(folder, paths, parts, tmp_path):
    from torch_adata.cli import AnnDataPredictionWriter

    dm = AnnDataModule(
        str(folder), fields=Fields(obs_keys=[LABEL], return_index=True), batch_size=32, backed=True
    )
    writer = AnnDataPredictionWriter(tmp_path / "out", decode={"scores": LABEL}, per_source=True)
    _trainer(tmp_path, callbacks=[writer]).predict(Recorder(), datamodule=dm)
    assert writer.written_path == tmp_path / "out"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(SIZES)
    start = 0
    for name, original in parts.items():
        saved = ad.read_h5ad(tmp_path / "out" / name)
        assert list(saved.obs_names) == list(original.obs_names)
        assert list(saved.var_names) == list(original.var_names)  # each file's own genes
        np.testing.assert_array_equal(saved.obs["scores"].astype(str), original.obs[LABEL])
        np.testing.assert_array_equal(saved.obs["row"], np.arange(start, start + len(saved)))
        start += len(saved)
    into_sources = AnnDataPredictionWriter(folder, per_source=True)
    with pytest.raises(ValueError, match=r"would overwrite the source files \['a.h5ad'"):
        _trainer(tmp_path, callbacks=[into_sources]).predict(Recorder(), datamodule=dm)
    one = AnnDataModule(paths[0], fields=Fields(return_index=True), batch_size=32)
    with pytest.raises(ValueError, match="per_source=True\\) writes one file per source"):
        _trainer(tmp_path, callbacks=[AnnDataPredictionWriter(per_source=True)]).predict(
            Recorder(), datamodule=one
        )


class _FirstGene(Recorder):
    def predict_step(self, batch, batch_idx):
        return {"first_gene": batch["X"][:, 0], "row": batch["index"].double()}


@pytest.mark.slow
def test_a_checkpoint_gives_another_collection_the_genes_in_the_training_order(
    paths, parts, tmp_path
):
    _, ckpt = _fit_checkpoint(paths, tmp_path)  # genes: GENES, the order of a.h5ad
    other = AnnDataModule([paths[1], paths[0]], fields=Fields(return_index=True), batch_size=32)
    outputs = _trainer(tmp_path).predict(_FirstGene(), datamodule=other, ckpt_path=ckpt)
    assert list(other.dataset.var_names) == GENES  # b.h5ad's own order would come first
    first = torch.cat([o["first_gene"] for o in outputs]).numpy()
    expected = expected_rows({k: parts[k] for k in ("b.h5ad", "a.h5ad")}, ["g0"]).ravel()
    np.testing.assert_allclose(first, expected, rtol=1e-6)
