"""Quick start: a cell-type classifier trained on the embedded simulated time course.

The whole path a user takes: data (``"simulated"``, LARRY's schema, no download) ->
``AnnDataModule`` (seeded stratified split) -> ``Trainer.fit`` / ``test`` -> predictions and
class probabilities written back into the AnnData -> ``.h5ad`` for scanpy.

Run::

    python examples/quickstart.py --out outputs/quickstart

It writes ``metrics.json`` (test accuracy next to the majority-class baseline), a checkpoint,
Lightning's ``metrics.csv`` and ``predictions.h5ad`` (``obs["predicted"]``,
``obsm["class_probabilities"]``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger

import torch_adata as ta

LABEL = "Cell type annotation"


class CellTypeClassifier(pl.LightningModule):
    """A small MLP on log1p expression; batches are ``{"X": (B, genes), LABEL: (B,) codes}``."""

    def __init__(self, n_genes: int, n_classes: int, hidden: int = 128, lr: float = 1e-3):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(n_genes, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, n_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.log1p(x))

    def _step(self, batch, stage: str) -> torch.Tensor:
        logits = self(batch["X"])
        loss = torch.nn.functional.cross_entropy(logits, batch[LABEL])
        acc = (logits.argmax(1) == batch[LABEL]).float().mean()
        self.log_dict(
            {f"{stage}_loss": loss, f"{stage}_acc": acc}, prog_bar=True, batch_size=len(logits)
        )
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def predict_step(self, batch, batch_idx):
        return torch.softmax(self(batch["X"]), dim=1)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/quickstart"))
    parser.add_argument("--n-cells", type=int, default=10_000)
    parser.add_argument("--max-epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accelerator", default="auto")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(args.seed, workers=True)

    dm = ta.AnnDataModule(
        "simulated",
        load_kwargs={"n_cells": args.n_cells, "seed": args.seed},
        obs_keys=[LABEL],
        stratify_key=LABEL,
        batch_size=256,
        seed=args.seed,
    )
    dm.setup("fit")
    encoder = dm.dataset.encoders[LABEL]
    model = CellTypeClassifier(dm.dataset.n_vars, len(encoder))
    trainer = pl.Trainer(
        max_epochs=args.max_epochs,
        accelerator=args.accelerator,
        devices=1,
        logger=CSVLogger(args.out, name="logs"),
        default_root_dir=args.out,
    )
    trainer.fit(model, datamodule=dm)
    test = trainer.test(model, datamodule=dm, verbose=False)[0]
    probabilities = trainer.predict(model, datamodule=dm)
    adata = dm.write_predictions(probabilities, key="class_probabilities")
    adata.obs["predicted"] = encoder.decode(adata.obsm["class_probabilities"].argmax(1))
    adata.obs["predicted"] = adata.obs["predicted"].astype("category")
    adata.write_h5ad(args.out / "predictions.h5ad")

    test_labels = dm.adata.obs[LABEL].to_numpy()[dm.splits["test"]]
    majority = float(np.max(np.unique(test_labels, return_counts=True)[1]) / len(test_labels))
    metrics = {
        "test_accuracy": float(test["test_acc"]),
        "majority_class_accuracy": majority,
        "n_cells": int(adata.n_obs),
        "splits": {k: len(v) for k, v in dm.splits.items()},
        "checkpoint": str(trainer.checkpoint_callback.best_model_path),
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(
        f"test accuracy {metrics['test_accuracy']:.3f} (majority class {majority:.3f}); "
        f"outputs in {args.out}/"
    )
    return metrics


if __name__ == "__main__":
    main()
