"""The classifier example (torch_adata/models/classifier.py, run by examples/classifier.py): trains through AnnDataModule (Python API and CLI), beats the majority
class, writes decoded predictions, probabilities, metrics and a checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import cli_args, load_example
from torch.utils.data import DataLoader, TensorDataset

from torch_adata import cli

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

REPO = Path(__file__).parents[1]
LABEL = "Cell type annotation"


def test_fast_dev_run_through_the_python_api_writes_nothing(tmp_path):
    metrics = load_example("classifier").run(
        tmp_path, n_cells=300, n_genes=200, accelerator="cpu", fast_dev_run=True
    )
    assert set(metrics) == {"test_accuracy", "test_macro_f1", "device"}
    assert metrics["device"] == "cpu"
    # fast_dev_run predicts nothing and writes no metrics
    assert not (tmp_path / "predictions.h5ad").exists()
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.slow
def test_short_cli_fit_beats_the_majority_class(tmp_path, monkeypatch):
    """Seeds 0-4 at 800 cells x 200 genes, 5 epochs (CPU), measured before setting the margin:
    test accuracy 0.80-0.86 against a majority class of 0.45-0.48 (gap 0.33-0.40).
    Threshold: a gap of at least 0.20."""
    monkeypatch.chdir(REPO)
    small = ["--data.load_kwargs", "{n_cells: 800, n_genes: 200}", "--trainer.max_epochs", "5"]
    config = "examples/configs/classifier.yaml"
    fitted = cli.run_cli(["fit", *cli_args(config, tmp_path, *small)])
    (checkpoint,) = tmp_path.rglob("*.ckpt")
    dm = fitted.datamodule
    test = fitted.trainer.test(fitted.model, datamodule=dm, verbose=False)[0]
    majority = load_example("classifier").majority_baseline(
        dm.adata.obs[LABEL].to_numpy()[dm.splits["test"]]
    )
    assert test["test_accuracy"] >= majority["accuracy"] + 0.20
    assert test["test_macro_f1"] >= majority["macro_f1"] + 0.20
    assert checkpoint.stat().st_size > 0


@pytest.mark.slow
def test_classifier_clearly_beats_the_majority_class(tmp_path):
    """Seeds 0-4 at 1,500 cells x 2,000 genes, 3 epochs (CPU), measured before setting margins:
    test accuracy 0.926-0.967 against a majority class of 0.463-0.497 (gap 0.443-0.480),
    macro-F1 0.927-0.966 against the majority predictor's 0.211-0.221. Thresholds: a gap of
    at least 0.30 in accuracy and a macro-F1 of at least 0.75."""
    example = load_example("classifier")
    args = ["--n-cells", "1500", "--max-epochs", "3", "--seed", "0", "--accelerator", "cpu"]
    metrics = example.main(["--out", str(tmp_path), *args])
    assert metrics["test_accuracy"] >= metrics["majority_class_accuracy"] + 0.30
    assert metrics["test_macro_f1"] >= 0.75 > metrics["majority_class_macro_f1"]
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert Path(metrics["checkpoint"]).is_file()

    adata = ad.read_h5ad(tmp_path / "predictions.h5ad")
    probabilities = adata.obsm["class_probabilities"]
    assert probabilities.shape == (1500, 3)
    np.testing.assert_allclose(probabilities.sum(1), 1.0, rtol=1e-5)
    categories = np.asarray(adata.obs[LABEL].cat.categories)
    predicted = adata.obs["predicted"]
    assert list(predicted.cat.categories) == list(categories)
    np.testing.assert_array_equal(predicted.to_numpy(), categories[probabilities.argmax(1)])
    agree = (predicted.astype(str) == adata.obs[LABEL].astype(str)).to_numpy()
    assert agree.mean() >= metrics["majority_class_accuracy"] + 0.30  # over every cell

    # the checkpoint reloads on its own: sizes were saved with it
    model = example.CellTypeClassifier.load_from_checkpoint(metrics["checkpoint"])
    assert (model.hparams.n_genes, model.hparams.n_classes) == (2000, 3)


def test_sizes_without_a_data_module_are_a_clear_error():
    loader = DataLoader(TensorDataset(torch.zeros(4, 3)), batch_size=2)
    trainer = pl.Trainer(accelerator="cpu", fast_dev_run=True, logger=False)
    with pytest.raises(ValueError, match="reads n_genes/n_classes from an AnnDataModule"):
        trainer.fit(load_example("classifier").CellTypeClassifier(), train_dataloaders=loader)


def test_cli_checkpoint_loads_from_python_outside_the_repository(tmp_path, monkeypatch):
    """The config names the installed ``torch_adata.models.classifier.CellTypeClassifier``, so
    a checkpoint of ``torch-adata fit`` loads in a fresh Python where nothing of the repository
    but the package is importable (issue 19.7)."""
    monkeypatch.chdir(tmp_path)  # not the repository: the class path must not need it
    small = ["--data.load_kwargs", "{n_cells: 200, n_genes: 50}", "--trainer.max_epochs", "1"]
    config = str(REPO / "examples/configs/classifier.yaml")
    fitted = cli.run_cli(["fit", *cli_args(config, tmp_path / "run", *small)])
    (checkpoint,) = (tmp_path / "run").rglob("*.ckpt")
    x = torch.rand(4, 50)
    fitted.model.eval()
    with torch.no_grad():
        want = fitted.model(x)
    torch.save(x, tmp_path / "x.pt")

    installed = tmp_path / "site"  # the package alone, as pip installs it
    installed.mkdir()
    (installed / "torch_adata").symlink_to(REPO / "torch_adata", target_is_directory=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = f"""
import importlib.util, sys, torch
assert importlib.util.find_spec("examples") is None, "the repository is importable"
from torch_adata.models.classifier import CellTypeClassifier
model = CellTypeClassifier.load_from_checkpoint({str(checkpoint)!r}, map_location="cpu").eval()
with torch.no_grad():
    torch.save(model(torch.load({str(tmp_path / "x.pt")!r})), {str(tmp_path / "y.pt")!r})
print(type(model).__module__, model.hparams.n_genes, model.hparams.n_classes)
"""
    env = {**os.environ, "PYTHONPATH": str(installed)}
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["torch_adata.models.classifier", "50", "3"]
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), want)


def test_import_torch_adata_leaves_the_models_unimported():
    """The models are the top layer (they import Lightning, torchmetrics): loaded on first use."""
    script = (
        "import sys, torch_adata\n"
        "assert 'torch_adata.models' not in sys.modules\n"
        "assert torch_adata.models.__name__ == 'torch_adata.models'\n"
        "assert 'torch_adata.models.classifier' not in sys.modules\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
