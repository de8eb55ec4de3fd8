"""What the plain PyTorch idiom costs against the fast path, and sparse batches densified on
the CPU against dense batches; in memory, in this process, paired.

::

    python benchmarks/plain_vs_fast.py                 # 20,000 cells x 2,000 genes, 10% density
    python benchmarks/plain_vs_fast.py --genes 20000   # wider cells (~1.6 GB of CSR in memory)

Loaders, all ``batch_size=256, shuffle=True``, no workers, over one in-memory AnnData:

``plain``
    ``DataLoader(dataset, batch_size=256, shuffle=True)``: PyTorch's default ``collate_fn``.
``fast``
    The same with ``collate_fn=torch_adata.collate``.
``batch sampler``
    ``DataLoader(dataset, sampler=BatchSampler(RandomSampler(dataset), 256, False),
    batch_size=None)``: whole batches from ``dataset[indices]``, no per-cell samples at all
    (what :class:`~torch_adata.AnnDataModule`'s loaders do).
``sparse+densify``
    ``AnnDataset(adata, sparse=True)`` on the fast path, each batch densified on the CPU with
    ``torch_adata.densify`` (against ``fast``, dense batches).

Each comparison is paired: every round runs one pass of each loader (``--batches`` batches,
order alternating from round to round) and takes the ratio within the round; the median of
the rounds is reported with its range, so a machine whose speed drifts slows both sides alike.
Runtime: about a minute with the defaults.
"""

from __future__ import annotations

import argparse
import statistics
import time
from itertools import islice

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

import torch_adata as ta


def synthetic(n_cells: int, n_genes: int, density: float, seed: int = 0) -> ad.AnnData:
    """A CSR AnnData of float32 counts (1 + Geometric(0.5)) at ``density``, with a label."""
    rng = np.random.default_rng(seed)
    blocks = []
    for start in range(0, n_cells, 1000):
        rows = min(1000, n_cells - start)
        mask = rng.random((rows, n_genes), dtype=np.float32) < density
        block = sp.csr_matrix(mask, dtype=np.float32)
        block.data = (1 + rng.geometric(0.5, block.nnz)).astype(np.float32)
        blocks.append(block)
    adata = ad.AnnData(sp.vstack(blocks, format="csr"))
    adata.obs["cell_type"] = rng.choice(["a", "b", "c"], n_cells)
    return adata


def one_pass(loader: DataLoader, n_batches: int, densify: bool) -> float:
    """Cells per second of the loader's next ``n_batches`` batches."""
    cells = 0
    start = time.perf_counter()
    for batch in islice(loader, n_batches):
        if densify:
            batch = ta.densify(batch)
        x = batch["X"] if isinstance(batch, dict) else batch
        cells += x.shape[0]
    return cells / (time.perf_counter() - start)


def paired(loaders: dict[str, tuple[DataLoader, bool]], rounds: int, n_batches: int) -> dict:
    """Cells/s of each loader and the ratio of each to the first, median over rounds."""
    names = list(loaders)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for name in names:  # warm-up: first batches, kernels, recycled buffers
        one_pass(*loaders[name][:1], 2, loaders[name][1])
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            loader, densify = loaders[name]
            rates[name].append(one_pass(loader, n_batches, densify))
    base = rates[names[0]]
    out = {}
    for name in names:
        ratios = [a / b for a, b in zip(rates[name], base, strict=True)]
        out[name] = {
            "cells/s": statistics.median(rates[name]),
            "ratio": statistics.median(ratios),
            "range": (min(ratios), max(ratios)),
        }
    return out


def loader(dataset, fast: bool) -> DataLoader:
    kwargs = {"collate_fn": ta.collate} if fast else {}
    return DataLoader(dataset, batch_size=256, shuffle=True, **kwargs)


def batch_sampler_loader(dataset) -> DataLoader:
    """Whole batches from ``dataset[indices]`` (``batch_size=None``): no per-cell samples."""
    batches = BatchSampler(RandomSampler(dataset), 256, drop_last=False)
    return DataLoader(dataset, sampler=batches, batch_size=None, collate_fn=ta.collate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=20_000)
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()

    adata = synthetic(args.cells, args.genes, args.density)
    print(
        f"{args.cells:,} cells x {args.genes:,} genes, {adata.X.nnz / adata.n_obs:,.0f} "
        f"non-zeros per cell, in memory; batches of 256, {args.batches} per pass, "
        f"{args.rounds} rounds; torch threads: {torch.get_num_threads()}"
    )
    dense = ta.AnnDataset(adata)
    labelled = ta.AnnDataset(adata, obs_keys="cell_type")
    sparse = ta.AnnDataset(adata, sparse=True)
    comparisons = {
        f"{name}": {
            "fast": (loader(dataset, True), False),
            "plain": (loader(dataset, False), False),
            "batch sampler": (batch_sampler_loader(dataset), False),
        }
        for name, dataset in (
            ("dense X", dense),
            ("dense X + label", labelled),
            ("sparse X", sparse),
        )
    } | {
        "densify on the CPU (fast path)": {
            "dense batches": (loader(dense, True), False),
            "sparse+densify": (loader(sparse, True), True),
        },
    }
    for title, loaders in comparisons.items():
        print(f"\n{title}")
        for name, got in paired(loaders, args.rounds, args.batches).items():
            low, high = got["range"]
            print(
                f"  {name:15s} {got['cells/s']:>10,.0f} cells/s   x{got['ratio']:.2f} "
                f"(range {low:.2f}-{high:.2f})"
            )


if __name__ == "__main__":
    main()
