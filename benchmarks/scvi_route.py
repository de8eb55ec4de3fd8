"""The same SCVI model trained on a backed ``.h5ad`` through torch_adata and through scvi-tools.

Usage::

    python benchmarks/scvi_route.py --cells 20000 --genes 2000 --order torch_adata-first
    # the issue's size, 40 steps per epoch (a whole epoch is ~2-3 minutes per route on 2 cores)
    python benchmarks/scvi_route.py --cells 100000 --genes 20000 --epochs 3 --steps 40
    # where the time goes: each loader alone, and the model alone on loaded batches
    python benchmarks/scvi_route.py --cells 100000 --genes 20000 --profile --steps 40

Writes a simulated count matrix with cell types and batch effects (negative binomial, CSR,
``--cells`` x ``--genes``) to ``--data`` unless it exists, then trains ``scvi.model.SCVI``
(default size, batch 256, seed 0, the same train/validation cells) twice on it, opened backed:

- ``torch_adata``: :class:`torch_adata.scvi.SCVIDataModule` (``backed=True``), ``model.train
  (datamodule=dm)``;
- ``scvi-tools``: ``SCVI.setup_anndata`` on ``ad.read_h5ad(path, backed="r")``, then
  ``model.train`` (its own ``DataSplitter``, given the same cells with ``external_indexing``).

Per route it prints the median (and minimum) wall time of a training epoch (epochs after the
first, which includes start-up; no validation runs during training), the share of the epoch
spent waiting for data (the time between the end of one training step and the start of the
next, plus the wait for the first batch), the validation ELBO and reconstruction loss after
training (same cells, scvi's ``get_elbo`` / ``get_reconstruction_error``), and the kNN (k=15)
cell-type accuracy of the validation cells' latent, the classifier fitted on the training
cells' latent. Both routes load in the training process (``num_workers=0``, scvi's default).
``--steps N`` stops each epoch after N batches (Lightning's ``limit_train_batches``, both
routes); ``step_s`` is then an epoch's time per step and ``whole_epoch_s`` that times the
steps of a whole epoch.

``--profile`` trains nothing of the comparison: in rounds, it times each loader alone
(batches drawn, under scvi's keys, dense, no model) and the model alone (training steps on
batches loaded beforehand), which bounds what any loader can gain: an epoch is never shorter
than the model's own steps.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def simulate(path: Path, n_cells: int, n_genes: int, seed: int = 0) -> None:
    """Counts of ``n_cells`` cells of 8 types in 3 batches (negative binomial), as CSR.

    Up to 4,000 genes every gene keeps its mean (28% of the entries are nonzero, ~1 count per
    gene); with more genes, the means shrink by ``4000 / n_genes`` so a cell keeps ~4,300
    counts over ~2,300 detected genes (12% nonzero at 20,000 genes), as a droplet cell does.
    """
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    n_types, n_batches = 8, 3
    base = rng.gamma(0.3, 2.0, n_genes) * min(1.0, 4000 / n_genes)  # most genes low, a few high
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
            self.epochs, self.waits, self.steps = [], [], []

        def on_train_epoch_start(self, trainer, module):
            self.start = self.last = time.perf_counter()
            self.wait, self.step = 0.0, 0

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.wait += time.perf_counter() - self.last
            self.step += 1

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.last = time.perf_counter()

        def on_train_epoch_end(self, trainer, module):
            self.epochs.append(time.perf_counter() - self.start)
            self.waits.append(self.wait)
            self.steps.append(self.step)

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


def _summary(timer, full_steps: int) -> dict:
    epochs, waits = np.asarray(timer.epochs), np.asarray(timer.waits)
    later = slice(1, None) if len(epochs) > 1 else slice(None)
    step_s = float(np.median(epochs[later] / np.asarray(timer.steps)[later]))
    return {
        "steps": timer.steps[-1],
        "step_s": step_s,
        "whole_epoch_s": step_s * full_steps,  # the measured steps scaled to a whole epoch
        "epoch_s": float(np.median(epochs[later])),
        "epoch_min_s": float(np.min(epochs[later])),
        "data_wait_s": float(np.median(waits[later])),
        "data_wait_share": float(np.median(waits[later] / epochs[later])),
        "epochs_s": [round(float(e), 3) for e in epochs],
        "load_average_1min": os.getloadavg()[0],
    }


def run_torch_adata(path, split, epochs, batch_size, steps=None, quality=True, workers=0) -> dict:
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
        num_workers=workers,
    )
    scvi.settings.seed = 0
    model = scvi.model.SCVI(registry=dm.registry)
    timer = _timer()
    model.train(
        max_epochs=epochs,
        datamodule=dm,
        accelerator="cpu",
        callbacks=[timer],
        limit_train_batches=steps or 1.0,
    )
    summary = _summary(timer, -(-len(split["train"]) // batch_size))
    if not quality:
        return summary
    latent = model.get_latent_representation(dataloader=dm.inference_dataloader())
    scores = _quality(
        model,
        dm.dataset.obs,
        latent,
        split["train"],
        split["val"],
        dataloader=dm.inference_dataloader("val"),
    )
    return {**summary, **scores}


def run_scvi_tools(path, split, epochs, batch_size, steps=None, quality=True, workers=0) -> dict:
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
        limit_train_batches=steps or 1.0,
        datasplitter_kwargs={
            "external_indexing": [split["train"], split["val"], np.empty(0, dtype=np.int64)]
        },
    )
    summary = _summary(timer, -(-len(split["train"]) // batch_size))
    if not quality:
        return summary
    latent = model.get_latent_representation(adata)
    scores = _quality(
        model, adata.obs, latent, split["train"], split["val"], adata=adata, indices=split["val"]
    )
    return {**summary, **scores}


def _scvi_loader(path, split, batch_size):
    """scvi-tools' own training loader (as its ``train`` builds it) on the backed file."""
    import anndata as ad
    import scvi
    from scvi.dataloaders import AnnDataLoader

    adata = ad.read_h5ad(path, backed="r")
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    model = scvi.model.SCVI(adata)
    return AnnDataLoader(
        model.adata_manager, indices=split["train"], batch_size=batch_size, shuffle=True
    )


