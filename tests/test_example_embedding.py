"""examples/embedding.py: a count VAE trained through AnnDataModule (Python API and CLI), its
latent space in obsm["X_vae"], scored by kNN label accuracy next to PCA, then scanpy UMAP."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch
from conftest import cli_args, load_example

from torch_adata import cli

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

REPO = Path(__file__).parents[1]
CONFIG = "examples/configs/embedding.yaml"
SMALL = ["--data.load_kwargs", "{n_cells: 300, n_genes: 200}"]


def test_fast_dev_run_through_the_python_api_writes_nothing(tmp_path):
    metrics = load_example("embedding").run(
        tmp_path, n_cells=300, n_genes=200, accelerator="cpu", fast_dev_run=True
    )
    assert set(metrics) == {"test_loss", "device"}
    assert np.isfinite(metrics["test_loss"]) and metrics["test_loss"] > 0
    assert not (tmp_path / "embedding.h5ad").exists()  # fast_dev_run writes nothing
    assert not (tmp_path / "metrics.json").exists()


def test_cli_fit_lowers_the_test_loss_and_predict_writes_the_latent_space(tmp_path, monkeypatch):
    """Seeds 0-4 at 300 cells x 200 genes, 3 epochs, 4 latent dimensions (CPU), measured before
    setting the margin: the trained VAE's test loss is 0.86-0.90 of the same architecture's
    untrained loss. Threshold: at most 0.95."""
    monkeypatch.chdir(REPO)
    common = cli_args(CONFIG, tmp_path, *SMALL, "--model.init_args.n_latent", "4")
    fitted = cli.run_cli(["fit", *common, "--trainer.max_epochs", "3"])
    trainer, dm = fitted.trainer, fitted.datamodule
    trained = trainer.test(fitted.model, datamodule=dm, verbose=False)[0]["test_loss"]
    torch.manual_seed(0)
    untrained_model = type(fitted.model)(n_latent=4)
    untrained = trainer.test(untrained_model, datamodule=dm, verbose=False)[0]["test_loss"]
    assert trained <= 0.95 * untrained

    (checkpoint,) = tmp_path.rglob("*.ckpt")
    cli.main(["predict", *common, "--ckpt_path", str(checkpoint)])
    adata = ad.read_h5ad(tmp_path / "predictions.h5ad")
    assert adata.obsm["X_vae"].shape == (300, 4) and np.isfinite(adata.obsm["X_vae"]).all()
    assert adata.obsm["X_vae"].std(0).min() > 0  # every cell got its own latent mean


@pytest.mark.slow
def test_vae_latent_separates_labels_as_well_as_pca(tmp_path):
    """Seeds 0-4 at 1,500 cells x 500 genes, 5 epochs, 10 latent dimensions (CPU), measured
    before setting the margin: kNN (k=15) accuracy of `Cell type annotation` on the 150 held-out
    test cells 0.880-0.919 for the VAE and 0.880-0.920 for PCA-10; VAE minus PCA from -0.013
    to +0.027 (one test cell is 0.0067). Thresholds: VAE >= PCA - 0.05 and VAE >= 0.80.
    At 1,500 cells x 2,000 genes the difference was -0.007 to +0.020 (VAE 0.919-0.947)."""
    args = ["--n-cells", "1500", "--n-genes", "500", "--max-epochs", "5", "--seed", "0"]
    metrics = load_example("embedding").main(
        ["--out", str(tmp_path), *args, "--accelerator", "cpu", "--no-umap"]
    )
    assert metrics["knn_accuracy_vae"] >= metrics["knn_accuracy_pca"] - 0.05
    assert metrics["knn_accuracy_vae"] >= 0.80
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert Path(metrics["checkpoint"]).is_file()

    adata = ad.read_h5ad(tmp_path / "embedding.h5ad")
    assert adata.obsm["X_vae"].shape == adata.obsm["X_pca"].shape == (1500, 10)
    assert np.isfinite(adata.obsm["X_vae"]).all()


@pytest.mark.slow
def test_script_runs_scanpy_umap_on_the_latent_space(tmp_path):
    args = ["--n-cells", "300", "--n-genes", "200", "--max-epochs", "1", "--n-latent", "4"]
    load_example("embedding").main(["--out", str(tmp_path), *args, "--accelerator", "cpu"])
    adata = ad.read_h5ad(tmp_path / "embedding.h5ad")
    assert adata.uns["neighbors"]["params"]["use_rep"] == "X_vae"
    assert adata.obsm["X_umap"].shape == (300, 2) and np.isfinite(adata.obsm["X_umap"]).all()
    assert (tmp_path / "umap.png").stat().st_size > 0
