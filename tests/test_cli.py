"""The ``torch-adata`` command: LightningCLI subcommands, the prediction writer, clear errors."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import lightning.pytorch as pl
import numpy as np
import pytest
import tomllib
import torch

import torch_adata as ta
from torch_adata import cli
from torch_adata.cli import AnnDataPredictionWriter

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

REPO = Path(__file__).parents[1]
CLASSIFIER = "examples/configs/classifier.yaml"
LABEL = "Cell type annotation"


def small(root: Path, n_cells: int = 400) -> list[str]:
    """Overrides that keep a CLI run small and write under ``root``."""
    return [
        "--data.load_kwargs.n_cells",
        str(n_cells),
        "--trainer.default_root_dir",
        str(root),
        "--trainer.accelerator",
        "cpu",
    ]


@pytest.fixture
def in_repo(monkeypatch):
    """Run from the repository root, where the configs' relative paths resolve."""
    monkeypatch.chdir(REPO)


def test_pyproject_declares_the_console_script():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["torch-adata"] == "torch_adata.cli:main"


@pytest.mark.slow
def test_fit_test_predict_round_trip_writes_decoded_predictions(tmp_path, in_repo):
    fitted = cli.run_cli(
        ["fit", "--config", CLASSIFIER, "--trainer.max_epochs", "2", *small(tmp_path)]
    )
    assert isinstance(fitted.datamodule, ta.AnnDataModule)
    checkpoint = fitted.trainer.checkpoint_callback.best_model_path
    assert Path(checkpoint).is_file()
    train_rows = fitted.datamodule.splits["train"]

    tested = cli.run_cli(
        ["test", "--config", CLASSIFIER, "--ckpt_path", checkpoint, *small(tmp_path)]
    )
    # the checkpoint's split came back with it, and the sizes were read from the data
    np.testing.assert_array_equal(tested.datamodule.splits["train"], train_rows)
    assert tested.model.hparams.n_genes == 2000 and tested.model.hparams.n_classes == 3
    assert 0.0 <= tested.trainer.callback_metrics["test_macro_f1"] <= 1.0

    predicted = cli.run_cli(
        ["predict", "--config", CLASSIFIER, "--ckpt_path", checkpoint, *small(tmp_path)]
    )
    written = tmp_path / "predictions.h5ad"
    writer = next(c for c in predicted.trainer.callbacks if isinstance(c, AnnDataPredictionWriter))
    assert writer.written_path == written
    adata = ad.read_h5ad(written)
    source = predicted.datamodule.adata
    assert adata.n_obs == 400 and list(adata.obs_names) == list(source.obs_names)
    probabilities = adata.obsm["class_probabilities"]
    np.testing.assert_allclose(probabilities.sum(1), 1.0, rtol=1e-5)
    categories = list(adata.obs[LABEL].cat.categories)
    assert list(adata.obs["predicted"].cat.categories) == categories
    np.testing.assert_array_equal(
        adata.obs["predicted"].to_numpy().astype(str),
        np.asarray(categories)[probabilities.argmax(1)],
    )
    assert "predicted" not in source.obs  # the module's AnnData is left alone


def test_validate_subcommand_runs(tmp_path, in_repo):
    # --trainer.accelerator auto (the config's default too): CUDA when present, else CPU
    args = ["validate", "--config", CLASSIFIER, *small(tmp_path), "--trainer.accelerator", "auto"]
    run = cli.run_cli(args)
    assert "val_loss" in run.trainer.callback_metrics
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert run.trainer.strategy.root_device.type == expected


def test_missing_config_names_the_file_and_the_fix(tmp_path, in_repo):
    with pytest.raises(SystemExit, match=r"config file 'nowhere\.yaml' not found.*relative to"):
        cli.main(["fit", "--config", "nowhere.yaml"])


@pytest.mark.parametrize(
    ("class_path", "message"),
    [
        (
            "torch_adata.models.classifier.NoSuchModel",
            r"'NoSuchModel' .* does not exist.*CellTypeClassifier",
        ),
        ("torch_adata.models.classifier.LABEL", r"'LABEL' .* is not a LightningModule"),
        ("no_such_package.Model", r"cannot import module 'no_such_package'.*current directory"),
    ],
)
def test_wrong_model_class_path_is_a_clear_error(class_path, message, in_repo):
    with pytest.raises(SystemExit, match=message):
        cli.main(["fit", "--config", CLASSIFIER, "--model", class_path])


def test_class_paths_resolve_from_the_current_directory(tmp_path, monkeypatch):
    """A model module beside the user's config, not installed: found because cwd is on sys.path."""
    (tmp_path / "my_models.py").write_text(_TINY_MODEL)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    run = cli.run_cli(
        [
            "fit",
            "--model",
            "my_models.TinyModel",
            "--data.source",
            "simulated",
            "--data.fields.obs_keys",
            f"[{LABEL}]",
            "--data.load_kwargs",
            "{n_cells: 200}",
            "--trainer.fast_dev_run",
            "true",
            "--trainer.accelerator",
            "cpu",
        ]
    )
    assert type(run.model).__module__ == "my_models"
    assert run.trainer.state.finished


_TINY_MODEL = """
import lightning.pytorch as pl
import torch


class TinyModel(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2000, 3)

    def training_step(self, batch, batch_idx):
        logits = self.layer(batch["X"])
        return torch.nn.functional.cross_entropy(logits, batch["Cell type annotation"])

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)
"""


