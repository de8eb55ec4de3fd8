"""The torch_adata benchmark suite: one command, every table, a JSON file and a plot.

Usage::

    python benchmarks/suite.py --quick          # 20,000 cells, a few minutes
    python benchmarks/suite.py                  # 100,000 x 20,000, ~2,000 nnz/cell
    python benchmarks/suite.py --million        # also backed memory at 1,000,000 cells (~16 GB)

Every configuration runs in a fresh process (``measure.py``) so its peak RSS is its own; the
synthetic files (``generate.py``) are written once into ``--data-dir`` and reused. Sections:

1. loaders: AnnDataset in memory (dense, sparse) and backed (0 and 2 workers), uniform and
   block-shuffle samplers, next to the per-cell, batched-scipy and anndata-backed baselines,
   with ratios to them; the empty-process RSS.
2. paired ratios: each comparison the engine is held to (dense and sparse vs batched, backed
   vs anndata's backed read, 2 workers vs 0) runs its loaders in one process, passes
   alternating, so a machine that slows down for a while slows both sides of a ratio alike.
3. disk: backed AnnDataset on a cold (evicted) and a gzip-compressed file, uniform vs block
   shuffle (paired the same way), with the batch diversity of each sampler.
4. time-resolved: TimeResolvedAnnDataset population batches, in memory and backed.
5. batch size sweep: cells/s for batch sizes 64..2048.
6. memory vs dataset size: peak RSS of backed (and in-memory) AnnDataset.
7. issue 15's table, every row from this run: the disk's limits on the benchmark file and on
   its shuffled copy (``disk.py``: sequential MiB/s, random reads at depth 1 and 32, fio with
   ``O_DIRECT``), the shuffled copy written (``shuffle_copy.py``: time, peak RSS, batch mix of
   block shuffle on it), cold reads (``cold_reads.py``, evicted before every pass): uniform vs
   anndata's backed read and vs the depth-32 limit, block shuffle with ``read_ahead`` on the
   copy vs the sequential limit, 2 workers vs 0 for both; with ``--million`` the same on the
   1M-cell file (uniform vs the reference run's 2,908 cells/s and the file's random limit,
   block on its copy vs sequential, the copy's time and peak RSS). Also every cold figure of
   section 3 as a fraction of the limits. ``--disk-only`` runs this section alone (writing
   the files it needs): ``--disk-only --million`` gives the whole table in one command,
   7.5-8.2 min in two runs on this 2-core machine (load 0.8-5.6), the 1M-cell file
   (15 GB) written in the run in about 160 s of it (the 100k-cell file was there: +15 s); with
   ``--quick`` (20,000 cells; ``--large-cells 30000`` for a small second file) about 2
   minutes. Its table goes to ``<out>/disk_<quick|full>.md``: the one README.md and
   docs/performance.md show.
8. collections: the main matrix split into 10 files against the one file (paired, in memory
   and backed, uniform and block shuffle), 100 files (peak memory over the one file's, time
   to the first batch), and an inner join over 10 files whose gene sets differ by 10 %
   against the aligned files (paired). ``--collections-only`` runs this section alone: at
   the full 100,000 cells in about 4 minutes on 2 cores (its files written in about a
   minute), with ``--quick`` in about one (``--quick --cells 2000`` is a smoke run).

Results go to ``<out>/suite_<quick|full>.json``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from disk import limits_text, measure_disk  # noqa: E402
from generate import rename_genes, split_rows, write_synthetic  # noqa: E402
from measure import make_sampler  # noqa: E402

SWEEP_SIZES = [64, 128, 256, 512, 1024, 2048]
DISK_SAMPLERS = {"uniform": "uniform", "block": "block", "block, pool 1": "block:64:1"}


# -- running configurations ---------------------------------------------------------------------


class Runner:
    """Run configurations in fresh processes and keep their results."""

    def __init__(self, common: dict, verbose: bool = True) -> None:
        self.common = common
        self.verbose = verbose
        self.results: dict[str, dict] = {}
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO), *filter(None, [env.get("PYTHONPATH")])]
        )  # measure this checkout's torch_adata, not an installed one
        self.env = env

    def __call__(self, key: str, **cfg) -> dict:
        cfg = {**self.common, **cfg}
        start = time.perf_counter()
        out = subprocess.run(
            [sys.executable, str(HERE / "measure.py"), json.dumps(cfg)],
            capture_output=True,
            text=True,
            env=self.env,
        )
        seconds = time.perf_counter() - start
        if out.returncode:
            result = {"error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}
            print(f"  {key}: FAILED ({result['error']})\n{out.stderr[-3000:]}", file=sys.stderr)
        else:
            result = json.loads(out.stdout.strip().splitlines()[-1])
        result["config"] = cfg
        result["process_s"] = seconds
        self.results[key] = result
        if self.verbose and "error" not in result and "paired" not in result:
            rate = result.get("cells_per_s")
            print(
                f"  {key:<44} {'' if rate is None else f'{rate:>12,.0f} cells/s'} "
                f"({seconds:.0f} s)",
                flush=True,
            )
        return result

    def paired(self, key: str, loaders: dict[str, dict], **cfg) -> dict:
        """Run ``loaders`` (name -> configuration; the first is the baseline) in one process,
        passes alternating (``measure.run_paired``); each result gains ``ratio``, the median
        over rounds of its pass's cells/s over the baseline's pass of the same round."""
        parts = self(key, paired=loaders, **cfg).get("paired", {})
        if self.verbose:
            for name, part in parts.items():
                print(
                    f"    {name:<42} {part['cells_per_s']:>12,.0f} cells/s  "
                    f"x{part['ratio']:.2f} (rounds {min(part['ratio_runs']):.2f}-"
                    f"{max(part['ratio_runs']):.2f})",
                    flush=True,
                )
        return parts


# -- batch diversity ----------------------------------------------------------------------------


def batch_diversity(labels: np.ndarray, batches: list[np.ndarray]) -> float:
    """Mean over batches of the total-variation distance of a batch's label frequencies
    from the global ones (0: every batch looks like the whole data; 1: disjoint)."""
    k = int(labels.max()) + 1
    overall = np.bincount(labels, minlength=k) / len(labels)
    distances = [
        0.5 * np.abs(np.bincount(labels[b], minlength=k) / len(b) - overall).sum() for b in batches
    ]
    return float(np.mean(distances))


def diversity_table(path: Path, batch_size: int, seed: int = 0) -> dict:
    """Diversity of one epoch of each disk sampler, for the file's label order and a random one."""
    import anndata as ad

    obs = ad.read_h5ad(path, backed="r").obs
    stored = obs["cell_type"].cat.codes.to_numpy().astype(np.int64)
    shuffled = np.random.default_rng(seed).permutation(stored)
    out = {}
    for name, spec in DISK_SAMPLERS.items():
        sampler = make_sampler(len(stored), batch_size, spec, seed)
        batches = list(sampler)
        out[name] = {
            "sampler": repr(sampler),
            "block_size": getattr(sampler, "block_size", None),
            "pool_batches": getattr(sampler, "pool_batches", None),
            "stored_order": batch_diversity(stored, batches),
            "random_order": batch_diversity(shuffled, batches),
        }
    return out


