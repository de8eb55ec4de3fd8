"""Cell embedding: a variational autoencoder on raw counts, its latent space in ``obsm["X_vae"]``.

Data (the embedded simulated time course, LARRY's schema) -> ``AnnDataModule`` over the raw
``counts`` layer (sparse batches, seeded split) -> a VAE whose decoder gives each gene a
negative-binomial distribution (mean = library size x decoded proportion, one dispersion per
gene), the likelihood suited to UMI counts; the encoder reads ``log1p(counts)`` -> the latent
mean of every cell written to ``obsm["X_vae"]`` with ``AnnDataModule.write_predictions`` ->
scanpy ``neighbors``/``umap`` on it.

How good is the latent space? A k-nearest-neighbour classifier is fitted on the training cells'
embeddings and scores ``Cell type annotation`` on the held-out test cells (which the VAE never
saw), next to PCA with as many dimensions (the standard recipe,
:func:`torch_adata.datasets.preprocess`).

Run as a script::

    python examples/embedding.py --out outputs/embedding

or through the command line (from the repository root)::

    torch-adata fit --config examples/configs/embedding.yaml

The script writes ``metrics.json``, a checkpoint, ``embedding.h5ad`` (``obsm["X_vae"]``,
``obsm["X_pca"]``, ``obsm["X_umap"]``) and ``umap.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import anndata as ad
import lightning.pytorch as pl
import numpy as np
import scanpy as sc
import torch
from lightning.pytorch.loggers import CSVLogger
from sklearn.neighbors import KNeighborsClassifier
from torch.distributions import NegativeBinomial, Normal, kl_divergence

import torch_adata as ta

LABEL = "Cell type annotation"


class CountVAE(pl.LightningModule):
    """A VAE with a negative-binomial likelihood on raw counts.

    Parameters
    ----------
    n_genes
        Number of genes. ``None``: read from the data module in :meth:`setup`.
    n_latent
        Dimensions of the latent space.
    hidden
        Width of the encoder's and decoder's hidden layer.
    lr
        Adam learning rate.

    Notes
    -----
    Batches must hold raw (integer) counts: ``AnnDataModule(fields=Fields(layer="counts"))``. Predictions are
    the latent means, ``(cells, n_latent)``.
    """

    def __init__(
        self, n_genes: int | None = None, n_latent: int = 10, hidden: int = 128, lr: float = 1e-3
    ):
        super().__init__()
        self.save_hyperparameters()
        self.encoder = None
        if n_genes is not None:
            self._build()

    def _build(self) -> None:
        n_genes, n_latent, hidden = self.hparams.n_genes, self.hparams.n_latent, self.hparams.hidden
        self.encoder = torch.nn.Sequential(
            torch.nn.Linear(n_genes, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 2 * n_latent)
        )
        self.decoder = torch.nn.Sequential(
            torch.nn.Linear(n_latent, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, n_genes)
        )
        self.log_dispersion = torch.nn.Parameter(torch.zeros(n_genes))

    def setup(self, stage: str) -> None:
        if self.encoder is None:  # the CLI path: the gene count comes from the data
            if not isinstance(self.trainer.datamodule, ta.AnnDataModule):
                raise ValueError(
                    "CountVAE reads n_genes from an AnnDataModule: pass datamodule= to the "
                    "trainer, or give n_genes."
                )
            self.hparams.n_genes = self.trainer.datamodule.dataset.n_vars
            self._build()
        if isinstance(self.trainer.datamodule, ta.AnnDataModule):
            # a count likelihood on scaled or log data fails deep in torch.distributions
            self.trainer.datamodule.dataset.check_counts(needed_by="CountVAE (a count model)")

    @staticmethod
    def _counts(batch) -> torch.Tensor:
        return batch["X"] if isinstance(batch, dict) else batch

    def encode(self, counts: torch.Tensor) -> Normal:
        """The approximate posterior of each cell's latent state."""
        mean, log_var = self.encoder(torch.log1p(counts)).chunk(2, dim=1)
        return Normal(mean, torch.exp(0.5 * log_var))

    def loss(self, counts: torch.Tensor) -> torch.Tensor:
        """Negative ELBO per cell, averaged over the batch."""
        posterior = self.encode(counts)
        z = posterior.rsample()
        library = counts.sum(1, keepdim=True)
        mean = library * torch.softmax(self.decoder(z), dim=1)
        dispersion = torch.exp(self.log_dispersion)  # NB "total_count"; variance mean + mean^2/r
        likelihood = NegativeBinomial(
            total_count=dispersion, logits=torch.log(mean + 1e-8) - self.log_dispersion
        )
        prior = Normal(torch.zeros_like(z), torch.ones_like(z))
        reconstruction = -likelihood.log_prob(counts).sum(1)
        return (reconstruction + kl_divergence(posterior, prior).sum(1)).mean()

    def _step(self, batch, stage: str) -> torch.Tensor:
        counts = self._counts(batch)
        loss = self.loss(counts)
        self.log(f"{stage}_loss", loss, prog_bar=True, batch_size=len(counts))
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def predict_step(self, batch, batch_idx):
        return self.encode(self._counts(batch)).mean

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def knn_accuracy(
    embedding: np.ndarray,
    labels: np.ndarray,
    train: np.ndarray,
    test: np.ndarray,
    k: int = 15,
) -> float:
    """Accuracy on the ``test`` rows of a kNN classifier fitted on the ``train`` rows."""
    knn = KNeighborsClassifier(n_neighbors=k).fit(embedding[train], labels[train])
    return float(knn.score(embedding[test], labels[test]))


