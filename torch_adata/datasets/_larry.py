"""LARRY lineage-tracing data (Weinreb et al., Science 2020) as an AnnData.

The files are downloaded once from the Klein lab's paper website (GEO as a fallback), verified,
parsed and written to ``<cache>/larry_<experiment>.h5ad``; later calls read that file without
touching the network. No preprocessing happens here: see :func:`torch_adata.datasets.preprocess`.
"""

from __future__ import annotations

import gzip
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp

from ._fetch import DEFAULT_TIMEOUT, fetch
from ._fetch import cache_dir as resolve_cache_dir

__all__ = ["BASE_URL", "GEO_MIRROR", "KNOWN_HASHES", "larry", "larry_filenames"]

Experiment = Literal["in_vitro", "in_vivo", "cytokine_perturbation"]

#: The primary host, the Klein lab's paper website.
BASE_URL = "https://kleintools.hms.harvard.edu/paper_websites/state_fate2020/"

#: GEO series GSE140802 stores the four main files per sample, prefixed with the sample id.
#: Best effort: the URL pattern is GEO's usual one, the copies are not guaranteed to be
#: byte-identical to the primary ones (pass ``hashes=`` if their digests differ), and the two
#: in vitro trajectory files are not on GEO at all.
GEO_MIRROR = "https://ftp.ncbi.nlm.nih.gov/geo/samples/GSM4185nnn/{gsm}/suppl/{gsm}_{{filename}}"
_GEO_SAMPLES = {
    "in_vitro": "GSM4185642",
    "in_vivo": "GSM4185643",
    "cytokine_perturbation": "GSM4185644",
}

_PREFIXES = {
    "in_vitro": "stateFate_inVitro_",
    "in_vivo": "stateFate_inVivo_",
    "cytokine_perturbation": "stateFate_cytokinePerturbation_",
}
_COUNTS, _GENES, _CLONES, _METADATA = (
    "normed_counts.mtx.gz",
    "gene_names.txt.gz",
    "clone_matrix.mtx.gz",
    "metadata.txt.gz",
)
_PSEUDOTIME, _TRAJECTORY = (
    "neutrophil_pseudotime.txt.gz",
    "neutrophil_monocyte_trajectory.txt.gz",
)
_MAIN_PARTS = (_METADATA, _GENES, _CLONES, _COUNTS)

#: SHA-256 digests of the primary files (published by third parties, not by the authors).
#: Files without an entry are validated by parsing instead.
KNOWN_HASHES: dict[str, str] = {
    "stateFate_inVitro_metadata.txt.gz": (
        "c88e02cc512205e7033e28bf512f5d0dd43b98ba547fdd4a196b4bd9b62d7c07"
    ),
    "stateFate_inVitro_clone_matrix.mtx.gz": (
        "26258702f8ccb7c98884d4f91bdcd1d6f552d7f2dd5125358efe7ade2fdcc50d"
    ),
    "stateFate_inVitro_gene_names.txt.gz": (
        "5672e137bcac196851b8dc44311b40fe61c428d6fd726dfae320b3fe5ddfffcd"
    ),
}


def larry_filenames(experiment: Experiment = "in_vitro") -> list[str]:
    """Names of the files that make up one LARRY experiment.

    Parameters
    ----------
    experiment
        ``"in_vitro"``, ``"in_vivo"`` or ``"cytokine_perturbation"``.

    Returns
    -------
    list of str
        File names as hosted, e.g. ``"stateFate_inVitro_metadata.txt.gz"``.
    """
    prefix = _prefix(experiment)
    parts = list(_MAIN_PARTS)
    if experiment == "in_vitro":
        parts += [_PSEUDOTIME, _TRAJECTORY]
    return [prefix + part for part in parts]


