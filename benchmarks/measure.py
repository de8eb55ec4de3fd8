"""Measure one loader configuration in this process: cells/s, first batch, peak memory.

Run by ``suite.py`` in a fresh process per configuration (so peak RSS is that
configuration's own), with the configuration as JSON; prints one JSON line of results::

    python benchmarks/measure.py '{"loader": "AnnDataset", "path": "x.h5ad", "mode": "backed"}'

Loaders (``"loader"``):

``per-cell``
    A map-style dataset whose ``__getitem__`` returns one dense row (``X[i].toarray()``),
    batched by the DataLoader's default collate: the naive baseline.
``batched``
    ``X[idx].toarray()`` per batch on an in-memory AnnData: the vectorised scipy baseline.
``anndata-backed``
    anndata's own backed read, ``adata[sorted idx].X.toarray()`` per batch.
``AnnDataset``
    ``torch_adata.AnnDataset`` through a DataLoader (``sampler=`` batches, ``batch_size=None``,
    ``collate_fn=torch_adata.collate``), dense or ``sparse=True``, with ``workers`` processes.
    In memory it loads the file with ``AnnDataset(path, backed=False)``; with
    ``"source": "anndata"`` it wraps an AnnData read by ``ad.read_h5ad(path)`` instead.
``TimeResolvedAnnDataset``
    Population mode: ``ds.batch_sampler(cells_per_time=..., seed=...)`` batches.

The AnnDataset loaders take ``"workers"`` (DataLoader worker processes, forked) and
``"persistent"`` (``persistent_workers=True``: one DataLoader serves every pass, so its workers
live across passes as they do across epochs in training); ``"sampler"`` is ``"uniform"``,
``"block"`` or ``"block:<block_size>:<pool_batches>"``. A backed block-shuffle loader announces
its pools ahead to the dataset (``BlockShuffleSampler(read_ahead=dataset)``, as the data module
does) unless ``"read_ahead": false``.
``"paths": [...]`` (instead of ``"path"``)
    The AnnDataset loader over a collection of files (``"join"``: the gene join, default
    ``"inner"``), in memory or backed as above.
``empty``
    Nothing: the resident memory of python + torch + anndata + torch_adata.

``"paired": {name: config, ...}``
    Several of the above in one process, passes alternating (see :func:`run_paired`): the
    ratios to the first one are measured per round, so a machine that slows down for a while
    slows the baseline and the loader alike.

Timing: pass 0 builds the loader in this fresh process and reads ``batches`` batches; its first
batch is the *first batch* time (open, build, compile or load kernels, first read; imports are
not counted). Passes ``1..repeats`` read ``batches`` other batches each (the sampler's next
epochs) and give cells/s, whose median is reported. With ``"cold": true`` every pass rebuilds
the loader (unmapping the file) and evicts the file's pages from the page cache first.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import threading
import time
from itertools import islice
from pathlib import Path

import numpy as np

PER_CELL_SHARE = 0.25  # the per-cell baseline reads a quarter of the cells (it is slow)


# -- memory -------------------------------------------------------------------------------------


def _status_kib(pid: str, keys: tuple[str, ...]) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name = line.split(":", 1)[0]
            if name in keys:
                out[name] = int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def _children() -> list[str]:
    pids = []
    for task in Path("/proc/self/task").iterdir():
        try:
            pids += (task / "children").read_text().split()
        except FileNotFoundError:
            pass
    return pids


class AnonymousMemoryPeak:
    """Sample the anonymous resident memory of this process plus its children every 10 ms.

    RSS of a process that memory-maps a file counts the file's pages it has touched; those
    are page cache (shared, reclaimable), not allocations. ``RssAnon`` counts only memory the
    processes allocated (heap, arrays, batches), summed over DataLoader workers.
    """

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.peak_kib = 0
        self.paused = threading.Event()  # set while a helper subprocess runs (fork copies RSS)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        if self.paused.is_set():
            return
        total = sum(
            _status_kib(pid, ("RssAnon",)).get("RssAnon", 0) for pid in ["self", *_children()]
        )
        self.peak_kib = max(self.peak_kib, total)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> AnonymousMemoryPeak:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


# -- page cache ---------------------------------------------------------------------------------


def drop_page_cache(path: str | Path) -> None:
    """Evict ``path``'s pages from the page cache (no root needed; mapped pages stay)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_mib(path: str | Path) -> float | None:
    """MiB of ``path`` in the page cache, from util-linux ``fincore`` (``None`` without it)."""
    try:
        out = subprocess.run(
            ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
            capture_output=True,
            text=True,
            check=True,
        )
        return int(out.stdout.split()[0]) / 2**20
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        return None