def pca_embedding(adata: ad.AnnData, n_pcs: int) -> np.ndarray:
    """PCA of the standard recipe (log1p, variable genes, scaling) with ``n_pcs`` components.

    Fitted on every cell (the VAE sees only the training cells), as PCA is used in practice.
    """
    return ta.datasets.preprocess(adata, n_pcs=n_pcs).obsm["X_pca"]


def run(
    out: Path,
    *,
    n_cells: int = 10_000,
    n_genes: int = 2_000,
    n_latent: int = 10,
    max_epochs: int = 20,
    seed: int = 0,
    accelerator: str = "auto",
    fast_dev_run: bool = False,
    umap: bool = True,
) -> dict:
    """Train the VAE, embed every cell, score the embedding against PCA; write under ``out``.

    With ``fast_dev_run`` one batch of each stage runs and nothing is scored or written.
    """
    pl.seed_everything(seed, workers=True)
    dm = ta.AnnDataModule(
        "simulated",
        load_kwargs={"n_cells": n_cells, "n_genes": n_genes, "seed": seed},
        fields=ta.Fields(layer="counts", sparse=True, densify=True),
        split=ta.Split(val_size=0.1, test_size=0.1, stratify_key=LABEL),
        batch_size=128,
        seed=seed,
    )
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        accelerator=accelerator,
        devices=1,
        logger=CSVLogger(out, name="logs"),
        fast_dev_run=fast_dev_run,
        enable_progress_bar=False,
    )
    model = CountVAE(n_latent=n_latent)
    trainer.fit(model, datamodule=dm)
    test_loss = trainer.test(model, datamodule=dm, verbose=False)[0]["test_loss"]
    device = str(trainer.strategy.root_device)
    if fast_dev_run:
        return {"test_loss": test_loss, "device": device}

    adata = dm.write_predictions(trainer.predict(model, datamodule=dm), key="X_vae")
    adata.obsm["X_pca"] = pca_embedding(adata, n_pcs=n_latent)
    labels = adata.obs[LABEL].to_numpy()
    train, test = dm.splits["train"], dm.splits["test"]
    metrics = {
        "test_loss": test_loss,
        "knn_accuracy_vae": knn_accuracy(adata.obsm["X_vae"], labels, train, test),
        "knn_accuracy_pca": knn_accuracy(adata.obsm["X_pca"], labels, train, test),
        "n_latent": n_latent,
        "device": device,
        "splits": {name: len(rows) for name, rows in dm.splits.items()},
        "checkpoint": trainer.checkpoint_callback.best_model_path,
    }
    if umap:
        # exact neighbours (sklearn): scanpy 1.11's default above 4,096 cells (pynndescent)
        # fails on scipy sparse arrays ('csr_array' has no 'getnnz')
        sc.pp.neighbors(adata, use_rep="X_vae", transformer="sklearn", random_state=seed)
        sc.tl.umap(adata, random_state=seed)
        figure = sc.pl.umap(adata, color=LABEL, show=False, return_fig=True)
        figure.savefig(out / "umap.png", dpi=100, bbox_inches="tight")
    adata.write_h5ad(out / "embedding.h5ad")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/embedding"))
    parser.add_argument("--n-cells", type=int, default=10_000)
    parser.add_argument("--n-genes", type=int, default=2_000)
    parser.add_argument("--n-latent", type=int, default=10)
    parser.add_argument("--max-epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--fast-dev-run", action="store_true")
    parser.add_argument("--no-umap", dest="umap", action="store_false")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    metrics = run(
        args.out,
        n_cells=args.n_cells,
        n_genes=args.n_genes,
        n_latent=args.n_latent,
        max_epochs=args.max_epochs,
        seed=args.seed,
        accelerator=args.accelerator,
        fast_dev_run=args.fast_dev_run,
        umap=args.umap,
    )
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