class ConstantPredictor(pl.LightningModule):
    """Predicts a fixed tensor (or dict) per batch: what the writer does with it is under test."""

    def __init__(self, as_dict: bool = False):
        super().__init__()
        self.as_dict = as_dict

    def predict_step(self, batch, batch_idx):
        n = len(batch[LABEL])
        if self.as_dict:
            return {"p": batch[LABEL]}  # 1-D codes
        return torch.stack([batch[LABEL].float(), torch.ones(n)], dim=1)


def predict_with(writer: AnnDataPredictionWriter, model, root: Path, dm) -> None:
    trainer = pl.Trainer(accelerator="cpu", logger=False, callbacks=[writer], default_root_dir=root)
    trainer.predict(model, datamodule=dm)


def test_writer_places_rows_in_anndata_order_and_checks_its_arguments(tmp_path):
    dm = ta.AnnDataModule(
        "simulated", fields=ta.Fields(obs_keys=[LABEL]), batch_size=30, load_kwargs={"n_cells": 100}
    )
    with pytest.raises(ValueError, match="give the writer a key"):
        predict_with(AnnDataPredictionWriter(), ConstantPredictor(), tmp_path, dm)

    predict_with(AnnDataPredictionWriter(key="X_two"), ConstantPredictor(), tmp_path, dm)
    adata = ad.read_h5ad(tmp_path / "predictions.h5ad")  # the default path
    codes = dm.dataset.encoders[LABEL].encode(adata.obs[LABEL])
    np.testing.assert_array_equal(adata.obsm["X_two"][:, 0], codes)  # rows in place
    np.testing.assert_array_equal(adata.obsm["X_two"][:, 1], 1.0)

    path = tmp_path / "sub" / "decoded.h5ad"
    writer = AnnDataPredictionWriter(path, key={"p": "label_again"}, decode={"label_again": LABEL})
    predict_with(writer, ConstantPredictor(as_dict=True), tmp_path, dm)
    adata = ad.read_h5ad(path)
    assert adata.obs["label_again"].equals(adata.obs[LABEL].rename("label_again"))

    wrong = AnnDataPredictionWriter(key={"p": "p"}, decode={"p": "Well"})
    with pytest.raises(KeyError, match="no encoder for obs column 'Well'"):
        predict_with(wrong, ConstantPredictor(as_dict=True), tmp_path, dm)


def test_writer_copies_a_backed_file_and_says_where(tmp_path, caplog):
    source = tmp_path / "cells.h5ad"
    ta.datasets.simulated(n_cells=120, n_genes=40).write_h5ad(source)
    dm = ta.AnnDataModule(source, fields=ta.Fields(obs_keys=[LABEL]), batch_size=50, backed=True)
    out = tmp_path / "out.h5ad"
    with caplog.at_level(logging.INFO):
        predict_with(AnnDataPredictionWriter(out, key="X_two"), ConstantPredictor(), tmp_path, dm)
    assert f"torch-adata: predictions of 120 cells written to {out}" in caplog.text
    written, original = ad.read_h5ad(out), ad.read_h5ad(source)
    codes = dm.dataset.encoders[LABEL].encode(original.obs[LABEL])
    np.testing.assert_array_equal(written.obsm["X_two"][:, 0], codes)
    assert (written.X != original.X).nnz == 0 and "X_two" not in original.obsm


@pytest.mark.slow
def test_console_script_runs_in_a_subprocess(tmp_path):
    # the one installed beside this interpreter (pip install -e .), else one on PATH
    script = shutil.which("torch-adata", path=str(Path(sys.executable).parent)) or shutil.which(
        "torch-adata"
    )
    if script is None:
        pytest.skip("the torch-adata console script is not installed (pip install -e .)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout's torch_adata
    done = subprocess.run(
        [script, "fit", "--config", CLASSIFIER, "--trainer.fast_dev_run", "true", *small(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "`Trainer.fit` stopped: `max_steps=1` reached" in done.stderr + done.stdout


def console_script() -> str:
    """The torch-adata script installed beside this interpreter, else one on PATH."""
    script = shutil.which("torch-adata", path=str(Path(sys.executable).parent)) or shutil.which(
        "torch-adata"
    )
    if script is None:
        pytest.skip("the torch-adata console script is not installed (pip install -e .)")
    return script


def test_version(capsys):
    cli.main(["--version"])
    assert capsys.readouterr().out.strip() == f"torch-adata {ta.__version__}"
    done = subprocess.run(
        [console_script(), "--version"],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stdout.strip() == f"torch-adata {ta.__version__}"


def test_console_script_without_jsonargparse_says_how_to_install_it(tmp_path):
    # a core install: jsonargparse cannot be imported (a sitecustomize blocks it)
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['jsonargparse'] = None\n")
    done = subprocess.run(
        [console_script(), "fit", "--config", CLASSIFIER],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(REPO)])},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "torch-adata: the command line needs jsonargparse, from the `cli` extra" in done.stderr
    assert "pip install 'torch-adata[cli]'" in done.stderr
    # the Python API still imports and the class says the same
    check = subprocess.run(
        [
            sys.executable,
            "-c",
            "import torch_adata.cli as c\ntry:\n    c.AnnDataCLI([])\n"
            "except ModuleNotFoundError as e:\n    print(e)",
        ],
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(REPO)])},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "pip install 'torch-adata[cli]'" in check.stdout, check.stderr[-3000:]