# -- loaders ------------------------------------------------------------------------------------


def make_sampler(
    n: int, batch_size: int, sampler: str, seed: int = 0, boundaries=None, read_ahead=None
):
    """A one-process uniform (``"uniform"``) or block-shuffle (``"block"``, or
    ``"block:<block_size>:<pool_batches>"``) batch sampler of torch_adata; ``boundaries``:
    a collection's offsets, which blocks do not cross; a block sampler announces its pools
    to ``read_ahead`` (a dataset) where this version can."""
    import inspect

    from torch_adata import samplers

    if sampler == "uniform":
        return samplers.UniformBatchSampler(n, batch_size, seed=seed, num_replicas=1, rank=0)
    if sampler.split(":")[0] == "block":
        block = getattr(samplers, "BlockShuffleBatchSampler", None) or samplers.BlockShuffleSampler
        params = [int(v) for v in sampler.split(":")[1:]]
        options = dict(zip(("block_size", "pool_batches"), params, strict=False))
        if boundaries is not None:
            options["boundaries"] = boundaries
        if read_ahead is not None and "read_ahead" in inspect.signature(block).parameters:
            options["read_ahead"] = read_ahead
        return block(n, batch_size, seed=seed, num_replicas=1, rank=0, **options)
    raise ValueError(
        f"sampler must be 'uniform', 'block' or 'block:<block_size>:<pool_batches>', got "
        f"{sampler!r}."
    )


def _batches(s, count: int):
    """``count`` batches of sampler ``s``, from its epochs 0, 1, ... (more than one epoch only
    when an epoch has fewer batches)."""
    taken = 0
    while taken < count:
        s.set_epoch(s.epoch + (1 if taken else 0))
        for batch in islice(iter(s), count - taken):
            yield batch
            taken += 1


def _plan(
    n: int, batch_size: int, sampler: str, seed: int, count: int, boundaries=None
) -> list[np.ndarray]:
    """``count`` batches of the uniform or block-shuffle sampler seeded ``seed``."""
    return list(_batches(make_sampler(n, batch_size, sampler, seed, boundaries), count))


class _AnnouncedPlan:
    """The batches of :func:`_plan`, drawn as they are read from a block sampler that
    announces its pools to the dataset (``read_ahead``), as the data module's sampler does."""

    def __init__(
        self, dataset, batch_size: int, sampler: str, seed: int, count: int, boundaries=None
    ) -> None:
        self.sampler = make_sampler(
            len(dataset), batch_size, sampler, seed, boundaries, read_ahead=dataset
        )
        self.count = count

    def __iter__(self):
        return _batches(self.sampler, self.count)

    def __len__(self) -> int:
        return self.count


