"""Write a synthetic single-cell count matrix as ``.h5ad``, streamed row block by row block.

Usage::

    python benchmarks/generate.py out.h5ad                      # 100,000 x 20,000, ~2,000 nnz/cell
    python benchmarks/generate.py out.h5ad --cells 1000000      # ~16 GB, never held in memory
    python benchmarks/generate.py out_gz.h5ad --compression gzip

The matrix is CSR, float32 counts (``1 + Geometric(0.5)``), about ``--nnz`` distinct columns per
row spread uniformly over the genes (gaps between columns are geometric, so a row's count is
random around ``--nnz``). ``obs`` holds:

``cell_type``
    20 categories. ``--label-order contiguous`` (default) stores the cells sorted by type, as
    atlases sorted by sample or cluster are: the worst case for block shuffling, whose batches
    then hold few types. ``random`` assigns types independently of position.
``Time point``
    3 time points (2, 4, 6; int), assigned at random, independent of ``cell_type``.

The file is laid out as anndata writes one: obs, var and the ``X`` group's encoding attributes
come from anndata itself; ``X/data``, ``X/indices`` and ``X/indptr`` are resizable chunked
datasets (``maxshape=(None,)``, 32,768 elements per chunk, close to the chunks h5py picks for
anndata), appended one block of rows at a time, so memory stays at one block whatever the size.
The same ``--seed`` gives the same matrix with or without compression.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

N_TYPES = 20
TIME_POINTS = (2, 4, 6)
CHUNK = 2**15
BLOCK_ROWS = 5_000


def _obs(n_cells: int, label_order: str, seed: int):
    import pandas as pd

    rng = np.random.default_rng([seed, 1])
    types = np.repeat(np.arange(N_TYPES), -(-n_cells // N_TYPES))[:n_cells]
    if label_order == "random":
        types = rng.permutation(types)
    elif label_order != "contiguous":
        raise ValueError(f"label_order must be 'contiguous' or 'random', got {label_order!r}.")
    times = np.asarray(TIME_POINTS)[rng.integers(0, len(TIME_POINTS), n_cells)]
    return pd.DataFrame(
        {
            "cell_type": pd.Categorical.from_codes(types, [f"type_{i}" for i in range(N_TYPES)]),
            "Time point": times,
        },
        index=pd.Index(np.arange(n_cells).astype(str), name="cell"),
    )


def _row_block(rng: np.random.Generator, rows: int, n_genes: int, nnz: int):
    """Sorted distinct columns and counts of ``rows`` rows, ~``nnz`` per row; CSR pieces."""
    p = min(1.0, nnz / n_genes)
    width = int(nnz * 1.3 + 6 * np.sqrt(nnz) + 10)  # enough gaps to pass n_genes in every row
    cols = np.cumsum(rng.geometric(p, size=(rows, width)).astype(np.int32), axis=1) - 1
    keep = cols < n_genes
    counts = keep.sum(1)
    indices = cols[keep]
    data = (1 + rng.geometric(0.5, indices.size)).astype(np.float32)
    return data, indices, counts


def write_synthetic(
    path: str | Path,
    n_cells: int = 100_000,
    n_genes: int = 20_000,
    nnz: int = 2_000,
    *,
    compression: str | None = None,
    label_order: str = "contiguous",
    seed: int = 0,
) -> Path:
    """Stream a synthetic CSR count matrix with ``cell_type`` and ``Time point`` into ``path``.

    Parameters
    ----------
    path
        The ``.h5ad`` file to write (overwritten).
    n_cells, n_genes
        Shape of ``X``.
    nnz
        Mean number of non-zeros per cell (must be below ``n_genes``).
    compression
        ``None``, ``"gzip"`` or ``"lzf"``: HDF5 filter on ``X``'s datasets.
    label_order
        ``"contiguous"`` (cells sorted by ``cell_type``) or ``"random"``.
    seed
        Seed of the matrix and the labels.

    Returns
    -------
    The path written.
    """
    import anndata as ad
    import h5py
    import pandas as pd

    if not 0 < nnz < n_genes:
        raise ValueError(f"nnz must be between 1 and n_genes - 1 ({n_genes - 1}), got {nnz}.")
    if n_cells < 1:
        raise ValueError(f"n_cells must be positive, got {n_cells}.")
    if compression not in (None, "gzip", "lzf"):
        raise ValueError(f"compression must be None, 'gzip' or 'lzf', got {compression!r}.")
    path = Path(path)
    var = pd.DataFrame(index=pd.Index([f"gene_{j}" for j in range(n_genes)], name="gene"))
    ad.AnnData(obs=_obs(n_cells, label_order, seed), var=var).write_h5ad(path)

    big = n_cells * nnz * 1.1 >= 2**31
    index_dtype = np.int64 if big else np.int32
    options = {"compression": compression, "maxshape": (None,)}
    rng = np.random.default_rng([seed, 0])
    with h5py.File(path, "r+") as f:
        if "X" in f:
            del f["X"]
        group = f.create_group("X")
        group.attrs["encoding-type"] = "csr_matrix"
        group.attrs["encoding-version"] = "0.1.0"
        group.attrs["shape"] = np.array([n_cells, n_genes], dtype=np.int64)
        data_ds = group.create_dataset("data", (0,), np.float32, chunks=(CHUNK,), **options)
        indices_ds = group.create_dataset("indices", (0,), np.int32, chunks=(CHUNK,), **options)
        indptr_ds = group.create_dataset(
            "indptr", (n_cells + 1,), index_dtype, chunks=(min(CHUNK, n_cells + 1),), **options
        )
        indptr_ds[0] = 0
        filled = 0
        for start in range(0, n_cells, BLOCK_ROWS):
            rows = min(BLOCK_ROWS, n_cells - start)
            data, indices, counts = _row_block(rng, rows, n_genes, nnz)
            end = filled + data.size
            data_ds.resize((end,))
            indices_ds.resize((end,))
            data_ds[filled:end] = data
            indices_ds[filled:end] = indices
            indptr_ds[start + 1 : start + rows + 1] = filled + np.cumsum(counts)
            filled = end
    return path


def split_rows(path: str | Path, n_files: int, out_dir: str | Path) -> list[Path]:
    """Write ``path``'s cells into ``n_files`` files of consecutive rows (near-equal counts):
    the same matrix as a collection. Files already there are reused.

    Parameters
    ----------
    path
        The ``.h5ad`` file to split (CSR, read backed one part at a time).
    n_files
        How many files.
    out_dir
        Where the parts go, as ``part_000.h5ad``, ``part_001.h5ad``, ...

    Returns
    -------
    The paths of the parts, in row order.
    """
    import anndata as ad

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = [out_dir / f"part_{k:03d}.h5ad" for k in range(n_files)]
    if all(p.exists() for p in parts):
        return parts
    source = ad.read_h5ad(path, backed="r")
    bounds = np.linspace(0, source.n_obs, n_files + 1).round().astype(int)
    for part, start, stop in zip(parts, bounds[:-1], bounds[1:], strict=True):
        tmp = part.with_suffix(".partial.h5ad")
        source[start:stop].to_memory().write_h5ad(tmp)
        tmp.rename(part)
    source.file.close()
    return parts


def rename_genes(paths: list[Path], share: float, out_dir: str | Path, seed: int = 0) -> list[Path]:
    """Copies of ``paths`` whose gene sets differ by ``share``: the same randomly chosen
    ``share`` of the columns is renamed in every copy to names of that copy's own, so each
    file has ``share`` genes no other file has and an inner join keeps the other
    ``1 - share`` (at the same columns of every file). Only ``var`` is rewritten.

    Returns
    -------
    The copies' paths, in the order of ``paths``.
    """
    import shutil

    import h5py

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    copies = [out_dir / p.name for p in paths]
    if all(c.exists() for c in copies):
        return copies
    for k, (path, copy) in enumerate(zip(paths, copies, strict=True)):
        tmp = copy.with_suffix(".partial.h5ad")
        shutil.copyfile(path, tmp)
        with h5py.File(tmp, "r+") as f:
            var = f["var"]
            index = var[var.attrs["_index"]]
            names = index.asstr()[:].astype(object)
            own = np.random.default_rng(seed).choice(
                len(names), round(share * len(names)), replace=False
            )
            names[own] = [f"file{k}_{names[j]}" for j in own]
            index[...] = names.astype(str).astype(object)
        tmp.rename(copy)
    return copies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="the .h5ad file to write")
    parser.add_argument("--cells", type=int, default=100_000)
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--nnz", type=int, default=2_000, help="mean non-zeros per cell")
    parser.add_argument("--compression", choices=["none", "gzip", "lzf"], default="none")
    parser.add_argument("--label-order", choices=["contiguous", "random"], default="contiguous")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action="store_true", help="read it back with anndata")
    args = parser.parse_args()
    start = time.perf_counter()
    write_synthetic(
        args.path,
        args.cells,
        args.genes,
        args.nnz,
        compression=None if args.compression == "none" else args.compression,
        label_order=args.label_order,
        seed=args.seed,
    )
    size = args.path.stat().st_size / 2**20
    print(f"wrote {args.path} ({size:,.0f} MiB) in {time.perf_counter() - start:.0f} s")
    if args.check:
        import anndata as ad

        adata = ad.read_h5ad(args.path, backed="r")
        rows = adata[: min(1000, adata.n_obs)].X
        print(
            f"anndata reads it back: {adata.shape}, first rows nnz/cell {rows.nnz / rows.shape[0]:.0f}"
        )


if __name__ == "__main__":
    main()
