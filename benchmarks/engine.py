"""Engine benchmark: AnnDataset vs two baselines on a synthetic CSR count matrix.

Usage::

    python benchmarks/engine.py                      # 100,000 x 20,000, ~2,000 nnz/cell
    python benchmarks/engine.py --cells 20000 --quick

Every configuration runs in a fresh subprocess so its peak RSS is its own; each reports cells/s
(median of ``--repeats`` runs of ``--batches`` shuffled batches of ``--batch-size`` cells, dense
float32) and peak RSS. Ratios are taken against the baselines of the same run:

- ``per-cell``: a ``__getitem__`` dataset returning one dense row, default collate;
- ``batched``: ``X[idx].toarray()`` per batch (in memory), and anndata's own backed
  ``adata[sorted idx].X`` per batch (backed).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
CONFIGS = [
    ("per-cell", "memory", 0),
    ("batched", "memory", 0),
    ("AnnDataset", "memory", 0),
    ("AnnDataset sparse", "memory", 0),
    ("batched", "backed", 0),
    ("AnnDataset", "backed", 0),
    ("AnnDataset", "backed", 2),
    ("empty process", "-", 0),
]


def make_data(path: Path, n_cells: int, n_genes: int, nnz: int, seed: int = 0) -> None:
    """Write a CSR count matrix with ~``nnz`` distinct sorted columns per row (vectorised)."""
    import anndata as ad
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    indptr = [np.zeros(1, np.int64)]
    indices, data = [], []
    width = int(nnz * 1.6)
    for start in range(0, n_cells, 5000):
        rows = min(5000, n_cells - start)
        gaps = rng.geometric(nnz / n_genes, size=(rows, width)).astype(np.int32)
        cols = np.cumsum(gaps, axis=1) - 1
        keep = cols < n_genes
        indices.append(cols[keep])
        data.append((1 + rng.geometric(0.5, keep.sum())).astype(np.float32))
        indptr.append(indptr[-1][-1] + np.cumsum(keep.sum(1)))
    X = sp.csr_matrix(
        (np.concatenate(data), np.concatenate(indices), np.concatenate(indptr)),
        shape=(n_cells, n_genes),
    )
    rng_labels = np.repeat(np.arange(20), -(-n_cells // 20))[:n_cells]
    import pandas as pd

    obs = pd.DataFrame(
        {"label": pd.Categorical(rng_labels.astype(str))}, index=np.arange(n_cells).astype(str)
    )
    ad.AnnData(X, obs=obs).write_h5ad(path)


def _peak_rss_mb() -> float:
    # VmHWM restarts at exec (ru_maxrss would carry the parent process's peak over).
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _batches(n: int, batch_size: int, count: int, seed: int):
    rng = np.random.default_rng(seed)
    return [rng.choice(n, batch_size, replace=False) for _ in range(count)]


def run_one(name: str, mode: str, workers: int, args) -> dict:
    """Measure one configuration in this process; return cells/s, first-batch time, RSS."""
    import anndata as ad
    import torch
    from torch.utils.data import DataLoader, Dataset

    import torch_adata as ta

    if name == "empty process":
        return {"rss_mb": _peak_rss_mb()}
    path = args.path
    adata = ad.read_h5ad(path, backed="r" if mode == "backed" else None)
    n = adata.n_obs
    batch_size = args.batch_size
    count = max(2, args.batches // 10) if name == "per-cell" else args.batches

    if name == "per-cell":
        X = adata.X

        class PerCell(Dataset):
            def __len__(self):
                return n

            def __getitem__(self, i):
                return torch.from_numpy(X[i].toarray()[0])

        def epoch(seed):
            sampler = np.concatenate(_batches(n, batch_size, count, seed))
            loader = DataLoader(PerCell(), batch_size=batch_size, sampler=sampler.tolist())
            yield from loader

    elif name == "batched":
        X = adata.X

        def epoch(seed):
            for idx in _batches(n, batch_size, count, seed):
                if mode == "backed":  # anndata's own backed read, sorted as it requires
                    yield torch.from_numpy(adata[np.sort(idx)].X.toarray())
                else:
                    yield torch.from_numpy(X[idx].toarray())

    else:
        source = path if mode == "backed" else adata
        dataset = ta.AnnDataset(source, sparse=name.endswith("sparse"))

        def epoch(seed):
            loader = DataLoader(
                dataset,
                sampler=_batches(n, batch_size, count, seed),
                batch_size=None,
                collate_fn=ta.collate,
                num_workers=workers,
                multiprocessing_context="fork" if workers else None,
            )
            yield from loader

    rates, first = [], None
    for repeat in range(args.repeats + 1):  # the first pass warms caches and compiles kernels
        start = time.perf_counter()
        cells = 0
        for i, batch in enumerate(epoch(repeat)):
            if i == 0 and first is None:
                first = time.perf_counter() - start
            cells += batch.shape[0]
        if repeat:
            rates.append(cells / (time.perf_counter() - start))
    return {
        "cells_per_s": float(np.median(rates)),
        "first_batch_s": first,
        "rss_mb": _peak_rss_mb(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=100_000)
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--nnz", type=int, default=2_000, help="non-zeros per cell")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="fewer batches and repeats")
    parser.add_argument("--data-dir", type=Path, default=HERE / "data")
    parser.add_argument(
        "--one", nargs=3, metavar=("NAME", "MODE", "WORKERS"), help=argparse.SUPPRESS
    )
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.batches, args.repeats = 50, 2
    if args.one:
        name, mode, workers = args.one
        print(json.dumps(run_one(name, mode, int(workers), args)))
        return
    args.data_dir.mkdir(parents=True, exist_ok=True)
    path = args.data_dir / f"csr_{args.cells}x{args.genes}_{args.nnz}.h5ad"
    if not path.exists():
        t = time.perf_counter()
        make_data(path, args.cells, args.genes, args.nnz)
        print(f"wrote {path} in {time.perf_counter() - t:.0f} s")
    import h5py

    with h5py.File(path) as f:
        csr_mb = sum(f["X"][k].size * f["X"][k].dtype.itemsize for k in f["X"]) / 2**20
        nnz = f["X/data"].size
    print(
        f"{args.cells} cells x {args.genes} genes, {nnz / args.cells:.0f} nnz/cell, "
        f"CSR {csr_mb:.0f} MiB; batches of {args.batch_size}, {args.batches} batches, "
        f"median of {args.repeats}\n"
    )
    results = {}
    for name, mode, workers in CONFIGS:
        cmd = [
            sys.executable,
            __file__,
            "--one",
            name,
            mode,
            str(workers),
            "--path",
            str(path),
            "--batch-size",
            str(args.batch_size),
            "--batches",
            str(args.batches),
            "--repeats",
            str(args.repeats),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
        if out.returncode:
            raise SystemExit(f"{name} {mode} failed:\n{out.stderr[-2000:]}")
        results[(name, mode, workers)] = json.loads(out.stdout.strip().splitlines()[-1])
    base_rss = results[("empty process", "-", 0)]["rss_mb"]
    print(
        "| loader | mode | workers | cells/s | x per-cell | x batched | first batch | "
        "peak RSS | RSS / CSR |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for (name, mode, workers), r in results.items():
        if name == "empty process":
            print(
                f"| empty process (python+torch+anndata) | - | - | - | - | - | - | "
                f"{base_rss:,.0f} MiB | - |"
            )
            continue
        percell = results[("per-cell", "memory", 0)]["cells_per_s"]
        batched = results[("batched", mode, 0)]["cells_per_s"]
        print(
            f"| {name} | {mode} | {workers} | {r['cells_per_s']:,.0f} | "
            f"{r['cells_per_s'] / percell:.1f} | {r['cells_per_s'] / batched:.2f} | "
            f"{r['first_batch_s']:.2f} s | {r['rss_mb']:,.0f} MiB | "
            f"{r['rss_mb'] / csr_mb:.2f} |"
        )
    print(
        "\nRSS of backed runs above the empty process: "
        + ", ".join(
            f"{n} w{w}: {results[(n, m, w)]['rss_mb'] - base_rss:,.0f} MiB"
            for n, m, w in results
            if m == "backed"
        )
    )


if __name__ == "__main__":
    main()