def _our_module(path, split, batch_size, **options):
    from torch_adata import Split
    from torch_adata.scvi import SCVIDataModule

    return SCVIDataModule(
        path,
        batch_key="batch",
        backed=True,
        batch_size=batch_size,
        split=Split(indices={"train": split["train"].tolist()}),
        seed=0,
        **options,
    )


def _endless(make_loader, convert=lambda b: b):
    """Batches of one epoch after another, under scvi's keys, with dense ``"X"``."""
    from torch_adata import densify

    while True:
        for batch in make_loader():
            tensors = convert(batch)
            tensors["X"] = densify(tensors["X"])
            yield tensors


def _time_batches(batches, steps: int) -> float:
    """Seconds per batch to draw ``steps`` batches."""
    start = time.perf_counter()
    for _ in range(steps):
        next(batches)
    return (time.perf_counter() - start) / steps


def _time_steps(module, optimizer, loaded: list, steps: int) -> float:
    """Seconds per training step (forward, loss, backward, Adam) on batches loaded already."""
    start = time.perf_counter()
    for i in range(steps):
        _, _, loss = module(loaded[i % len(loaded)], loss_kwargs={"kl_weight": 1.0})
        optimizer.zero_grad()
        loss.loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / steps


def run_profile(path, split, batch_size, repeats, variants, steps=None) -> dict:
    """Where an epoch's time goes: each loader alone, and the model alone on loaded batches.

    Rounds of ``steps`` batches (default 20) of each loader, drawn under scvi's keys with
    dense ``"X"`` and no model, then ``steps`` training steps of the same SCVI (forward, loss,
    backward and Adam, as scvi's training plan runs them, without Lightning) on 16 batches
    loaded beforehand, so no data is read. Every round measures all of them one after the
    other, so they see the same machine; ``*_step_s`` are medians over ``repeats`` rounds,
    and ``ratios`` the per-round ratios' medians. ``*_epoch_s``: per step times the steps of
    a whole epoch. An epoch is never shorter than the model's own steps, whatever the loader.
    """
    import scvi
    import torch

    full = -(-len(split["train"]) // batch_size)  # steps of a whole epoch
    steps = min(steps or 20, full)
    theirs = _scvi_loader(path, split, batch_size)
    loaders = {"scvi-tools": _endless(lambda: theirs)}
    for name, options in variants.items():
        dm = _our_module(path, split, batch_size, **options)
        dm.setup()
        convert = lambda b, dm=dm: dm.on_before_batch_transfer(b, 0)  # noqa: E731
        loaders[name] = _endless(dm.train_dataloader, convert)
    for batches in loaders.values():
        _time_batches(batches, full)  # an epoch each: the page cache warm, kernels compiled
    dm = _our_module(path, split, batch_size)
    loaded = [next(loaders["torch_adata"]) for _ in range(16)]
    scvi.settings.seed = 0
    module = scvi.model.SCVI(registry=dm.registry).module
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3, eps=0.01, weight_decay=1e-6)
    _time_steps(module, optimizer, loaded, 2)
    rounds = {name: [] for name in [*loaders, "model"]}
    for _ in range(repeats):
        for name, batches in loaders.items():
            rounds[name].append(_time_batches(batches, steps))
        rounds["model"].append(_time_steps(module, optimizer, loaded, steps))
    model = np.asarray(rounds["model"])
    scvi_rounds = np.asarray(rounds["scvi-tools"])
    out: dict = {"steps_per_epoch": full, "steps_per_round": steps, "rounds": repeats}
    out["loaders"] = {
        name: {
            "loader_step_s": float(np.median(rounds[name])),
            "loader_epoch_s": float(np.median(rounds[name])) * full,
            "share_of_a_step_with_the_model": float(
                np.median(np.asarray(rounds[name]) / (model + rounds[name]))
            ),
            "rounds": [round(t, 5) for t in rounds[name]],
        }
        for name in loaders
    }
    out["model_step_s"] = float(np.median(model))
    out["model_epoch_s"] = out["model_step_s"] * full
    out["model_rounds"] = [round(t, 4) for t in rounds["model"]]
    # scvi's loader runs in the training process: its epoch is about model + loader, and no
    # loader makes an epoch shorter than the model's steps: the most any loader can gain.
    out["max_speedup"] = float(np.median((model + scvi_rounds) / model))
    out["load_average_1min"] = os.getloadavg()[0]
    return out


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
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead of training both routes: time each loader alone and the model alone",
    )
    parser.add_argument("--repeats", type=int, default=5, help="rounds (--profile)")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="train only this many batches per epoch (default: whole epochs); with "
        "--profile, batches and steps per round (default 20)",
    )
    parser.add_argument(
        "--no-quality",
        action="store_true",
        help="skip the validation ELBO and kNN accuracy (minutes at 100,000 x 20,000 on CPU)",
    )
    parser.add_argument(
        "--workers", type=int, default=0, help="DataLoader workers of the torch_adata route"
    )
    args = parser.parse_args(argv)
    path = args.data or Path(f"benchmarks/data/scvi_{args.cells}x{args.genes}.h5ad")
    if not path.exists():
        simulate(path, args.cells, args.genes)
    rng = np.random.default_rng(0)
    order = rng.permutation(args.cells)
    n_val = args.cells // 10
    split = {"train": np.sort(order[n_val:]), "val": np.sort(order[:n_val])}
    if args.profile:
        variants = {
            "torch_adata": {},
            "torch_adata sparse": {"sparse": True},
        }
        results = {"cells": args.cells, "genes": args.genes, "batch_size": args.batch_size}
        results.update(
            run_profile(path, split, args.batch_size, args.repeats, variants, args.steps)
        )
        print(json.dumps(results, indent=2))
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2))
        return results
    results = {
        "cells": args.cells,
        "genes": args.genes,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "order": args.order,
        "steps": args.steps,
        "workers": args.workers,
    }
    routes = {"scvi-tools": run_scvi_tools, "torch_adata": run_torch_adata}
    names = list(routes) if args.order == "scvi-first" else list(routes)[::-1]
    for name in names:
        workers = args.workers if name == "torch_adata" else 0
        results[name] = routes[name](
            path, split, args.epochs, args.batch_size, args.steps, not args.no_quality, workers
        )
    ours, theirs = results["torch_adata"], results["scvi-tools"]
    results["epoch_speedup"] = theirs["epoch_s"] / ours["epoch_s"]
    results["data_wait_ratio"] = theirs["data_wait_s"] / ours["data_wait_s"]
    if not args.no_quality:
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