def larry(
    experiment: Experiment = "in_vitro",
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    base_url: str | None = None,
    mirrors: Sequence[str] | None = None,
    hashes: Mapping[str, str | None] | None = None,
    progress: bool = True,
    force: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
) -> ad.AnnData:
    """Load one LARRY experiment (Weinreb et al., Science 2020; GEO GSE140802).

    On the first call the files are downloaded into ``<cache>/larry/``, verified (SHA-256
    where a digest is known, parsing otherwise), assembled, and written atomically to
    ``<cache>/larry_<experiment>.h5ad``. Later calls only read that file. The in vitro
    download is about 2.1 GB; the raw files can be deleted once the ``.h5ad`` exists.

    Parameters
    ----------
    experiment
        ``"in_vitro"`` (days 2, 4, 6; 130,887 cells x 25,289 genes), ``"in_vivo"``
        (days 2, 9, 16) or ``"cytokine_perturbation"`` (days 2, 4, 6).
    cache_dir
        Cache folder. Default: ``$TORCH_ADATA_CACHE``, else the OS cache folder
        (``pooch.os_cache("torch_adata")``, e.g. ``~/.cache/torch_adata`` on Linux).
    base_url
        Replaces the primary host; file names are appended to it. Default :data:`~torch_adata.datasets.BASE_URL`.
    mirrors
        Fallback locations tried in order after the primary one. Each is either a base URL
        (the file name is appended) or a template containing ``{filename}``. Default: GEO
        (:data:`~torch_adata.datasets.GEO_MIRROR`, best effort) for the four main files. Pass ``[]`` for none.
    hashes
        Per-file SHA-256 digests that override or add to :data:`~torch_adata.datasets.KNOWN_HASHES`, keyed by file
        name (see :func:`~torch_adata.datasets.larry_filenames`); a value of ``None`` disables the check for that
        file. Use this for a re-hosted copy whose bytes differ.
    progress
        Show download progress bars.
    force
        Download every file again and rebuild the ``.h5ad``. The old files are replaced only
        when the new ones are complete and verified.
    timeout
        Network timeout in seconds (to connect, and between received bytes).

    Returns
    -------
    anndata.AnnData
        - ``X``: CSR float32, total-count (L1) normalised UMI counts (not log-transformed).
        - ``obs``: the metadata columns verbatim (``Library``, ``Cell barcode``,
          ``Time point``, ...): text columns as categoricals, ``Time point`` numeric.
          ``obs_names`` are the base-0 row numbers as strings (the cell indices used by the
          trajectory files). In vitro also ``neutrophil_pseudotime`` (float, NaN off the
          trajectory) and ``neutrophil_monocyte_trajectory`` (bool).
        - ``var_names``: gene symbols.
        - ``obsm["X_clone"]``: CSR float32 cells x clones membership (a cell without a clone
          has an empty row).
        - ``uns["larry"]``: experiment name and provenance.

    Raises
    ------
    DownloadError
        A file could not be downloaded from any URL (the message lists each URL's failure).
    ValueError
        Unknown experiment or file name in ``hashes``, a file that does not parse, or files
        whose shapes disagree (the message gives every file's shape).
    """
    path, built = _prepare(
        experiment,
        cache_dir=cache_dir,
        base_url=base_url,
        mirrors=mirrors,
        hashes=hashes,
        progress=progress,
        force=force,
        timeout=timeout,
    )
    return built if built is not None else _read_cached(path)


def _prepare(
    experiment: Experiment,
    *,
    cache_dir: str | os.PathLike[str] | None,
    base_url: str | None,
    mirrors: Sequence[str] | None,
    hashes: Mapping[str, str | None] | None,
    progress: bool,
    force: bool,
    timeout: float = DEFAULT_TIMEOUT,
) -> tuple[Path, ad.AnnData | None]:
    """Make sure ``<cache>/larry_<experiment>.h5ad`` exists.

    Returns its path and, when it was built by this call, the AnnData already in memory.
    """
    names = larry_filenames(experiment)
    digests = _digests(names, hashes)
    root = resolve_cache_dir(cache_dir)
    h5ad = root / f"larry_{experiment}.h5ad"
    if h5ad.exists() and not force:
        return h5ad, None

    raw = root / "larry"
    paths = {}
    for name in names:
        urls = _urls(name, experiment, base_url, mirrors)
        paths[name] = fetch(
            name, urls, digests.get(name), raw, progress, force=force, timeout=timeout
        )
    unverified = {name for name in names if digests.get(name) is None}
    adata = _assemble(experiment, paths, unverified)
    _write_atomic(adata, h5ad)
    return h5ad, adata


# --------------------------------------------------------------------------- locations


def _prefix(experiment: str) -> str:
    try:
        return _PREFIXES[experiment]
    except KeyError:
        raise ValueError(
            f"Unknown LARRY experiment {experiment!r}; choose one of {sorted(_PREFIXES)}."
        ) from None


def _digests(names: list[str], hashes: Mapping[str, str | None] | None) -> dict[str, str | None]:
    digests: dict[str, str | None] = {n: KNOWN_HASHES.get(n) for n in names}
    for name, digest in (hashes or {}).items():
        if name not in digests:
            raise ValueError(
                f"hashes= names an unknown file {name!r}; the files of this experiment are {names}."
            )
        digests[name] = digest
    return digests


