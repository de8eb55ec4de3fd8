"""Cold and warm backed reads: concurrent reads, block shuffle read ahead, workers.

Usage::

    python benchmarks/generate.py /tmp/cold100k.h5ad          # 100k x 20k CSR, ~1.5 GB
    python benchmarks/disk.py /tmp/cold100k.h5ad              # the disk's limits (fio)
    python benchmarks/cold_reads.py /tmp/cold100k.h5ad --seq 1158 --qd1 12204 --qd32 42734

Before each cold pass the file is evicted from the page cache (``posix_fadvise(DONTNEED)``,
checked with ``fincore`` where installed); warm passes follow a full read of the file. Worker
processes persist across passes and every loader reads two batches before its timed pass, so
the figures are steady-state reading, not start-up. Passes alternate between the loaders in one
process (paired), the median of ``--rounds`` rounds is printed in cells/s; cold uniform figures
also as fractions of the disk's random-read limits (two reads per cell: values and column
indices), block figures as fractions of its sequential limit (``--seq`` MiB/s over the stored
bytes per cell). Uniform passes read ``--batches`` batches; block passes read one epoch of
``BlockShuffleSampler`` (defaults: blocks of 64, pools of 16 batches) over the first
``--block-batches`` x ``--batch-size`` cells, with and without ``read_ahead=dataset``; each
cold block case with read-ahead is also run on the warm file and printed as cold / warm (how
much of the gap the disk still causes).
``--sparse`` asks for sparse batches (no densifying: the reads' own speed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from measure import _plan, drop_page_cache, resident_mib


@dataclass
class Case:
    name: str
    kind: str = "ta"  # or "anndata"
    io_threads: int | None = None
    workers: int = 0
    sampler: str = "uniform"  # "uniform", "block" or "block+read_ahead"
    cold: bool = True


CASES = [
    Case("cold uniform, 0 workers, anndata X[sorted idx]", kind="anndata"),
    Case("cold uniform, 0 workers, one read after another", io_threads=1),
    Case("cold uniform, 0 workers, concurrent (default)"),
    Case("cold uniform, 2 workers, concurrent (default)", workers=2),
    Case("cold block, 0 workers, no read-ahead", sampler="block"),
    Case("cold block, 0 workers, read_ahead=dataset", sampler="block+read_ahead"),
    Case("cold block, 2 workers, read_ahead=dataset", workers=2, sampler="block+read_ahead"),
    Case("warm block, 0 workers (the same, file in memory)", sampler="block", cold=False),
    Case("warm block, 0 workers, read_ahead=dataset", sampler="block+read_ahead", cold=False),
    Case(
        "warm block, 2 workers, read_ahead=dataset",
        workers=2,
        sampler="block+read_ahead",
        cold=False,
    ),
    Case("warm uniform, 0 workers, concurrent (default)", cold=False),
]


def _loader(path: str, case: Case, sparse: bool, n_block: int, batch_size: int):
    """``epoch(plan)`` -> iterable of batches; ``plan``: batches, or an epoch number (block)."""
    import anndata as ad
    import torch
    from torch.utils.data import DataLoader

    import torch_adata as ta
    from torch_adata.samplers import BlockShuffleSampler

    if case.kind == "anndata":
        adata = ad.read_h5ad(path, backed="r")
        return lambda batches: (torch.from_numpy(adata[np.sort(b)].X.toarray()) for b in batches)
    dataset = ta.AnnDataset(path, backed=True, io_threads=case.io_threads, sparse=sparse)
    block = None
    if case.sampler.startswith("block"):
        ahead = dataset if case.sampler == "block+read_ahead" else None
        block = BlockShuffleSampler(np.arange(n_block), batch_size, read_ahead=ahead)
    holder: list = []
    loader = DataLoader(
        dataset,
        sampler=block if block is not None else holder,
        batch_size=None,
        collate_fn=ta.collate,
        num_workers=case.workers,
        multiprocessing_context="fork" if case.workers else None,
        persistent_workers=bool(case.workers),
    )

    def epoch(plan):
        if block is not None:
            block.set_epoch(plan)
        else:
            holder[:] = plan
        return loader

    return epoch


def _pass(path: str, epoch, plan, cold: bool) -> float:
    if cold:
        time.sleep(0.5)  # reads announced by the last pass settle before the file is evicted
        drop_page_cache(path)
        left = resident_mib(path)
        assert left is None or left < 16, f"{left:.0f} MiB of the file still cached"
    start = time.perf_counter()
    cells = sum(int(b.shape[0]) for b in epoch(plan))
    return cells / (time.perf_counter() - start)


def _bytes_per_cell(path: str) -> float:
    import h5py

    with h5py.File(path, "r") as f:
        x = f["X"]
        return (x["data"].nbytes + x["indices"].nbytes) / (len(x["indptr"]) - 1)


def measure(
    path: str,
    cases: list[Case],
    batch_size: int = 256,
    batches: int = 24,
    block_batches: int = 192,
    rounds: int = 3,
    sparse: bool = False,
) -> dict:
    """Run ``cases`` on ``path``, passes alternating, ``rounds`` times.

    Returns ``{"cells", "block_cells", "bytes_per_cell", "rounds": {case name: [cells/s per
    round]}}``.
    """
    import anndata as ad

    n = ad.read_h5ad(path, backed="r").n_obs
    n_block = min(n, block_batches * batch_size)
    loaders = [_loader(path, c, sparse, n_block, batch_size) for c in cases]
    results: dict[str, list[float]] = {c.name: [] for c in cases}
    for r in range(rounds):
        for i, (case, epoch) in enumerate(zip(cases, loaders, strict=True)):
            block = case.sampler.startswith("block")
            count = batches if case.cold else 4 * batches
            plan = 1 + r if block else _plan(n, batch_size, "uniform", 100 * r + i, count)
            # workers (persistent), reader threads and kernels up before the timed pass
            # (other cells: the reader announces each region to read ahead once, so a warm-up
            # on the timed batches' blocks would leave their regions unannounced after eviction)
            warm_up = _plan(n, batch_size, "uniform", 10_000 + 100 * r + i, 2)
            if block:
                list(zip(range(2), epoch(1000 + r), strict=False))
            else:
                _pass(path, epoch, warm_up, False)
            if not case.cold:
                with open(path, "rb") as f:  # the whole file into the page cache
                    while f.read(64 << 20):
                        pass
            results[case.name].append(_pass(path, epoch, plan, case.cold))
    return {
        "cells": n,
        "block_cells": n_block,
        "bytes_per_cell": _bytes_per_cell(path),
        "rounds": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("path")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=24, help="per cold uniform pass")
    parser.add_argument("--block-batches", type=int, default=192, help="per block pass")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sparse", action="store_true", help="sparse batches")
    parser.add_argument(
        "--only", default="", help="comma-separated texts: run the cases whose name has one"
    )
    parser.add_argument(
        "--case", action="append", help="a case's exact name (repeatable; instead of --only)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON line (measure())")
    parser.add_argument("--seq", type=float, help="disk.py's sequential MiB/s")
    parser.add_argument("--qd1", type=float, help="disk.py's random reads/s at depth 1")
    parser.add_argument("--qd32", type=float, help="disk.py's random reads/s at depth 32")
    args = parser.parse_args()
    path = args.path
    if args.case:
        by_name = {c.name: c for c in CASES}
        unknown = [c for c in args.case if c not in by_name]
        if unknown:
            sys.exit(f"cold_reads.py: no case named {unknown}; the cases: {list(by_name)}")
        cases = [by_name[c] for c in args.case]
    else:
        wanted = [w.strip() for w in args.only.split(",")]
        cases = [c for c in CASES if any(w in c.name for w in wanted)]
    measured = measure(
        path, cases, args.batch_size, args.batches, args.block_batches, args.rounds, args.sparse
    )
    if args.json:
        print(json.dumps(measured))
        return
    n, n_block, per_cell = measured["cells"], measured["block_cells"], measured["bytes_per_cell"]
    results = measured["rounds"]
    kind = "sparse" if args.sparse else "dense"
    print(
        f"{path}: {n:,} cells ({per_cell / 1e3:.1f} kB stored per cell), {kind} batches of "
        f"{args.batch_size}, block passes over {n_block:,} cells, median of {args.rounds}"
    )
    if args.seq:
        print(
            f"sequential limit: {args.seq:,.0f} MiB/s = {args.seq * 2**20 / per_cell:,.0f} cells/s"
        )
    median = {name: statistics.median(v) for name, v in results.items()}
    for case in cases:
        v = median[case.name]
        line = f"{case.name:52s} {v:>9,.0f} cells/s"
        if case.cold and case.sampler == "uniform" and args.qd1 and args.qd32:
            line += f"  ({2 * v / args.qd1:.2f} of depth-1, {2 * v / args.qd32:.2f} of depth-32)"
        if case.cold and case.sampler.startswith("block") and args.seq:
            line += f"  ({v * per_cell / (args.seq * 2**20):.2f} of sequential)"
        print(line + "   rounds: " + ", ".join(f"{x:,.0f}" for x in results[case.name]))
    for case in cases:  # each cold block case against the same case on a warm file
        if not (case.cold and case.sampler.startswith("block")):
            continue
        warm = case.name.replace("cold", "warm", 1)
        if warm in median:
            print(f"cold / warm, {case.name[5:]}: {median[case.name] / median[warm]:.2f}")
    names = [c.name for c in cases]
    if names[:3] == [c.name for c in CASES[:3]]:
        print(
            f"concurrent / anndata, cold uniform 0 workers: {median[names[2]] / median[names[0]]:.2f}x"
        )


if __name__ == "__main__":
    main()
