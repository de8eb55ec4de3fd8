"""The same SCVI model trained on a backed ``.h5ad`` through torch_adata and through scvi-tools.

Usage::

    python benchmarks/scvi_route.py --cells 20000 --genes 2000 --order torch_adata-first
    python benchmarks/scvi_route.py --cells 100000 --genes 20000   # the issue's size (long on CPU)

Writes a simulated count matrix with cell types and batch effects (negative binomial, CSR,
``--cells`` x ``--genes``) to ``--data`` unless it exists, then trains ``scvi.model.SCVI``
(default size, batch 256, seed 0, the same train/validation cells) twice on it, opened backed:

- ``torch_adata``: :class:`torch_adata.scvi.SCVIDataModule` (``backed=True``), ``model.train
  (datamodule=dm)``;
- ``scvi-tools``: ``SCVI.setup_anndata`` on ``ad.read_h5ad(path, backed="r")``, then
  ``model.train`` (its own ``DataSplitter``, given the same cells with ``external_indexing``).

Per route it prints the median (and minimum) wall time of a training epoch (epochs after the
first, which includes start-up; no validation runs during training), the share of the epoch spent waiting for data (the time
between the end of one training step and the start of the next, plus the wait for the first
batch), the validation ELBO and reconstruction loss after training (same cells, scvi's
``get_elbo`` / ``get_reconstruction_error``), and the kNN (k=15) cell-type accuracy of the
validation cells' latent, the classifier fitted on the training cells' latent. Both routes
load in the training process (``num_workers=0``, scvi's default).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def simulate(path: Path, n_cells: int, n_genes: int, seed: int = 0) -> None:
    """Counts of ``n_cells`` cells of 8 types in 3 batches (negative binomial), as CSR."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    n_types, n_batches = 8, 3
    base = rng.gamma(0.3, 2.0, n_genes)  # most genes low, a few high
    programs = base * rng.lognormal(0.0, 1.0, (n_types, n_genes))  # type-specific means
    shifts = rng.lognormal(0.0, 0.3, (n_batches, n_genes))  # batch effects
    types = rng.integers(0, n_types, n_cells)
    batches = rng.integers(0, n_batches, n_cells)
    library = rng.lognormal(0.0, 0.3, n_cells)
    blocks = []
    for start in range(0, n_cells, 5000):
        rows = slice(start, min(start + 5000, n_cells))
        mean = programs[types[rows]] * shifts[batches[rows]] * library[rows, None]
        theta = 5.0
        counts = rng.poisson(rng.gamma(theta, mean / theta)).astype(np.float32)
        blocks.append(sp.csr_matrix(counts))
    adata = ad.AnnData(
        sp.vstack(blocks).tocsr(),
        obs=pd.DataFrame(
            {
                "cell_type": pd.Categorical([f"type_{t}" for t in types]),
                "batch": pd.Categorical([f"batch_{b}" for b in batches]),
            },
            index=[f"cell_{i}" for i in range(n_cells)],
        ),
    )
    adata.var_names = [f"gene_{j}" for j in range(n_genes)]
    path.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(path)


def _timer():
    """A Lightning callback timing training epochs and the waits for their batches."""
    from lightning.pytorch import Callback

    class Timer(Callback):
        def __init__(self):
            self.epochs, self.waits = [], []

        def on_train_epoch_start(self, trainer, module):
            self.start = self.last = time.perf_counter()
            self.wait = 0.0

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.wait += time.perf_counter() - self.last

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.last = time.perf_counter()

        def on_train_epoch_end(self, trainer, module):
            self.epochs.append(time.perf_counter() - self.start)
            self.waits.append(self.wait)

    return Timer()


def _quality(model, adata_obs, latent, train, val, **data) -> dict:
    from sklearn.neighbors import KNeighborsClassifier

    types = np.asarray(adata_obs["cell_type"])
    knn = KNeighborsClassifier(n_neighbors=15).fit(latent[train], types[train])
    return {
        "val_elbo": float(model.get_elbo(**data)),
        "val_reconstruction": float(model.get_reconstruction_error(**data)["reconstruction_loss"]),
        "knn_accuracy": float((knn.predict(latent[val]) == types[val]).mean()),
    }


