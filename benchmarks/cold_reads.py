"""Cold and warm backed reads: concurrent reads (``io_threads`` default) vs one after another.

Usage::

    python benchmarks/generate.py /tmp/cold100k.h5ad          # 100k x 20k CSR, ~1.5 GB
    python benchmarks/disk.py /tmp/cold100k.h5ad              # the disk's limits (fio)
    python benchmarks/cold_reads.py /tmp/cold100k.h5ad --qd1 12204 --qd32 42734

Before each cold pass the file is evicted from the page cache (``posix_fadvise(DONTNEED)``,
checked with ``fincore`` where installed); warm passes follow a full read of the file. Worker
processes persist across passes and every loader reads two batches before its timed pass, so
the figures are steady-state reading, not start-up. Passes
alternate between the loaders in one process (paired), the median of ``--rounds`` rounds is
printed in cells/s, cold uniform figures also as fractions of the disk's random-read limits
(two reads per cell: values and column indices).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from measure import _plan, drop_page_cache, resident_mib


def _loader(path: str, kind: str, io_threads: int | None, workers: int):
    """``epoch(batches)`` -> iterable of batches, for AnnDataset or anndata's backed slicing."""
    import anndata as ad
    import torch
    from torch.utils.data import DataLoader

    import torch_adata as ta

    if kind == "anndata":
        adata = ad.read_h5ad(path, backed="r")
        return lambda batches: (torch.from_numpy(adata[np.sort(b)].X.toarray()) for b in batches)
    dataset = ta.AnnDataset(path, backed=True)
    dataset.fields["X"].reader.io_threads = io_threads
    holder: list = []
    loader = DataLoader(
        dataset,
        sampler=holder,
        batch_size=None,
        collate_fn=ta.collate,
        num_workers=workers,
        multiprocessing_context="fork" if workers else None,
        persistent_workers=bool(workers),
    )

    def epoch(batches):
        holder[:] = batches
        return loader

    return epoch


def _pass(path: str, epoch, batches, cold: bool) -> float:
    if cold:
        drop_page_cache(path)
        left = resident_mib(path)
        assert left is None or left < 16, f"{left:.0f} MiB of the file still cached"
    start = time.perf_counter()
    cells = sum(int(b.shape[0]) for b in epoch(batches))
    return cells / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("path")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=24, help="per cold pass")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--qd1", type=float, help="disk.py's random reads/s at depth 1")
    parser.add_argument("--qd32", type=float, help="disk.py's random reads/s at depth 32")
    args = parser.parse_args()
    path = args.path
    import anndata as ad

    n = ad.read_h5ad(path, backed="r").n_obs
    # (name, loader kind, io_threads, workers, sampler, cold)
    cases = [
        ("cold uniform, 0 workers, anndata X[sorted idx]", "anndata", None, 0, "uniform", True),
        ("cold uniform, 0 workers, sequential (io_threads=1)", "ta", 1, 0, "uniform", True),
        ("cold uniform, 0 workers, concurrent (default)", "ta", None, 0, "uniform", True),
        ("cold uniform, 2 workers, sequential (io_threads=1)", "ta", 1, 2, "uniform", True),
        ("cold uniform, 2 workers, concurrent (default)", "ta", None, 2, "uniform", True),
        ("cold block, 0 workers, sequential (io_threads=1)", "ta", 1, 0, "block", True),
        ("cold block, 0 workers, concurrent (default)", "ta", None, 0, "block", True),
        ("cold block, 2 workers, concurrent (default)", "ta", None, 2, "block", True),
        ("warm uniform, 0 workers, sequential (io_threads=1)", "ta", 1, 0, "uniform", False),
        ("warm uniform, 0 workers, concurrent (default)", "ta", None, 0, "uniform", False),
    ]
    loaders = [_loader(path, kind, t, w) for _, kind, t, w, _, _ in cases]
    results: dict[str, list[float]] = {name: [] for name, *_ in cases}
    for r in range(args.rounds):
        for i, ((name, _, _, _, sampler, cold), epoch) in enumerate(
            zip(cases, loaders, strict=True)
        ):
            count = args.batches if cold else 4 * args.batches
            batches = _plan(n, args.batch_size, sampler, 100 * r + i, count)
            # workers (persistent), reader threads and kernels up before the timed pass
            # (other cells: the reader announces each region to read ahead once, so a warm-up
            # on the timed batches' blocks would leave their regions unannounced after eviction)
            _pass(path, epoch, _plan(n, args.batch_size, sampler, 10_000 + 100 * r + i, 2), False)
            if not cold:
                with open(path, "rb") as f:  # the whole file into the page cache
                    while f.read(64 << 20):
                        pass
            results[name].append(_pass(path, epoch, batches, cold))
    print(f"{args.path}: {n:,} cells, batches of {args.batch_size}, median of {args.rounds}")
    median = {name: statistics.median(v) for name, v in results.items()}
    for name, v in median.items():
        line = f"{name:52s} {v:>9,.0f} cells/s"
        if name.startswith("cold uniform") and args.qd1 and args.qd32:
            line += f"  ({2 * v / args.qd1:.2f} of depth-1, {2 * v / args.qd32:.2f} of depth-32)"
        print(line + "   rounds: " + ", ".join(f"{x:,.0f}" for x in results[name]))
    base = median[cases[0][0]]
    print(f"concurrent / anndata, cold uniform 0 workers: {median[cases[2][0]] / base:.2f}x")


if __name__ == "__main__":
    main()
