"""Cell-type classifier: predict ``obs["Cell type annotation"]`` from expression.

Data (the embedded simulated time course, LARRY's schema) -> ``AnnDataModule`` (sparse batches,
stratified seeded split) -> an MLP on ``log1p`` expression -> test accuracy and macro-F1
(torchmetrics) next to the majority-class baseline -> decoded labels in
``obs["predicted"]`` and class probabilities in ``obsm["class_probabilities"]``.

Run as a script::

    python examples/classifier.py --out outputs/classifier

or through the command line (from the repository root, see ``examples/configs/classifier.yaml``)::

    torch-adata fit --config examples/configs/classifier.yaml

The script writes ``metrics.json``, a checkpoint and ``predictions.h5ad`` under ``--out``.
Batches arrive sparse (only the non-zeros cross to the device) and the data module densifies
them on the device (``Fields(sparse=True, densify=True)``); ``accelerator="auto"`` picks a GPU
when there is one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

import torch_adata as ta
from torch_adata.cli import AnnDataPredictionWriter

LABEL = "Cell type annotation"


class CellTypeClassifier(pl.LightningModule):
    """An MLP from ``log1p`` expression to the logits of an obs label.

    Parameters
    ----------
    n_genes
        Number of input genes. ``None``: read from the data module in :meth:`setup`.
    n_classes
        Number of labels. ``None``: the size of the data module's encoder for ``label_key``.
    label_key
        The obs column to predict; the data module must batch it (``obs_keys``).
    hidden
        Width of the hidden layer.
    dropout
        Dropout before the output layer.
    lr
        Adam learning rate.
    """

    def __init__(
        self,
        n_genes: int | None = None,
        n_classes: int | None = None,
        label_key: str = LABEL,
        hidden: int = 128,
        dropout: float = 0.1,
        lr: float = 1e-3,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.net = None
        if n_genes is not None and n_classes is not None:
            self._build()

    def _build(self) -> None:
        n_genes, n_classes, hidden = (
            self.hparams.n_genes,
            self.hparams.n_classes,
            self.hparams.hidden,
        )
        self.net = torch.nn.Sequential(
            torch.nn.Linear(n_genes, hidden),
            torch.nn.ReLU(),
            torch.nn.Dropout(self.hparams.dropout),
            torch.nn.Linear(hidden, n_classes),
        )
        self.test_accuracy = MulticlassAccuracy(n_classes, average="micro")
        self.test_macro_f1 = MulticlassF1Score(n_classes, average="macro")

    def setup(self, stage: str) -> None:
        # Sizes come from the data (the CLI's config need not know them); saved in checkpoints.
        if self.net is None:
            if not isinstance(self.trainer.datamodule, ta.AnnDataModule):
                raise ValueError(
                    "CellTypeClassifier reads n_genes/n_classes from an AnnDataModule: pass "
                    "datamodule= to the trainer, or give n_genes and n_classes."
                )
            dataset = self.trainer.datamodule.dataset
            label_key = self.hparams.label_key
            if label_key not in dataset.encoders:
                raise ValueError(
                    f"CellTypeClassifier: label_key {label_key!r} is not a categorical obs "
                    f"field of the data module (its categorical fields: {list(dataset.encoders)}"
                    f"; the AnnData's obs columns: {list(dataset.obs.columns)}). Set "
                    "model.label_key to one of them and add it to data.obs_keys."
                )
            self.hparams.n_genes = dataset.n_vars
            self.hparams.n_classes = len(dataset.encoders[label_key])
            self._build()
        if isinstance(self.trainer.datamodule, ta.AnnDataModule):
            # log1p of negative (scaled) values is NaN: fail now, not after epochs of NaN loss
            self.trainer.datamodule.dataset.check_counts(
                integer=False, needed_by="CellTypeClassifier (log1p of its input)"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.log1p(x))

    def _loss(self, batch, stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(batch["X"])
        labels = batch[self.hparams.label_key]
        loss = torch.nn.functional.cross_entropy(logits, labels)
        accuracy = (logits.argmax(1) == labels).float().mean()
        self.log_dict(
            {f"{stage}_loss": loss, f"{stage}_acc": accuracy}, prog_bar=True, batch_size=len(labels)
        )
        return loss, logits

    def training_step(self, batch, batch_idx):
        return self._loss(batch, "train")[0]

    def validation_step(self, batch, batch_idx):
        self._loss(batch, "val")

    def test_step(self, batch, batch_idx):
        _, logits = self._loss(batch, "test")
        labels = batch[self.hparams.label_key]
        self.test_accuracy(logits, labels)
        self.test_macro_f1(logits, labels)
        self.log("test_accuracy", self.test_accuracy, batch_size=len(labels))
        self.log("test_macro_f1", self.test_macro_f1, batch_size=len(labels))

    def predict_step(self, batch, batch_idx):
        probabilities = torch.softmax(self(batch["X"]), dim=1)
        return {"class_probabilities": probabilities, "predicted": probabilities.argmax(1)}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def majority_baseline(labels: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-F1 of always predicting the most frequent label of ``labels``."""
    counts = np.unique(labels, return_counts=True)[1]
    share = counts.max() / counts.sum()
    # F1 is 2p/(1+p) for the predicted class and 0 for the others
    return {"accuracy": float(share), "macro_f1": float(2 * share / (1 + share) / len(counts))}


