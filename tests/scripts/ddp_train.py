"""Train a tiny model with Trainer(strategy="ddp", accelerator="cpu", devices=2) and record,
per rank and epoch, the AnnData rows of every training batch. Run by tests/test_ddp.py (Lightning
re-executes this script for rank 1, so it cannot run inside the pytest process)."""

import json
import sys
from pathlib import Path

import anndata as ad
import lightning.pytorch as pl
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

import torch_adata
from torch_adata import AnnDataModule, Fields, Split


class Recorder(pl.LightningModule):
    def __init__(self, n_vars: int):
        super().__init__()
        self.net = torch.nn.Linear(n_vars, 1)
        self.seen: list[dict] = []

    def training_step(self, batch, batch_idx):
        self.seen.append({"epoch": self.current_epoch, "rows": batch["index"].tolist()})
        return self.net(batch["X"]).pow(2).mean()

    def on_train_end(self):
        out = Path(sys.argv[1]) / f"rank{self.global_rank}.json"
        sampler = self.trainer.train_dataloader.sampler
        out.write_text(
            json.dumps(
                {
                    "rank": self.global_rank,
                    "world": self.trainer.world_size,
                    "seen": self.seen,
                    "sampler": type(sampler).__name__,
                    "backend": torch.distributed.get_backend(),
                    "torch_adata": str(Path(torch_adata.__file__).resolve()),
                }
            )
        )

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def main():
    out = Path(sys.argv[1])
    rng = np.random.default_rng(0)
    n = 203  # odd on purpose: not a multiple of world size x batch size
    adata = ad.AnnData(
        sp.random(n, 20, density=0.3, format="csr", dtype=np.float32, random_state=0),
        obs=pd.DataFrame({"label": rng.integers(0, 3, n)}, index=[f"c{i}" for i in range(n)]),
    )
    dm = AnnDataModule(
        adata,
        fields=Fields(return_index=True),
        split=Split(val_size=0.1, test_size=0.1),
        batch_size=16,
        seed=3,
    )
    model = Recorder(adata.n_vars)
    trainer = pl.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=2,
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    if trainer.global_rank == 0:
        (out / "train_rows.json").write_text(json.dumps(dm.splits["train"].tolist()))


if __name__ == "__main__":
    main()