def _summary(timer) -> dict:
    epochs, waits = np.asarray(timer.epochs), np.asarray(timer.waits)
    later = slice(1, None) if len(epochs) > 1 else slice(None)
    return {
        "epoch_s": float(np.median(epochs[later])),
        "epoch_min_s": float(np.min(epochs[later])),
        "data_wait_s": float(np.median(waits[later])),
        "data_wait_share": float(np.median(waits[later] / epochs[later])),
        "epochs_s": [round(float(e), 3) for e in epochs],
        "load_average_1min": os.getloadavg()[0],
    }


def run_torch_adata(path, split, epochs, batch_size) -> dict:
    import scvi

    from torch_adata import Split
    from torch_adata.scvi import SCVIDataModule

    dm = SCVIDataModule(
        path,
        batch_key="batch",
        backed=True,
        batch_size=batch_size,
        split=Split(indices={k: v.tolist() for k, v in split.items()}),
        seed=0,
    )
    scvi.settings.seed = 0
    model = scvi.model.SCVI(registry=dm.registry)
    timer = _timer()
    model.train(max_epochs=epochs, datamodule=dm, accelerator="cpu", callbacks=[timer])
    latent = model.get_latent_representation(dataloader=dm.inference_dataloader())
    quality = _quality(
        model,
        dm.dataset.obs,
        latent,
        split["train"],
        split["val"],
        dataloader=dm.inference_dataloader("val"),
    )
    return {**_summary(timer), **quality}


def run_scvi_tools(path, split, epochs, batch_size) -> dict:
    import anndata as ad
    import scvi

    adata = ad.read_h5ad(path, backed="r")
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    scvi.settings.seed = 0
    model = scvi.model.SCVI(adata)
    timer = _timer()
    model.train(
        max_epochs=epochs,
        batch_size=batch_size,
        accelerator="cpu",
        callbacks=[timer],
        datasplitter_kwargs={
            "external_indexing": [split["train"], split["val"], np.empty(0, dtype=np.int64)]
        },
    )
    latent = model.get_latent_representation(adata)
    quality = _quality(
        model, adata.obs, latent, split["train"], split["val"], adata=adata, indices=split["val"]
    )
    return {**_summary(timer), **quality}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=20_000)
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--data", type=Path, default=None, help="the .h5ad (written if missing)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    parser.add_argument(
        "--order",
        choices=["scvi-first", "torch_adata-first"],
        default="scvi-first",
        help="which route trains first (this machine's speed drifts: run both orders)",
    )
    args = parser.parse_args(argv)
    path = args.data or Path(f"benchmarks/data/scvi_{args.cells}x{args.genes}.h5ad")
    if not path.exists():
        simulate(path, args.cells, args.genes)
    rng = np.random.default_rng(0)
    order = rng.permutation(args.cells)
    n_val = args.cells // 10
    split = {"train": np.sort(order[n_val:]), "val": np.sort(order[:n_val])}
    results = {
        "cells": args.cells,
        "genes": args.genes,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "order": args.order,
    }
    routes = {"scvi-tools": run_scvi_tools, "torch_adata": run_torch_adata}
    names = list(routes) if args.order == "scvi-first" else list(routes)[::-1]
    for name in names:
        results[name] = routes[name](path, split, args.epochs, args.batch_size)
    ours, theirs = results["torch_adata"], results["scvi-tools"]
    results["epoch_speedup"] = theirs["epoch_s"] / ours["epoch_s"]
    results["data_wait_ratio"] = theirs["data_wait_s"] / ours["data_wait_s"]
    results["val_elbo_rel_diff"] = abs(ours["val_elbo"] - theirs["val_elbo"]) / abs(
        theirs["val_elbo"]
    )
    results["knn_accuracy_diff"] = ours["knn_accuracy"] - theirs["knn_accuracy"]
    print(json.dumps(results, indent=2))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
