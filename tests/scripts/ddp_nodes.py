"""One "node" of a multi-node DDP run: ``Trainer(num_nodes=2, devices=1, strategy="ddp")`` on CPU.

Run by tests/test_ddp.py once per node, as a cluster would start it (torchrun's or SLURM's
static rendezvous): MASTER_ADDR, MASTER_PORT, NODE_RANK and WORLD_SIZE come from the
environment, and nothing is shared between the two processes but the data files and the
TCP rendezvous. Each node records the dataset positions of every training batch it saw, per
epoch, in ``<out>/node<NODE_RANK>.json``.

Usage: ``ddp_nodes.py OUT SOURCE_JSON [--backed] [--sampler uniform|block]`` where
SOURCE_JSON is a JSON string (one path) or list (a collection of paths).
"""

import argparse
import json
import os
from pathlib import Path

import lightning.pytorch as pl
import torch

import torch_adata
from torch_adata import AnnDataModule, Fields, Loader, Split


class Recorder(pl.LightningModule):
    def __init__(self, n_vars: int, out: Path):
        super().__init__()
        self.net = torch.nn.Linear(n_vars, 1)
        self.out = out
        self.seen: list[dict] = []

    def training_step(self, batch, batch_idx):
        self.seen.append({"epoch": self.current_epoch, "rows": batch["index"].tolist()})
        return self.net(batch["X"]).pow(2).mean()

    def on_train_end(self):
        dm = self.trainer.datamodule
        record = {
            "node_rank": self.trainer.node_rank,
            "global_rank": self.global_rank,
            "local_rank": self.local_rank,
            "world": self.trainer.world_size,
            "num_nodes": self.trainer.num_nodes,
            "backend": torch.distributed.get_backend(),
            "sampler": type(self.trainer.train_dataloader.sampler).__name__,
            "torch_adata": str(Path(torch_adata.__file__).resolve()),
            "train_rows": dm.splits["train"].tolist(),
            "n_obs": len(dm.dataset),
            "seen": self.seen,
        }
        if dm.collection is not None:
            record["sources"] = dm.collection.keys
            sampler = self.trainer.train_dataloader.sampler
            if hasattr(sampler, "_blocks"):  # block shuffle: which files each block reads
                train = dm.splits["train"]
                record["block_files"] = [
                    sorted(set(dm.collection.source_of(train[start : start + length])))
                    for start, length in zip(*sampler._blocks, strict=True)
                ]
        (self.out / f"node{self.trainer.node_rank}.json").write_text(json.dumps(record))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("source", type=json.loads)
    parser.add_argument("--backed", action="store_true")
    parser.add_argument("--sampler", default="uniform", choices=["uniform", "block"])
    args = parser.parse_args()
    dm = AnnDataModule(
        args.source,
        fields=Fields(return_index=True),
        split=Split(val_size=0.1, test_size=0.1),
        loader=Loader(sampler=args.sampler, block_size=4),
        batch_size=16,
        seed=3,
        backed=args.backed,
    )
    dm.setup("fit")
    trainer = pl.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=1,
        num_nodes=2,
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    model = Recorder(len(dm.dataset.var_names), args.out)
    trainer.fit(model, datamodule=dm)
    assert os.environ["NODE_RANK"] == str(trainer.node_rank)
    # leave together: node 0 hosts the rendezvous store, and a node whose gloo threads still
    # talk to it when it has gone aborts at exit ("terminate called without an active
    # exception"), seen once under load in CI
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