# -- formatting ---------------------------------------------------------------------------------


def _fmt(value, spec: str = ",.0f", suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    return f"{value:{spec}}{suffix}"


def _ratio(a: dict | None, b: dict | None) -> str:
    if not a or not b or "cells_per_s" not in a or "cells_per_s" not in b:
        return "-"
    return f"{a['cells_per_s'] / b['cells_per_s']:.2f}"


def _table(header: list[str], rows: list[list[str]], right_from: int = 1) -> str:
    align = ["---" if i < right_from else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


LOADER_LABELS = {
    "per-cell": "per-cell `__getitem__` + default collate",
    "batched": "batched `X[idx].toarray()`",
    "anndata-backed": "anndata backed `adata[sorted idx].X`",
    "AnnDataset": "**AnnDataset**",
    "AnnDataset sparse": "AnnDataset `sparse=True`",
    "AnnDataset anndata": "AnnDataset over `ad.read_h5ad(path)`",
    "TimeResolvedAnnDataset": "TimeResolvedAnnDataset populations",
}


# -- the suite ----------------------------------------------------------------------------------


def _data(args, cells: int, compression: str | None = None) -> Path:
    name = f"synthetic_{cells}x{args.genes}_{args.nnz}" + (f"_{compression}" if compression else "")
    path = args.data_dir / f"{name}.h5ad"
    if not path.exists():
        need = cells * args.nnz * 8 * 1.1
        free = shutil.disk_usage(args.data_dir).free
        if compression is None and need > free:
            raise SystemExit(
                f"{path.name} needs about {need / 2**30:.0f} GiB but {args.data_dir} has "
                f"{free / 2**30:.0f} GiB free: free space or pass --data-dir elsewhere."
            )
        start = time.perf_counter()
        tmp = path.with_suffix(".partial.h5ad")
        write_synthetic(tmp, cells, args.genes, args.nnz, compression=compression)
        tmp.rename(path)
        os.sync()
        print(
            f"  wrote {path.name} ({path.stat().st_size / 2**20:,.0f} MiB) in "
            f"{time.perf_counter() - start:.0f} s",
            flush=True,
        )
    return path


def _csr_mib(path: Path) -> float:
    import h5py

    with h5py.File(path) as f:
        return sum(f["X"][k].size * f["X"][k].dtype.itemsize for k in f["X"]) / 2**20


def _begin(args) -> tuple[tuple, Path]:
    """Start a run: the clock, load average and commit at its start (for :func:`_run_facts`),
    the folders, and the main file (written if missing)."""
    start = (time.perf_counter(), os.getloadavg(), _commit())
    args.data_dir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    print("data", flush=True)
    return start, _data(args, args.cells)


def _run_facts(args, start: tuple) -> dict:
    """What a result needs to be read later: arguments, duration, load, machine, commit."""
    import torch_adata

    t_start, load_start, commit_start = start

    return {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "duration_s": time.perf_counter() - t_start,
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "torch_adata": torch_adata.__file__,
        "commit": commit_start,
        "commit_end": _commit(),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def run_suite(args) -> dict:
    start, plain = _begin(args)  # the commit at the start: the engine may change in a long run
    gz = _data(args, args.cells, "gzip")
    csr_mib = _csr_mib(plain)
    bs, batches, repeats = args.batch_size, args.batches, args.repeats
    run = Runner({"batch_size": bs, "batches": batches, "repeats": repeats})

    print("1. loaders (warm page cache)", flush=True)
    P = str(plain)
    run("empty", loader="empty", path=P)
    run("per-cell|memory", loader="per-cell", path=P)
    run("batched|memory", loader="batched", path=P)
    run("AnnDataset|memory|uniform|0", loader="AnnDataset", path=P)
    run("AnnDataset anndata|memory|uniform|0", loader="AnnDataset", path=P, source="anndata")
    run("AnnDataset sparse|memory|uniform|0", loader="AnnDataset", path=P, sparse=True)
    run("AnnDataset|memory|block|0", loader="AnnDataset", path=P, sampler="block")
    run("anndata-backed|backed", loader="anndata-backed", path=P, mode="backed")
    for sampler in ("uniform", "block"):
        for workers in (0, 2):
            run(
                f"AnnDataset|backed|{sampler}|{workers}",
                loader="AnnDataset",
                path=P,
                mode="backed",
                sampler=sampler,
                workers=workers,
            )
    run(
        "AnnDataset|backed|uniform|2p",
        loader="AnnDataset",
        path=P,
        mode="backed",
        workers=2,
        persistent=True,
    )

    print("2. paired ratios (one process per comparison, passes alternating)", flush=True)
    memory = {"loader": "AnnDataset", "path": P}
    backed = {**memory, "mode": "backed"}
    run.paired(
        "paired|memory",
        {
            "batched": {"loader": "batched", "path": P},
            "dense": memory,
            "sparse": {**memory, "sparse": True},
        },
    )
    run.paired(
        "paired|backed",
        {"anndata-backed": {"loader": "anndata-backed", "path": P, "mode": "backed"}, "0": backed},
    )
    run.paired(
        "paired|workers",
        {
            "0": backed,
            "2": {**backed, "workers": 2},
            "2 persistent": {**backed, "workers": 2, "persistent": True},
        },
    )

    print("3. disk: cold and compressed files, uniform vs block shuffle (paired)", flush=True)
    disk_batches = max(4, batches // args.disk_divisor)
    for fname, path in (("plain", P), ("gzip", str(gz))):
        for cache in ("warm", "cold"):
            run.paired(
                f"paired|disk|{fname}|{cache}",
                {
                    name: {**backed, "path": path, "sampler": spec, "cold": cache == "cold"}
                    for name, spec in DISK_SAMPLERS.items()
                },
                batches=batches if fname == "plain" else disk_batches,
            )
    run(
        "disk|gzip|warm|anndata",
        loader="anndata-backed",
        path=str(gz),
        mode="backed",
        batches=disk_batches,
    )
    diversity = diversity_table(plain, bs)

    print("4. time-resolved (population mode)", flush=True)
    for mode in ("memory", "backed"):
        run(
            f"TimeResolvedAnnDataset|{mode}",
            loader="TimeResolvedAnnDataset",
            path=P,
            mode=mode,
            batch_size=args.cells_per_time,
        )

    print("5. batch size sweep", flush=True)
    sweep = {
        "cells_per_pass": args.sweep_cells,
        "batch_sizes": SWEEP_SIZES,
        "repeats": args.sweep_repeats,
    }
    run("sweep|AnnDataset|memory", loader="AnnDataset", path=P, **sweep)
    run("sweep|AnnDataset|backed", loader="AnnDataset", path=P, mode="backed", **sweep)
    run("sweep|batched|memory", loader="batched", path=P, **sweep)
    run("sweep|anndata-backed|backed", loader="anndata-backed", path=P, mode="backed", **sweep)
    run("sweep|per-cell|memory", loader="per-cell", path=P, **sweep)

    print("6. memory vs dataset size", flush=True)
    sizes = {args.cells: plain}
    for cells in args.size_cells:
        sizes[cells] = _data(args, cells)
    million = None
    if args.million:
        million = _data(args, args.large_cells)
        sizes[args.large_cells] = million
    size_rows = {}
    for cells, path in sorted(sizes.items()):
        if cells == args.cells:
            size_rows[cells] = {
                "backed": run.results["AnnDataset|backed|uniform|0"],
                "memory": run.results["AnnDataset|memory|uniform|0"],
                "file_mib": path.stat().st_size / 2**20,
            }
            continue
        n_batches = min(batches, max(2, cells // bs // 2))
        row = {"file_mib": path.stat().st_size / 2**20}
        row["backed"] = run(
            f"size|{cells}|backed",
            loader="AnnDataset",
            path=str(path),
            mode="backed",
            batches=n_batches,
        )
        if cells <= args.cells:
            row["memory"] = run(
                f"size|{cells}|memory", loader="AnnDataset", path=str(path), batches=n_batches
            )
        size_rows[cells] = row
    print("7. the disk's limits, shuffled copies, cold reads (issue 15's figures)", flush=True)
    disk = run_disk(args, plain, run.env)  # deletes the 1M-cell file unless --keep-data
    limits = dict(disk["main"]["limits"])
    limits["file_bytes"] = {"plain": plain.stat().st_size, "gzip": gz.stat().st_size}
    shuffle_copy = disk["main"]["shuffle_copy"]

    collections = run_collections(args, plain, run)

    return {
        "collections": collections,
        "disk_limits": limits,
        "shuffle_copy": shuffle_copy,
        "disk": disk,
        "csr_mib": csr_mib,
        "nnz_per_cell": args.nnz,
        "results": run.results,
        "diversity": diversity,
        "sizes": {str(k): v for k, v in size_rows.items()},
        **_run_facts(args, start),
    }


COLLECTION_CASES = [
    (f"{mode}|{sampler}", mode, sampler)
    for mode in ("memory", "backed")
    for sampler in ("uniform", "block")
]


def run_collections(args, plain: Path, run: Runner) -> dict:
    """Section 8: the main file as 10 and 100 files, and an inner join over differing genes.

    The 10 and 100 files hold the main file's rows in order (``generate.split_rows``), so
    every loader reads the same cells; the join files are the 10 files with the same 10 % of
    their genes renamed per file (``generate.rename_genes``). Ratios are paired (one process,
    passes alternating); memory is measured in fresh processes.
    """
    print("8. collections: 10 and 100 files vs one, an inner join", flush=True)
    stem = args.data_dir / plain.stem
    ten = [str(p) for p in split_rows(plain, 10, f"{stem}_10_files")]
    hundred = [str(p) for p in split_rows(plain, 100, f"{stem}_100_files")]
    joined = [str(p) for p in rename_genes([Path(p) for p in ten], 0.1, f"{stem}_10_join")]
    one = {"loader": "AnnDataset", "path": str(plain)}
    for key, mode, sampler in COLLECTION_CASES:
        cfg = {"mode": mode, "sampler": sampler}
        run.paired(
            f"collection|10|{key}",
            {"1 file": {**one, **cfg}, "10 files": {"loader": "AnnDataset", "paths": ten, **cfg}},
        )
    for mode in ("backed", "memory"):
        run(f"collection|1|{mode}", **one, mode=mode)
        run(f"collection|100|{mode}", loader="AnnDataset", paths=hundred, mode=mode)
    for mode in ("memory", "backed"):
        run.paired(
            f"collection|join|{mode}",
            {
                "aligned": {"loader": "AnnDataset", "paths": ten, "mode": mode},
                "inner join": {"loader": "AnnDataset", "paths": joined, "mode": mode},
            },
        )
    return {"files": {"10": len(ten), "100": len(hundred)}}


def _collections_report(suite: dict) -> list[str]:
    """Section 8's tables."""
    r = suite["results"]
    if not any(k.startswith("collection|") for k in r):
        return []
    rows = []
    for key, mode, sampler in COLLECTION_CASES:
        parts = r.get(f"collection|10|{key}", {}).get("paired", {})
        one, ten = parts.get("1 file", {}), parts.get("10 files", {})
        runs = ten.get("ratio_runs") or []
        rows.append(
            [
                mode,
                sampler,
                _fmt(one.get("cells_per_s")),
                _fmt(ten.get("cells_per_s")),
                _fmt(ten.get("ratio"), ".2f")
                + (f" ({min(runs):.2f}-{max(runs):.2f})" if runs else ""),
                "yes" if ten.get("ratio", 0) >= 0.9 else "**no**",
            ]
        )
    out = [
        "",
        "### Collections: the same cells in 10 files (paired, 0 workers)",
        "",
        _table(
            ["data", "sampler", "1 file cells/s", "10 files cells/s", "10 / 1", ">= 0.9x"],
            rows,
            right_from=2,
        ),
        "",
        "### 100 files: memory and the first batch (fresh processes, uniform, 0 workers)",
        "",
    ]
    rows = []
    for mode in ("backed", "memory"):
        one, many = r.get(f"collection|1|{mode}", {}), r.get(f"collection|100|{mode}", {})
        extra = (
            many["peak_rss_mib"] - one["peak_rss_mib"]
            if "peak_rss_mib" in many and "peak_rss_mib" in one
            else None
        )
        rows.append(
            [
                mode,
                _fmt(one.get("peak_rss_mib"), ",.0f", " MiB"),
                _fmt(many.get("peak_rss_mib"), ",.0f", " MiB"),
                _fmt(extra, ",.0f", " MiB")
                + ("" if extra is None else " (goal <= 150)" if extra <= 150 else " (**> 150**)"),
                _fmt(one.get("first_batch_s"), ".2f", " s"),
                _fmt(many.get("first_batch_s"), ".2f", " s"),
                _fmt(one.get("cells_per_s")),
                _fmt(many.get("cells_per_s")),
            ]
        )
    out.append(
        _table(
            [
                "data",
                "1 file peak RSS",
                "100 files peak RSS",
                "100 files - 1 file",
                "1 file first batch",
                "100 files first batch",
                "1 file cells/s",
                "100 files cells/s",
            ],
            rows,
        )
    )
    rows = []
    for mode in ("memory", "backed"):
        parts = r.get(f"collection|join|{mode}", {}).get("paired", {})
        aligned, inner = parts.get("aligned", {}), parts.get("inner join", {})
        runs = inner.get("ratio_runs") or []
        rows.append(
            [
                mode,
                _fmt(aligned.get("cells_per_s")),
                _fmt(inner.get("cells_per_s")),
                _fmt(inner.get("ratio"), ".2f")
                + (f" ({min(runs):.2f}-{max(runs):.2f})" if runs else ""),
            ]
        )
    out += [
        "",
        "`first batch`: open + build + first batch in a fresh process (imports excluded). "
        "Peak RSS: the process's VmHWM.",
        "",
        "### Inner join: 10 files whose gene sets differ by 10 % (paired, uniform, 0 workers)",
        "",
        _table(["data", "aligned cells/s", "inner join cells/s", "join / aligned"], rows),
        "",
        "Each join file has the same 10 % of its columns renamed to genes of its own, so the "
        "inner join keeps 90 % of the genes (batches are that much narrower).",
    ]
    return out


def run_collections_only(args) -> dict:
    """Section 8 alone (``--collections-only``), with the run's context."""
    start, plain = _begin(args)
    run = Runner({"batch_size": args.batch_size, "batches": args.batches, "repeats": args.repeats})
    collections = run_collections(args, plain, run)
    return {
        "collections": collections,
        "csr_mib": _csr_mib(plain),
        "results": run.results,
        **_run_facts(args, start),
    }


def _context(suite: dict) -> str:
    a = suite["args"]
    return (
        f"{a['cells']:,} cells x {a['genes']:,} genes, ~{a['nnz']:,} non-zeros per cell, CSR "
        f"{suite['csr_mib']:,.0f} MiB; batches of {a['batch_size']}, median of {a['repeats']} "
        f"passes of {a['batches']} batches; {suite['machine']}; load average "
        f"{suite['loadavg_start'][0]:.1f} at start, {suite['loadavg_end'][0]:.1f} at end; "
        f"commit {suite['commit']}; {suite['when']}; ran {suite['duration_s'] / 60:.1f} min."
    )


def _disk_context(suite: dict) -> str:
    a = suite["args"]
    return (
        f"{a['cells']:,} cells x {a['genes']:,} genes, ~{a['nnz']:,} non-zeros per cell, CSR "
        f"{suite['csr_mib']:,.0f} MiB"
        + (f", and {a['large_cells']:,} cells" if a["million"] else "")
        + f"; {suite['machine']}; load average {suite['loadavg_start'][0]:.1f} at start, "
        f"{suite['loadavg_end'][0]:.1f} at end; commit {suite['commit']}"
        + (
            f" (at the end: {suite['commit_end']})"
            if suite.get("commit_end", suite["commit"]) != suite["commit"]
            else ""
        )
        + f"; {suite['when']}; ran {suite['duration_s'] / 60:.1f} min (files written included)."
    )


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "torch_adata"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return out.stdout.strip() + (" (torch_adata modified)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


PAIRED_ROWS = [
    # (comparison, paired run, baseline, loader, target)
    ("in memory, dense float32 vs batched `X[idx].toarray()`", "memory", "batched", "dense", 1.7),
    ("in memory, sparse output vs batched", "memory", "batched", "sparse", 2.8),
    ("backed, 0 workers vs anndata backed", "backed", "anndata-backed", "0", 5.0),
    ("backed, 2 workers (restarted every pass) vs 0", "workers", "0", "2", 1.0),
    ("backed, 2 persistent workers vs 0", "workers", "0", "2 persistent", 1.0),
    ("cold uncompressed file, block vs uniform", "disk|plain|cold", "uniform", "block", 1.5),
    ("gzip file, warm, block vs uniform", "disk|gzip|warm", "uniform", "block", 1.5),
    ("gzip file, cold, block vs uniform", "disk|gzip|cold", "uniform", "block", 1.5),
]


def _paired_table(r: dict) -> str:
    rows = []
    for label, key, base, loader, target in PAIRED_ROWS:
        parts = r.get(f"paired|{key}", {}).get("paired", {})
        b, x = parts.get(base), parts.get(loader)
        if not b or not x:
            rows.append([label, "-", "-", "failed", "-", f">= {target}", "-"])
            continue
        rows.append(
            [
                label,
                _fmt(b["cells_per_s"]),
                _fmt(x["cells_per_s"]),
                f"{x['ratio']:.2f}",
                f"{min(x['ratio_runs']):.2f}-{max(x['ratio_runs']):.2f}",
                f">= {target}",
                "yes" if x["ratio"] >= target else "no",
            ]
        )
    header = ["comparison", "baseline cells/s", "cells/s", "ratio", "rounds", "target", "met"]
    return _table(header, rows)


def report(suite: dict) -> str:
    """The markdown report of a suite result."""
    r = suite["results"]
    a = suite["args"]
    csr = suite["csr_mib"]
    out = [
        f"{a['cells']:,} cells x {a['genes']:,} genes, ~{a['nnz']:,} non-zeros per cell, CSR "
        f"{csr:,.0f} MiB; batches of {a['batch_size']}, median of {a['repeats']} passes of "
        f"{a['batches']} batches; {suite['machine']}; load average "
        f"{suite['loadavg_start'][0]:.1f} at start, {suite['loadavg_end'][0]:.1f} at end; "
        f"commit {suite['commit']}"
        + (
            f" (at the end: {suite['commit_end']})"
            if suite.get("commit_end", suite["commit"]) != suite["commit"]
            else ""
        )
        + f"; {suite['when']}; suite ran {suite['duration_s'] / 60:.1f} min.",
        "",
        "### Loaders (warm page cache)",
        "",
    ]
    percell = r.get("per-cell|memory")
    base = {"memory": r.get("batched|memory"), "backed": r.get("anndata-backed|backed")}
    rows = []
    order = [
        ("per-cell|memory", "per-cell", "memory", "uniform", 0),
        ("batched|memory", "batched", "memory", "uniform", 0),
        ("AnnDataset|memory|uniform|0", "AnnDataset", "memory", "uniform", 0),
        ("AnnDataset anndata|memory|uniform|0", "AnnDataset anndata", "memory", "uniform", 0),
        ("AnnDataset sparse|memory|uniform|0", "AnnDataset sparse", "memory", "uniform", 0),
        ("AnnDataset|memory|block|0", "AnnDataset", "memory", "block", 0),
        ("anndata-backed|backed", "anndata-backed", "backed", "uniform", 0),
        ("AnnDataset|backed|uniform|0", "AnnDataset", "backed", "uniform", 0),
        ("AnnDataset|backed|uniform|2", "AnnDataset", "backed", "uniform", 2),
        ("AnnDataset|backed|uniform|2p", "AnnDataset", "backed", "uniform", "2 persistent"),
        ("AnnDataset|backed|block|0", "AnnDataset", "backed", "block", 0),
        ("AnnDataset|backed|block|2", "AnnDataset", "backed", "block", 2),
    ]
    for key, loader, mode, sampler, workers in order:
        res = r.get(key, {})
        if "error" in res or not res:
            rows.append([LOADER_LABELS[loader], mode, sampler, str(workers), "failed"] + ["-"] * 8)
            continue
        rows.append(
            [
                LOADER_LABELS[loader],
                mode,
                sampler,
                str(workers),
                _fmt(res["cells_per_s"]),
                _ratio(res, percell),
                _ratio(res, base[mode]),
                _fmt(res.get("cells_per_cpu_s")),
                _fmt(res["first_batch_s"], ".2f", " s"),
                _fmt(res.get("first_batch_next_s"), ".2f", " s"),
                _fmt(res["peak_rss_mib"], ",.0f", " MiB"),
                _fmt(res["peak_anon_mib"], ",.0f", " MiB"),
                _fmt(res["peak_rss_mib"] / csr, ".2f") if mode == "memory" else "-",
            ]
        )
    out.append(
        _table(
            [
                "loader",
                "data",
                "sampler",
                "workers",
                "cells/s",
                "x per-cell",
                "x batched",
                "cells/CPU-s",
                "first batch",
                "first batch, later passes",
                "peak RSS",
                "peak anon (all procs)",
                "RSS / CSR",
            ],
            rows,
            right_from=3,
        )
    )
    empty = r.get("empty", {})
    out += [
        "",
        "Empty process (python + torch + anndata + torch_adata): "
        f"{_fmt(empty.get('peak_rss_mib'), ',.0f', ' MiB')} RSS, "
        f"{_fmt(empty.get('anon_mib'), ',.0f', ' MiB')} anonymous. "
        "In-memory AnnDataset rows load the file with `AnnDataset(path, backed=False)`, which "
        "reads the batched matrix's arrays straight into memory; the baselines, and the row "
        "over `ad.read_h5ad(path)`, load it with anndata. "
        "`x batched` compares in-memory rows with batched `X[idx].toarray()` and backed rows "
        "with anndata's backed read. `first batch`: open + build + first batch in a fresh "
        "process (imports excluded); `later passes`: the first batch of each later pass "
        "(workers restart every pass unless persistent). `cells/CPU-s`: cells per CPU second of "
        "the process and its workers, steadier than wall time on a loaded machine. "
        "`peak RSS`: the main process's VmHWM (it would also count the pages of a "
        "memory-mapped file, which are page cache; torch_adata reads with `pread` and maps "
        "nothing); `peak anon`: "
        "allocated memory (RssAnon) of the main process plus its workers, sampled every 10 ms.",
        "",
        "### Paired ratios (each comparison in one process, passes alternating)",
        "",
        "The ratios the engine is held to. Each comparison runs its loaders in one process, one "
        "pass of each per round in an order that rotates, all reading the same batches; the "
        "ratio is taken per round and the median reported, with the range over rounds. A "
        "machine that slows down for a while (this VM's memory bandwidth moves 1.5-2x) slows "
        "the baseline and the loader of a round alike, which separate processes do not see.",
        "",
        _paired_table(r),
        "",
        "### Disk: cold and compressed files, uniform vs block shuffle (backed, 0 workers)",
        "",
    ]
    div = suite["diversity"]
    rows = []
    for fname, cache in (("plain", "warm"), ("plain", "cold"), ("gzip", "warm"), ("gzip", "cold")):
        parts = r.get(f"paired|disk|{fname}|{cache}", {}).get("paired", {})
        res = {name: parts.get(name, {}) for name in DISK_SAMPLERS}
        uni = res["uniform"]
        resident = [x for x in (uni.get("resident_after_drop_mib") or []) if x is not None]
        row = ["uncompressed" if fname == "plain" else "gzip", cache]
        for name in DISK_SAMPLERS:
            row.append(_fmt(res[name].get("cells_per_s")))
            if name != "uniform":
                row.append(_fmt(res[name].get("ratio"), ".2f"))
        row += [
            _fmt(uni.get("first_batch_s"), ".2f", " s"),
            _fmt(max(resident), ",.1f", " MiB") if resident else "-",
        ]
        rows.append(row)
    header = ["file", "page cache"]
    for name in DISK_SAMPLERS:
        header.append(f"{name} cells/s")
        if name != "uniform":
            header.append(f"{name} / uniform")
    header += ["first batch (uniform)", "file in cache after eviction"]
    out.append(_table(header, rows, right_from=2))
    gz_anndata = r.get("disk|gzip|warm|anndata", {})
    gz_uni = r.get("paired|disk|gzip|warm", {}).get("paired", {}).get("uniform", {})
    out += [
        "",
        f"anndata's own backed read of the gzip file: {_fmt(gz_anndata.get('cells_per_s'))} "
        f"cells/s (AnnDataset uniform: x{_ratio(gz_uni, gz_anndata)}). Compressed runs read "
        f"{max(4, a['batches'] // a['disk_divisor'])} batches per pass. Cold: before every pass "
        "the loader is rebuilt and the file's pages are evicted with "
        "`posix_fadvise(POSIX_FADV_DONTNEED)` (the last column, from `fincore`, checks it).",
        "",
        "Batch diversity: mean over one epoch's batches of the total-variation distance between "
        "a batch's `cell_type` frequencies and the global ones (0: every batch has the global "
        "mix; 1: disjoint). 20 types; the file stores cells sorted by type.",
        "",
        _table(
            [
                "sampler",
                "block_size",
                "pool_batches",
                "cells stored sorted by type (the file)",
                "cells stored in random order",
            ],
            [
                [
                    name,
                    _fmt(d["block_size"], "d"),
                    _fmt(d["pool_batches"], "d"),
                    f"{d['stored_order']:.3f}",
                    f"{d['random_order']:.3f}",
                ]
                for name, d in div.items()
            ],
        ),
        "",
        "### Time-resolved (TimeResolvedAnnDataset, population mode, "
        f"{a['cells_per_time']} cells per time point x 3 time points per batch)",
        "",
    ]
    rows = []
    for mode in ("memory", "backed"):
        res = r.get(f"TimeResolvedAnnDataset|{mode}", {})
        ref = r.get(f"AnnDataset|{mode}|uniform|0")
        rows.append(
            [
                mode,
                _fmt(res.get("batches_per_s"), ",.1f"),
                _fmt(res.get("cells_per_s")),
                _ratio(res, ref),
                _fmt(res.get("first_batch_s"), ".2f", " s"),
                _fmt(res.get("peak_rss_mib"), ",.0f", " MiB"),
            ]
        )
    out.append(
        _table(
            ["data", "batches/s", "cells/s", "x AnnDataset uniform", "first batch", "peak RSS"],
            rows,
        )
    )
    out += ["", "### Batch size sweep (cells/s)", ""]
    series = [k for k in r if k.startswith("sweep|")]
    header = ["loader", "data"] + [str(s) for s in SWEEP_SIZES]
    rows = []
    for key in series:
        _, loader, mode = key.split("|")
        pts = {p["batch_size"]: p["cells_per_s"] for p in r[key].get("points", [])}
        rows.append([LOADER_LABELS[loader], mode] + [_fmt(pts.get(s)) for s in SWEEP_SIZES])
    out.append(_table(header, rows, right_from=2))
    out += ["", "### Memory vs dataset size (AnnDataset, uniform, 0 workers)", ""]
    rows = []
    for cells, row in sorted(suite["sizes"].items(), key=lambda kv: int(kv[0])):
        b, m = row.get("backed", {}), row.get("memory", {})
        rows.append(
            [
                f"{int(cells):,}",
                _fmt(row["file_mib"], ",.0f", " MiB"),
                _fmt(b.get("peak_rss_mib"), ",.0f", " MiB"),
                _fmt(b.get("peak_anon_mib"), ",.0f", " MiB"),
                _fmt(b.get("cells_per_s")),
                _fmt(m.get("peak_rss_mib"), ",.0f", " MiB"),
            ]
        )
    out.append(
        _table(
            [
                "cells",
                "file",
                "backed peak RSS",
                "backed peak anon",
                "backed cells/s",
                "in-memory peak RSS",
            ],
            rows,
        )
    )
    disk = disk_report(suite["disk"]) if "disk" in suite else []
    return "\n".join(out + _limits_report(suite) + disk + _collections_report(suite)) + "\n"


def _limits_report(suite: dict) -> list[str]:
    """Section 7: the disk's limits, the cold figures as fractions of them, the shuffled copy."""
    limits, r = suite.get("disk_limits"), suite["results"]
    if not limits:
        return []
    cells = suite["args"]["cells"]
    seq = limits["seq_mib_s"] * 2**20
    out = [
        "",
        "### The disk's limits, and cold figures as fractions of them",
        "",
        f"Measured on the benchmark file: {limits_text(limits)}.",
        "",
    ]
    rows = []
    for fname in ("plain", "gzip"):
        per_cell = limits["file_bytes"][fname] / cells  # stored bytes of one cell
        parts = r.get(f"paired|disk|{fname}|cold", {}).get("paired", {})
        for name in DISK_SAMPLERS:
            rate = parts.get(name, {}).get("cells_per_s")
            if rate is None:
                continue
            rows.append(
                [
                    "uncompressed" if fname == "plain" else "gzip",
                    name,
                    _fmt(rate),
                    f"{rate * per_cell / seq:.2f}",
                    f"{2 * rate / limits['rand_iops_qd1']:.2f}",
                    f"{2 * rate / limits['rand_iops_qd32']:.2f}",
                ]
            )
    out += [
        _table(
            [
                "file (cold)",
                "sampler",
                "cells/s",
                "of sequential",
                "of random, depth 1",
                "of random, depth 32",
            ],
            rows,
            right_from=2,
        ),
        "",
        "`of sequential`: cells/s x stored bytes per cell / sequential bytes/s (1.0: the "
        "file read start to end at the disk's speed). `of random`: cells/s x 2 / random "
        "reads/s (a cell's values and gene indices are two reads).",
    ]
    copy = suite.get("shuffle_copy") or {}
    if "seconds" in copy:
        tv = copy.get("tv", {})
        out += [
            "",
            "### A shuffled copy (`write_shuffled`, source evicted first)",
            "",
            f"{copy['file_mib']:,.0f} MiB, {copy['cells']:,} cells: {copy['seconds']:.1f} s "
            f"({copy['mib_per_s']:,.0f} MiB/s), peak RSS {copy['peak_rss_mib']:,.0f} MiB "
            f"({copy['rss_before_mib']:,.0f} MiB before writing), chunk_mib "
            f"{copy['chunk_mib']:g}. Batch mix (mean label TV, 256 cells): "
            + ", ".join(f"{k} {v:.3f}" for k, v in tv.items()),
        ]
    return out


# -- section 7: issue 15's disk figures in one run ----------------------------------------------

# cold_reads.py's cases this section runs (the shorthand used in the JSON and the report)
COLD_CASES = {
    "anndata": "cold uniform, 0 workers, anndata X[sorted idx]",
    "uniform": "cold uniform, 0 workers, concurrent (default)",
    "uniform, 2 workers": "cold uniform, 2 workers, concurrent (default)",
    "block": "cold block, 0 workers, read_ahead=dataset",
    "block, 2 workers": "cold block, 2 workers, read_ahead=dataset",
}
LARGE_BLOCK_CELLS = 196_608  # cells per block pass on the large file's copy (768 batches)
REFERENCE_1M = 2_908  # cells/s: backed uniform at 1M cells in the reference run issue 15 cites


def _subprocess_json(args: list[str], env: dict) -> dict:
    """Run a benchmark script in a fresh process; its last stdout line is JSON."""
    out = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, check=False
    )
    if out.returncode:
        error = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"
        print(f"  FAILED: {' '.join(args)}\n{out.stderr[-3000:]}", file=sys.stderr, flush=True)
        return {"error": error}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cold_reads(path: Path, cases: list[str], args, env: dict, block_cells: int) -> dict:
    """``cold_reads.py``'s cases (shorthands of :data:`COLD_CASES`) on ``path``, in one process,
    passes alternating (block passes over the first ``block_cells``); the rounds keyed by
    shorthand."""
    cmd = [str(HERE / "cold_reads.py"), str(path), "--json", "--rounds", str(args.disk_rounds)]
    cmd += ["--batches", str(args.cold_batches), "--batch-size", str(args.batch_size)]
    cmd += ["--block-batches", str(-(-block_cells // args.batch_size))]
    for c in cases:
        cmd += ["--case", COLD_CASES[c]]
    start = time.perf_counter()
    out = _subprocess_json(cmd, env)
    if "rounds" in out:
        out["rounds"] = {c: out["rounds"][COLD_CASES[c]] for c in cases}
        medians = ", ".join(f"{c} {np.median(v):,.0f}" for c, v in out["rounds"].items())
        print(f"  {path.name}: {medians} cells/s ({time.perf_counter() - start:.0f} s)", flush=True)
    return out


def run_disk(args, plain: Path, env: dict) -> dict:
    """Every figure issue 15 lists, measured in this run, both sides of every ratio cold.

    For the main file (and the 1M-cell file with ``--million``): the disk's limits on it
    (``disk.py``), a shuffled copy written (``shuffle_copy.py``: time, peak RSS, batch mix) and
    kept while it is read, and cold reads (``cold_reads.py``, the file evicted before every
    pass): uniform on the file, block shuffle with ``read_ahead`` on the copy, with and without
    workers and against anndata's backed read on the main file. The copies (and the 1M-cell
    file, unless ``--keep-data``) are deleted afterwards.
    """
    files = {"main": plain}
    if args.million:
        files["large"] = _data(args, args.large_cells)
    out = {}
    for key, path in files.items():
        main = key == "main"
        entry: dict = {"cells": None, "file_mib": path.stat().st_size / 2**20}
        entry["limits"] = measure_disk(path)
        print(f"  {path.name}: {limits_text(entry['limits'])}", flush=True)
        start = time.perf_counter()
        entry["shuffle_copy"] = _subprocess_json(
            [str(HERE / "shuffle_copy.py"), str(path), "--keep"], env
        )
        copy = path.with_name(path.stem + ".shuffled0.h5ad")
        print(
            f"  shuffled copy of {path.name}: {entry['shuffle_copy']} "
            f"({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
        try:
            if copy.exists():
                entry["copy_limits"] = measure_disk(copy)
                print(f"  {copy.name}: {limits_text(entry['copy_limits'])}", flush=True)
            cases = ["anndata", "uniform", "uniform, 2 workers"] if main else ["uniform"]
            entry["source"] = _cold_reads(path, cases, args, env, 0)
            if copy.exists():
                # block passes: the whole main file; LARGE_BLOCK_CELLS (3 GB) of the large one
                cells = args.cells if main else min(args.large_cells, LARGE_BLOCK_CELLS)
                cases = ["block", "block, 2 workers"] if main else ["block"]
                entry["copy"] = _cold_reads(copy, cases, args, env, cells)
        finally:
            copy.unlink(missing_ok=True)
        entry["cells"] = entry["source"].get("cells")
        out[key] = entry
    if args.million and not args.keep_data:
        files["large"].unlink()
        print(f"  deleted {files['large'].name}", flush=True)
    return out


def _median_range(values: list[float], spec: str, unit: str = "") -> str:
    lo, hi = min(values), max(values)
    return f"{np.median(values):{spec}}{unit} ({lo:{spec}}-{hi:{spec}})"


def _row(label, measured, against, ratios, target, met) -> list[str]:
    return [label, measured, against, ratios, target, met]


def _disk_rows(entry: dict, main: bool) -> list[list[str]]:
    """The issue-15 rows of one file (see :func:`run_disk`)."""
    rows = []
    cells = entry.get("cells") or 0
    name = f"{cells:,}-cell file" if cells else "file"
    limits, source, copy = entry["limits"], entry.get("source", {}), entry.get("copy", {})
    rounds, copy_rounds = source.get("rounds", {}), copy.get("rounds", {})
    qd32_cells = limits["rand_iops_qd32"] / 2  # two reads per cell: values and gene indices

    def per_round(a: list[float], b: list[float]) -> list[float]:
        return [x / y for x, y in zip(a, b, strict=True)]

    def met(value: float, target: float) -> str:
        return "yes" if value >= target else "no"

    uni = rounds.get("uniform")
    if uni and main and rounds.get("anndata"):
        r = per_round(uni, rounds["anndata"])
        rows.append(
            _row(
                f"cold uniform, {name}, 0 workers vs anndata's cold `adata[sorted idx].X`",
                _fmt(float(np.median(uni))),
                _fmt(float(np.median(rounds["anndata"]))),
                _median_range(r, ".2f", "x"),
                ">= 2.5x",
                met(float(np.median(r)), 2.5),
            )
        )
    if uni:
        r = [u / qd32_cells for u in uni]
        rows.append(
            _row(
                f"cold uniform, {name}, 0 workers vs the random-read limit at depth 32",
                _fmt(float(np.median(uni))),
                f"{_fmt(qd32_cells)} ({_fmt(limits['rand_iops_qd32'])} reads/s / 2)",
                _median_range(r, ".2f"),
                ">= 0.60" if main else "-",
                met(float(np.median(r)), 0.6) if main else "-",
            )
        )
    if uni and not main:
        r = [u / REFERENCE_1M for u in uni]
        rows.append(
            _row(
                f"cold uniform, {name}, 0 workers vs the reference run's {REFERENCE_1M:,}",
                _fmt(float(np.median(uni))),
                _fmt(REFERENCE_1M),
                _median_range(r, ".2f", "x"),
                ">= 5x",
                met(float(np.median(r)), 5.0),
            )
        )
    block = copy_rounds.get("block")
    if block:
        # the highest sequential figure of the source and the copy, at depth 1 and 32: a
        # 5-second fio figure moves by up to 2x on this virtual disk from one run to the next
        both = (limits, entry.get("copy_limits", limits))
        mib_s = max(d.get(k, 0) for d in both for k in ("seq_mib_s", "seq_mib_s_qd32"))
        seq = mib_s * 2**20 / copy["bytes_per_cell"]  # cells/s
        r = [b / seq for b in block]
        rows.append(
            _row(
                f"cold block shuffle (`read_ahead`), 0 workers, on the {name}'s shuffled copy "
                f"({copy['block_cells']:,} cells per pass) vs the sequential limit (the highest "
                "of the source's and the copy's figures)",
                _fmt(float(np.median(block))),
                f"{_fmt(seq)} ({mib_s:,.0f} MiB/s)",
                _median_range(r, ".2f"),
                ">= 0.60",
                met(float(np.median(r)), 0.6),
            )
        )
    tv = entry.get("shuffle_copy", {}).get("tv", {})
    if tv:
        ratio = tv["block, shuffled copy"] / tv["uniform"]
        rows.append(
            _row(
                f"batch label TV, block shuffle on the {name}'s shuffled copy vs uniform "
                f"(block on the source order: {tv['block, source order']:.3f})",
                f"{tv['block, shuffled copy']:.3f}",
                f"{tv['uniform']:.3f}",
                f"{ratio:.2f}x",
                "<= 1.1x",
                "yes" if ratio <= 1.1 else "no",
            )
        )
    for label, zero, two, rs in (
        ("uniform", "uniform", "uniform, 2 workers", rounds),
        (
            "block shuffle (`read_ahead`) on the shuffled copy",
            "block",
            "block, 2 workers",
            copy_rounds,
        ),
    ):
        if rs.get(zero) and rs.get(two):
            r = per_round(rs[two], rs[zero])
            rows.append(
                _row(
                    f"cold {label}, {name}, 2 workers vs 0",
                    _fmt(float(np.median(rs[two]))),
                    _fmt(float(np.median(rs[zero]))),
                    _median_range(r, ".2f", "x"),
                    ">= 1.0x",
                    met(float(np.median(r)), 1.0),
                )
            )
    sc = entry.get("shuffle_copy", {})
    if "seconds" in sc:
        rows.append(
            _row(
                f"writing a shuffled copy of the {name} ({sc['file_mib']:,.0f} MiB, source "
                "cold): time; peak RSS",
                f"{sc['seconds']:.1f} s ({sc['mib_per_s']:,.0f} MiB/s); "
                f"{sc['peak_rss_mib']:,.0f} MiB",
                f"{sc['rss_before_mib']:,.0f} MiB RSS before writing",
                "-",
                "peak RSS <= 1,024 MiB",
                "yes" if sc["peak_rss_mib"] <= 1024 else "no",
            )
        )
    return rows


def disk_report(disk: dict) -> list[str]:
    """Section 7's markdown: issue 15's table, each row from this run."""
    rows = []
    for key in ("main", "large"):
        if key in disk:
            rows += _disk_rows(disk[key], key == "main")
    out = [
        "",
        "### Issue 15: cold reads as fractions of the disk's limits, measured in this run",
        "",
        _table(["benchmark", "measured", "against", "ratio (rounds)", "target", "met"], rows),
        "",
    ]
    for key in ("main", "large"):
        if key not in disk:
            continue
        e = disk[key]
        out.append(
            f"- disk limits on the {e.get('cells') or 0:,}-cell file: {limits_text(e['limits'])}"
        )
        if "copy_limits" in e:
            out.append(f"  - on its shuffled copy: {limits_text(e['copy_limits'])}")
    out += [
        "",
        "Cells/s: median of the rounds (range in brackets); each cold pass follows an eviction "
        "of the file from the page cache (`posix_fadvise(DONTNEED)`, checked with `fincore`), "
        "passes of a file's cases alternate in one process (`cold_reads.py`) and ratios of two "
        "loaders are taken per round. The limits are read around the page cache (`O_DIRECT`), so "
        "both sides of every ratio are cold. Random-read limit in cells/s: reads/s / 2 (a cell's "
        "values and gene indices); sequential: MiB/s over the stored bytes per cell. Dense "
        "batches of 256; uniform passes read random batches, block passes one epoch of "
        "`BlockShuffleSampler` (blocks of 64, pools of 16 batches) over the first cells of "
        "the copy (the whole main file). "
        "annbatch is not in the table: it needs Python 3.12.",
    ]
    return out


def run_disk_only(args) -> dict:
    """Section 7 alone (``--disk-only``): the main file (and with ``--million`` the 1M-cell
    file) written if missing, then :func:`run_disk`."""
    start, plain = _begin(args)
    print("7. the disk's limits, shuffled copies, cold reads", flush=True)
    disk = run_disk(args, plain, Runner({}).env)
    return {
        "disk": disk,
        "csr_mib": _csr_mib(plain),
        **_run_facts(args, start),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="20,000 cells, fewer batches and repeats: a few minutes",
    )
    parser.add_argument(
        "--million",
        action="store_true",
        help="also measure backed memory at 1,000,000 cells (writes ~16 GB, "
        "deleted afterwards unless --keep-data)",
    )
    parser.add_argument("--keep-data", action="store_true", help="keep the 1M-cell file")
    parser.add_argument("--cells", type=int, help="cells of the main matrix (default 100,000)")
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--nnz", type=int, default=2_000, help="mean non-zeros per cell")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, help="batches per pass (default 200)")
    parser.add_argument(
        "--repeats", type=int, help="timed passes per configuration (default 5; 2 with --quick)"
    )
    parser.add_argument("--cells-per-time", type=int, default=128)
    parser.add_argument(
        "--collections-only",
        action="store_true",
        help="run only section 8 (collections of files); with --quick --cells 2000: a smoke run",
    )
    parser.add_argument(
        "--disk-only",
        action="store_true",
        help="run only section 7 (issue 15's cold figures against the disk's limits; with "
        "--million also on the 1M-cell file)",
    )
    parser.add_argument(
        "--large-cells",
        type=int,
        default=1_000_000,
        help="cells of the --million file (smaller for a smoke run)",
    )
    parser.add_argument("--data-dir", type=Path, default=HERE / "data")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    quick = args.quick
    args.cells = args.cells or (20_000 if quick else 100_000)
    args.batches = args.batches or (30 if quick else 200)
    args.repeats = args.repeats or (2 if quick else 5)
    args.disk_divisor = 2 if quick else 4
    args.sweep_cells = 8_192 if quick else 32_768
    args.sweep_repeats = 1 if quick else 3
    args.size_cells = [5_000] if quick else [10_000]
    args.disk_rounds = 2 if quick else 5
    args.cold_batches = 16 if quick else 100
    if args.disk_only or args.collections_only:
        if args.disk_only:
            suite, name = run_disk_only(args), "disk"
            text = "\n".join([_disk_context(suite), *disk_report(suite["disk"])]) + "\n"
        else:
            suite, name = run_collections_only(args), "collections"
            text = "\n".join([_context(suite), *_collections_report(suite)]) + "\n"
        print("\n" + text)
        stem = args.out / f"{name}_{'quick' if quick else 'full'}"
        stem.with_suffix(".json").write_text(json.dumps(suite, indent=1))
        stem.with_suffix(".md").write_text(text)
        print(f"wrote {stem}.json and .md ({suite['duration_s'] / 60:.1f} min)")
        return
    suite = run_suite(args)
    text = report(suite)
    print("\n" + text)
    stem = args.out / f"suite_{'quick' if quick else 'full'}"
    stem.with_suffix(".json").write_text(json.dumps(suite, indent=1))
    stem.with_suffix(".md").write_text(text)
    from plot import plot_suite

    plot_suite(suite, stem.with_suffix(".png"))
    print(f"wrote {stem}.json, .md and .png ({suite['duration_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