def build(cfg: dict):
    """Open the data and return ``epoch(batch_size, seed, count)`` -> iterable of batches."""
    import anndata as ad
    import torch
    from torch.utils.data import DataLoader, Dataset

    import torch_adata as ta

    loader, path, mode = cfg["loader"], cfg.get("path"), cfg.get("mode", "memory")
    sampler, workers = cfg.get("sampler", "uniform"), int(cfg.get("workers", 0))
    backed = mode == "backed"

    if loader == "per-cell":
        X = ad.read_h5ad(path).X

        class PerCell(Dataset):
            def __len__(self) -> int:
                return X.shape[0]

            def __getitem__(self, i: int) -> torch.Tensor:
                return torch.from_numpy(X[i].toarray()[0])

        def epoch(batch_size, seed, count):
            count = max(2, round(count * PER_CELL_SHARE))
            cells = np.concatenate(_plan(X.shape[0], batch_size, sampler, seed, count))
            return DataLoader(PerCell(), batch_size=batch_size, sampler=cells.tolist())

        return epoch

    if loader == "batched":
        X = ad.read_h5ad(path).X

        def epoch(batch_size, seed, count):
            for idx in _plan(X.shape[0], batch_size, sampler, seed, count):
                yield torch.from_numpy(X[idx].toarray())

        return epoch

    if loader == "anndata-backed":
        adata = ad.read_h5ad(path, backed="r")

        def epoch(batch_size, seed, count):
            for idx in _plan(adata.n_obs, batch_size, sampler, seed, count):
                yield torch.from_numpy(adata[np.sort(idx)].X.toarray())

        return epoch

    # in memory: AnnDataset loads the file itself (backed=False reads the batched matrices
    # straight into memory); "anndata" = an AnnData from ad.read_h5ad, as the baselines use
    source = ad.read_h5ad(path) if cfg.get("source") == "anndata" else path
    options = {}
    if "paths" in cfg:  # a collection of files, read as one dataset
        source = cfg["paths"]
        options = {"join": cfg.get("join", "inner")}
    if loader == "AnnDataset":
        dataset = ta.AnnDataset(
            source, sparse=bool(cfg.get("sparse", False)), backed=backed, **options
        )

        boundaries = dataset.source.offsets if "paths" in cfg else None

        def plan(batch_size, seed, count):
            if sampler.startswith("block") and backed and cfg.get("read_ahead", True):
                return _AnnouncedPlan(dataset, batch_size, sampler, seed, count, boundaries)
            return _plan(len(dataset), batch_size, sampler, seed, count, boundaries)

    elif loader == "TimeResolvedAnnDataset":
        dataset = ta.TimeResolvedAnnDataset(source, time_key="Time point", backed=backed)

        def plan(batch_size, seed, count):
            s = dataset.batch_sampler(cells_per_time=batch_size, seed=seed)
            return list(islice(iter(s), count))

    else:
        raise ValueError(f"Unknown loader {loader!r}.")

    plan_holder = _PlanSampler()
    data_loader = DataLoader(
        dataset,
        sampler=plan_holder,
        batch_size=None,
        collate_fn=ta.collate,
        num_workers=workers,
        multiprocessing_context="fork" if workers else None,
        persistent_workers=bool(workers and cfg.get("persistent", False)),
    )

    def epoch(batch_size, seed, count):
        # one DataLoader for every pass, so persistent workers do persist
        plan_holder.batches = plan(batch_size, seed, count)
        return data_loader

    return epoch


