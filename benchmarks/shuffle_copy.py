"""Time and peak memory of writing a shuffled copy, and the batch mix block shuffle gets from it.

Usage::

    python benchmarks/shuffle_copy.py FILE.h5ad                 # cold source, copy deleted after
    python benchmarks/shuffle_copy.py FILE.h5ad --chunk-mib 64 --keep

Runs :func:`torch_adata.write_shuffled` in this process (so ``ru_maxrss`` is the writer's own
peak RSS) on ``FILE`` evicted from the page cache first (``--warm`` keeps it), writing next to
it. Then, from ``obs["cell_type"]`` (``--label``), the mean total-variation distance of a
batch's label mix from the whole's, over 4 epochs of 256-cell batches: uniform sampling and
block shuffle on the source order and on the copy's order. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from disk import evict  # noqa: E402


def mean_tv(labels: np.ndarray, sampler, epochs: int = 4) -> float:
    """Mean over batches of the total-variation distance of a batch's label frequencies from
    the global ones (0: every batch has the global mix)."""
    k = int(labels.max()) + 1
    overall = np.bincount(labels, minlength=k) / len(labels)
    out = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for batch in sampler:
            mix = np.bincount(labels[np.asarray(batch)], minlength=k) / len(batch)
            out.append(0.5 * np.abs(mix - overall).sum())
    return float(np.mean(out))


def run(source: Path, chunk_mib: float, cold: bool, keep: bool, label: str, seed: int = 0) -> dict:
    import torch_adata as ta
    from torch_adata.samplers import BlockShuffleSampler, UniformBatchSampler

    destination = source.with_name(source.stem + f".shuffled{seed}.h5ad")
    if cold:
        evict(source)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    perm = ta.write_shuffled(source, destination, seed=seed, chunk_mib=chunk_mib, overwrite=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "file_mib": source.stat().st_size / 2**20,
        "copy_mib": destination.stat().st_size / 2**20,
        "cells": len(perm),
        "chunk_mib": chunk_mib,
        "cold": cold,
        "seconds": seconds,
        "mib_per_s": source.stat().st_size / 2**20 / seconds,
        "peak_rss_mib": peak,
        "rss_before_mib": rss_before,
    }
    try:
        import anndata as ad

        labels = ad.read_h5ad(source, backed="r").obs[label].cat.codes.to_numpy().astype(np.int64)
        copied = labels[perm]
        n = len(labels)
        result["tv"] = {
            "uniform": mean_tv(labels, UniformBatchSampler(n, 256, seed=1)),
            "block, source order": mean_tv(labels, BlockShuffleSampler(n, 256, seed=1)),
            "block, shuffled copy": mean_tv(copied, BlockShuffleSampler(n, 256, seed=1)),
        }
    except KeyError:
        pass
    if not keep:
        destination.unlink()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("--chunk-mib", type=float, default=64)
    parser.add_argument("--warm", action="store_true", help="do not evict the source first")
    parser.add_argument("--keep", action="store_true", help="keep the copy")
    parser.add_argument("--label", default="cell_type", help="categorical obs column for TV")
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    print(json.dumps(run(args.file, args.chunk_mib, not args.warm, args.keep, args.label)))


if __name__ == "__main__":
    main()