def _urls(
    filename: str, experiment: str, base_url: str | None, mirrors: Sequence[str] | None
) -> list[str]:
    if isinstance(mirrors, str):
        mirrors = [mirrors]
    if mirrors is None:
        hosted_on_geo = any(filename.endswith(part) for part in _MAIN_PARTS)
        mirrors = [GEO_MIRROR.format(gsm=_GEO_SAMPLES[experiment])] if hosted_on_geo else []
    return [_join(loc, filename) for loc in [base_url or BASE_URL, *mirrors]]


def _join(location: str, filename: str) -> str:
    if "{filename}" in location:
        return location.format(filename=filename)
    return location.rstrip("/") + "/" + filename


# --------------------------------------------------------------------------- parsing


def _assemble(experiment: str, paths: Mapping[str, Path], unverified: set[str]) -> ad.AnnData:
    """The AnnData of one experiment's files: the small tables first, every shape checked
    against them (:func:`_check_shapes`), then the large matrices."""
    prefix = _prefix(experiment)

    def part(name: str) -> Path:
        return paths[prefix + name]

    obs = _parse(part(_METADATA), unverified, _read_metadata)
    genes = _parse(part(_GENES), unverified, _read_genes)
    shapes = {
        _COUNTS: _parse(part(_COUNTS), unverified, _mm_shape),
        _CLONES: _parse(part(_CLONES), unverified, _mm_shape),
    }
    extras = {}
    if experiment == "in_vitro":
        extras[_PSEUDOTIME] = _parse(part(_PSEUDOTIME), unverified, _read_pseudotime)
        extras[_TRAJECTORY] = _parse(part(_TRAJECTORY), unverified, _read_indices)
    _check_shapes(experiment, obs, genes, shapes, extras, part(_METADATA).parent)

    n_cells = len(obs)
    matrix = _parse(part(_COUNTS), unverified, _read_csr)
    clones = _parse(part(_CLONES), unverified, _read_csr)
    if clones.shape[0] != n_cells:  # stored clones x cells
        clones = clones.T.tocsr()

    obs.index = pd.Index([str(i) for i in range(n_cells)])
    if experiment == "in_vitro":
        _add_trajectory_columns(obs, extras[_PSEUDOTIME], extras[_TRAJECTORY])

    adata = ad.AnnData(X=matrix, obs=obs, var=pd.DataFrame(index=pd.Index(genes)))
    if not adata.var_names.is_unique:
        adata.var_names_make_unique()
    adata.obsm["X_clone"] = clones
    adata.uns["larry"] = {
        "experiment": experiment,
        "X": "total-count (L1) normalised UMI counts",
        "reference": "Weinreb et al., Science 367, eaaw3381 (2020)",
        "geo": "GSE140802",
    }
    return adata


def _check_shapes(
    experiment: str,
    obs: pd.DataFrame,
    genes: list[str],
    shapes: Mapping[str, tuple[int, int]],
    extras: Mapping[str, pd.DataFrame],
    folder: Path,
) -> None:
    """Raise a ValueError listing every disagreement between the files' shapes (before the
    large matrices are read), with all the shapes and the fix."""
    prefix = _prefix(experiment)
    n_cells = len(obs)
    counts_shape, clones_shape = shapes[_COUNTS], shapes[_CLONES]
    counts, metadata, gene_names, clone_matrix = (
        prefix + name for name in (_COUNTS, _METADATA, _GENES, _CLONES)
    )
    problems = []
    if counts_shape[0] != n_cells:
        problems.append(f"{counts} has {counts_shape[0]} rows but {metadata} has {n_cells}")
    if counts_shape[1] != len(genes):
        problems.append(
            f"{counts} has {counts_shape[1]} columns but {gene_names} lists {len(genes)} genes"
        )
    if n_cells not in clones_shape:
        problems.append(
            f"neither dimension of {clone_matrix} {clones_shape} equals the {n_cells} cells "
            f"of {metadata}"
        )
    for name, table in extras.items():
        index = table.iloc[:, 0]
        if len(index) and (index.min() < 0 or index.max() >= n_cells):
            problems.append(
                f"{prefix}{name} refers to cell indices {index.min()}..{index.max()}, "
                f"outside 0..{n_cells - 1} ({metadata})"
            )
    if not problems:
        return
    listed = [
        f"  {prefix}{_METADATA}: {n_cells} cells x {obs.shape[1]} columns",
        f"  {prefix}{_GENES}: {len(genes)} genes",
        f"  {prefix}{_COUNTS}: {counts_shape[0]} x {counts_shape[1]}",
        f"  {prefix}{_CLONES}: {clones_shape[0]} x {clones_shape[1]}",
    ] + [f"  {prefix}{name}: {len(table)} rows" for name, table in extras.items()]
    raise ValueError(
        f"The LARRY {experiment} files do not agree:\n"
        + "\n".join(f"- {p}" for p in problems)
        + "\nShapes:\n"
        + "\n".join(listed)
        + f"\nThe files in {folder} may come from different releases or "
        "hosts; delete them (or pass force=True) to download them again."
    )