class _PlanSampler:
    """The batches of the current pass; the DataLoader iterates it in the main process."""

    def __init__(self) -> None:
        self.batches: list[np.ndarray] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _cells(batch) -> int:
    if isinstance(batch, dict):
        return int(next(iter(batch.values())).shape[0])
    return int(batch.shape[0])


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and its reaped children (ended workers)."""
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _pass(epoch, batch_size: int, seed: int, count: int) -> tuple[int, int, float, float, float]:
    """Read one pass; return cells, batches, seconds to the first batch, seconds in all, and
    CPU seconds (less sensitive than wall time to other processes on a loaded machine)."""
    cpu = _cpu_seconds()
    start = time.perf_counter()
    first, cells, batches = None, 0, 0
    iterator = iter(epoch(batch_size, seed, count))
    for batch in iterator:
        if first is None:
            first = time.perf_counter() - start
        cells += _cells(batch)
        batches += 1
    del iterator  # ends non-persistent workers, so their CPU time is counted
    wall = time.perf_counter() - start
    return cells, batches, first, wall, _cpu_seconds() - cpu


def _build_fresh(cfg: dict, resident: list, paused: threading.Event | None = None):
    """Build ``cfg``'s loader; a cold one first evicts the file from the page cache and notes
    what stayed there in ``resident`` (``paused`` is set meanwhile: ``fincore`` is a forked
    helper, whose memory the sampler must not count). Returns the loader and seconds taken."""
    gc.collect()
    if cfg.get("cold", False):
        time.sleep(0.3)  # reads announced ahead by the last pass land before the eviction
        drop_page_cache(cfg["path"])
        if paused is not None:
            paused.set()
        resident.append(resident_mib(cfg["path"]))
        if paused is not None:
            paused.clear()
    start = time.perf_counter()
    epoch = build(cfg)
    return epoch, time.perf_counter() - start


def run(cfg: dict) -> dict:
    """Measure ``cfg`` (see the module docstring) and return its results as a dict."""
    import anndata  # noqa: F401  (the empty process holds what every loader imports)
    import torch  # noqa: F401

    import torch_adata  # noqa: F401

    result: dict = {}
    if cfg["loader"] == "empty":
        status = _status_kib("self", ("VmHWM", "RssAnon"))
        result["peak_rss_mib"] = status["VmHWM"] / 1024
        result["anon_mib"] = status["RssAnon"] / 1024
        return result
    cold = bool(cfg.get("cold", False))
    sizes = cfg.get("batch_sizes") or [cfg.get("batch_size", 256)]
    cells_per_pass = cfg.get("cells_per_pass")
    repeats = int(cfg.get("repeats", 3))
    resident = []
    points = []
    with AnonymousMemoryPeak() as anon:
        epoch = None
        for size in sizes:
            count = max(2, cells_per_pass // size) if cells_per_pass else int(cfg["batches"])
            rates, firsts = [], []
            for repeat in range(repeats + 1):
                built = 0.0
                if cold or epoch is None:
                    epoch = None  # the old loader goes (and unmaps the file) before the new one
                    epoch, built = _build_fresh(cfg, resident, anon.paused)
                # every pass reads other cells: epoch `repeat` of the sampler, per batch size
                cells, batches, first, seconds, cpu = _pass(
                    epoch, size, 1000 * repeat + size, count
                )
                if "first_batch_s" not in result:
                    result["first_batch_s"] = built + first
                if repeat:
                    rates.append((cells / seconds, batches / seconds, cells / cpu))
                    firsts.append(first)
            points.append(
                {
                    "batch_size": size,
                    "cells_per_s": float(np.median([r[0] for r in rates])),
                    "batches_per_s": float(np.median([r[1] for r in rates])),
                    "cells_per_s_runs": [r[0] for r in rates],
                    "cells_per_cpu_s": float(np.median([r[2] for r in rates])),
                    "first_batch_next_s": float(np.median(firsts)),
                    "cells_per_pass": cells,
                }
            )
    result["points"] = points
    result.update(points[0])
    result["peak_rss_mib"] = _status_kib("self", ("VmHWM",))["VmHWM"] / 1024
    result["peak_anon_mib"] = anon.peak_kib / 1024
    result["children_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if cold:
        result["resident_after_drop_mib"] = resident
    return result


def run_paired(cfg: dict) -> dict:
    """Several loaders over one file in this one process, their passes alternating.

    ``cfg["paired"]`` maps names to loader configurations (each merged over the other keys of
    ``cfg``); the first is the baseline. Returns ``{"paired": {name: result}}``. Every round runs one pass of each, in an order that
    rotates from round to round, all reading the same batches (same sampler seed), so that a
    slower stretch of a shared machine slows every loader of a round alike. Round 0 warms up;
    the ratio of each loader to the baseline is taken per round, and its median reported.
    Peak memory is not measured here (the loaders share the process).
    """
    import anndata  # noqa: F401
    import torch  # noqa: F401

    import torch_adata  # noqa: F401

    common = {k: v for k, v in cfg.items() if k != "paired"}
    names = list(cfg["paired"])
    configs = [{**common, **cfg["paired"][name]} for name in names]
    repeats, size = int(cfg.get("repeats", 3)), int(cfg.get("batch_size", 256))
    epochs: list = [None] * len(configs)
    results = [{"config": c, "cells_per_s_runs": [], "cells_per_cpu_s_runs": []} for c in configs]
    for repeat in range(repeats + 1):
        for k in range(len(configs)):
            i = (k + repeat) % len(configs)
            config, result = configs[i], results[i]
            built = 0.0
            if config.get("cold", False) or epochs[i] is None:
                epochs[i] = None
                resident = result.setdefault("resident_after_drop_mib", [])
                epochs[i], built = _build_fresh(config, resident)
            cells, _, first, seconds, cpu = _pass(
                epochs[i], size, 1000 * repeat + size, int(config["batches"])
            )
            result.setdefault("first_batch_s", built + first)
            if repeat:
                result["cells_per_s_runs"].append(cells / seconds)
                result["cells_per_cpu_s_runs"].append(cells / cpu)
    base = np.array(results[0]["cells_per_s_runs"])
    for result in results:
        runs = np.array(result["cells_per_s_runs"])
        result["cells_per_s"] = float(np.median(runs))
        result["cells_per_cpu_s"] = float(np.median(result["cells_per_cpu_s_runs"]))
        ratios = runs / base
        result["ratio_runs"] = ratios.tolist()
        result["ratio"] = float(np.median(ratios))
    return {"paired": dict(zip(names, results, strict=True))}


if __name__ == "__main__":
    config = json.loads(sys.argv[1])
    print(json.dumps(run_paired(config) if "paired" in config else run(config)))
