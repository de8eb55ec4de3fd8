"""The examples and the CLI on CUDA, unchanged (accelerator="auto"). Skipped without CUDA."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch
from conftest import cli_args, load_example

from torch_adata import cli

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.filterwarnings("ignore:LightningCLI's args parameter"),
]

REPO = Path(__file__).parents[1]
SMALL = ["--n-cells", "600", "--n-genes", "300", "--max-epochs", "2", "--accelerator", "auto"]


def test_classifier_script_trains_on_cuda(tmp_path):
    metrics = load_example("classifier").main(["--out", str(tmp_path), *SMALL])
    assert metrics["device"].startswith("cuda")
    assert metrics["test_accuracy"] > metrics["majority_class_accuracy"]
    adata = ad.read_h5ad(tmp_path / "predictions.h5ad")
    np.testing.assert_allclose(adata.obsm["class_probabilities"].sum(1), 1.0, rtol=1e-5)


def test_embedding_script_trains_on_cuda(tmp_path):
    metrics = load_example("embedding").main(["--out", str(tmp_path), *SMALL, "--no-umap"])
    assert metrics["device"].startswith("cuda")
    adata = ad.read_h5ad(tmp_path / "embedding.h5ad")
    assert np.isfinite(adata.obsm["X_vae"]).all()


@pytest.mark.parametrize("name", ["classifier", "embedding"])
def test_cli_fit_with_accelerator_auto_uses_cuda(name, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    small = ["--trainer.fast_dev_run", "true", "--data.load_kwargs", "{n_cells: 300, n_genes: 200}"]
    config = f"examples/configs/{name}.yaml"
    run = cli.run_cli(["fit", *cli_args(config, tmp_path, *small, accelerator="auto")])
    assert run.trainer.strategy.root_device.type == "cuda"
    assert next(run.model.parameters()).device.type == "cuda"