def _add_trajectory_columns(
    obs: pd.DataFrame, pseudotime: pd.DataFrame, trajectory: pd.DataFrame
) -> None:
    """The in vitro experiment's neutrophil pseudotime (NaN off it) and its trajectory cells."""
    n_cells = len(obs)
    column = np.full(n_cells, np.nan)
    column[pseudotime.iloc[:, 0].to_numpy()] = pseudotime.iloc[:, 1].to_numpy(dtype=float)
    obs["neutrophil_pseudotime"] = column
    on_trajectory = np.zeros(n_cells, dtype=bool)
    on_trajectory[trajectory.iloc[:, 0].to_numpy()] = True
    obs["neutrophil_monocyte_trajectory"] = on_trajectory


def _parse(path: Path, unverified: set[str], reader):
    try:
        return reader(path)
    except Exception as exc:
        hint = "delete it (or pass force=True) to download it again"
        if path.name in unverified:
            # Nothing vouches for this file but its content: drop it so the next call
            # downloads it again instead of trusting it.
            path.unlink(missing_ok=True)
            hint = "it had no known digest, so it was deleted and will be downloaded again"
        raise ValueError(
            f"Could not parse {path} ({type(exc).__name__}: {exc}); {hint}. If it comes from "
            "another host, check that it is the same file as on the LARRY website."
        ) from exc


def _read_metadata(path: Path) -> pd.DataFrame:
    obs = pd.read_csv(path, sep="\t", compression="gzip", index_col=False)
    if obs.shape[1] < 2:
        raise ValueError(f"expected tab-separated columns, got header {list(obs.columns)}")
    if "Time point" in obs:
        obs["Time point"] = pd.to_numeric(obs["Time point"])
    for column in obs.columns:
        values = obs[column]
        if pd.api.types.is_object_dtype(values) or pd.api.types.is_string_dtype(values):
            obs[column] = values.astype(str).astype("category")
    return obs


def _read_genes(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        genes = [line.strip() for line in handle]
    while genes and not genes[-1]:
        genes.pop()
    if not genes or any(not gene for gene in genes):
        raise ValueError("expected one non-empty gene symbol per line")
    return genes


def _mm_shape(path: Path) -> tuple[int, int]:
    rows, cols, *_ = scipy.io.mminfo(str(path))
    return int(rows), int(cols)


def _read_csr(path: Path) -> sp.csr_matrix:
    return sp.csr_matrix(scipy.io.mmread(str(path)), dtype=np.float32)


def _read_pseudotime(path: Path) -> pd.DataFrame:
    table = pd.read_csv(path, sep="\t", compression="gzip", index_col=False)
    if table.shape[1] < 2:
        raise ValueError(
            f"expected two tab-separated columns (cell index, pseudotime), got {table.shape[1]}"
        )
    return table.astype({table.columns[0]: np.int64, table.columns[1]: float})


def _read_indices(path: Path) -> pd.DataFrame:
    table = pd.read_csv(path, sep="\t", compression="gzip", index_col=False)
    return table.astype({table.columns[0]: np.int64})


# --------------------------------------------------------------------------- cache file


def _write_atomic(adata: ad.AnnData, path: Path) -> None:
    """Write ``adata`` to ``path`` so that ``path`` is either absent or complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".partial.h5ad", dir=path.parent)
    os.close(fd)
    try:
        adata.write_h5ad(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_cached(path: Path, backed: Literal["r"] | None = None) -> ad.AnnData:
    try:
        return ad.read_h5ad(path, backed=backed)
    except Exception as exc:
        raise OSError(
            f"Could not read the cached LARRY file {path} ({type(exc).__name__}: {exc}). "
            "Delete it or pass force=True to rebuild it."
        ) from exc