def run(
    out: Path,
    *,
    n_cells: int = 10_000,
    n_genes: int = 2_000,
    max_epochs: int = 10,
    seed: int = 0,
    accelerator: str = "auto",
    fast_dev_run: bool = False,
) -> dict:
    """Train, test and predict; write metrics, checkpoint and predictions under ``out``.

    With ``fast_dev_run`` one batch of each stage runs and nothing is predicted or written.
    """
    pl.seed_everything(seed, workers=True)
    dm = ta.AnnDataModule(
        "simulated",
        load_kwargs={"n_cells": n_cells, "n_genes": n_genes, "seed": seed},
        fields=ta.Fields(obs_keys=[LABEL], sparse=True, densify=True),
        split=ta.Split(val_size=0.1, test_size=0.1, stratify_key=LABEL),
        batch_size=128,
        seed=seed,
    )
    writer = AnnDataPredictionWriter(out / "predictions.h5ad", decode={"predicted": LABEL})
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        accelerator=accelerator,
        devices=1,
        logger=CSVLogger(out, name="logs"),
        callbacks=[writer],
        fast_dev_run=fast_dev_run,
        enable_progress_bar=False,
    )
    model = CellTypeClassifier()
    trainer.fit(model, datamodule=dm)
    test = trainer.test(model, datamodule=dm, verbose=False)[0]
    metrics = {
        "test_accuracy": test["test_accuracy"],
        "test_macro_f1": test["test_macro_f1"],
        "device": str(trainer.strategy.root_device),
    }
    if fast_dev_run:
        return metrics

    trainer.predict(model, datamodule=dm, return_predictions=True)  # the writer saves the .h5ad
    baseline = majority_baseline(dm.adata.obs[LABEL].to_numpy()[dm.splits["test"]])
    metrics |= {
        "majority_class_accuracy": baseline["accuracy"],
        "majority_class_macro_f1": baseline["macro_f1"],
        "splits": {name: len(rows) for name, rows in dm.splits.items()},
        "checkpoint": trainer.checkpoint_callback.best_model_path,
        "predictions": str(writer.output_path),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/classifier"))
    parser.add_argument("--n-cells", type=int, default=10_000)
    parser.add_argument("--n-genes", type=int, default=2_000)
    parser.add_argument("--max-epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--fast-dev-run", action="store_true")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    metrics = run(
        args.out,
        n_cells=args.n_cells,
        n_genes=args.n_genes,
        max_epochs=args.max_epochs,
        seed=args.seed,
        accelerator=args.accelerator,
        fast_dev_run=args.fast_dev_run,
    )
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
