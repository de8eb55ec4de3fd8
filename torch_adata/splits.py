"""Train/val/test splits of an AnnData's cells: random, stratified, held out by obs values, explicit.

:func:`make_splits` is a pure function of its arguments (the seed included), so every rank of a
distributed run computes the same split, and a split saved with a checkpoint can be compared
with the one a resumed run would draw. Splits are sorted int64 arrays of AnnData row positions.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

SPLIT_NAMES = ("train", "val", "test")


def _count(size: float | int, n: int, name: str) -> int:
    """A split size given as a fraction (float in [0, 1)) or a count (int) -> a count."""
    if isinstance(size, bool) or not isinstance(size, (int, float, np.integer, np.floating)):
        raise TypeError(
            f"{name} must be a fraction (float) or a number of cells (int), got {size!r}."
        )
    if isinstance(size, (float, np.floating)):
        if not 0.0 <= size < 1.0:
            raise ValueError(f"{name}={size} must be a fraction in [0, 1) or a number of cells.")
        return round(size * n)
    if size < 0:
        raise ValueError(f"{name}={size} must not be negative.")
    return int(size)


def _random_split(rows: np.ndarray, n_val: int, n_test: int, rng: np.random.Generator):
    perm = rng.permutation(rows)
    return perm[n_val + n_test :], perm[:n_val], perm[n_val : n_val + n_test]


def _largest_remainder(total: int, quotas: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """Whole numbers summing to ``total`` (if the caps allow), each near its quota and at most
    its cap: floors first, then one more for the largest fractional parts."""
    counts = np.minimum(np.floor(quotas).astype(np.int64), caps)
    order = np.argsort(-(quotas - np.floor(quotas)), kind="stable")
    left = total - int(counts.sum())
    while left > 0:
        grown = False
        for c in order:
            if left > 0 and counts[c] < caps[c]:
                counts[c] += 1
                left -= 1
                grown = True
        if not grown:
            break
    return counts


def _stratified_split(rows, labels, val_size, test_size, rng, key: str = "column"):
    """Split each class separately with the same fractions.

    The split sizes are those of an unstratified split (``round(val_size * n)``), shared out
    between classes by largest remainder, so no split shrinks when classes are small. A column
    whose classes are mostly too small to be shared (a continuous one) raises; a few small
    classes warn, with the numbers.
    """
    if not (isinstance(val_size, float) and isinstance(test_size, float)):
        raise TypeError("stratified splits take val_size and test_size as fractions.")
    n = len(rows)
    codes, uniques = pd.factorize(labels, use_na_sentinel=False)
    sizes = np.bincount(codes, minlength=len(uniques)).astype(np.int64)
    fractions = [f for f in (val_size, test_size) if f > 0]
    if fractions:
        need = int(np.ceil(1.0 / min(fractions) - 1e-9))  # cells for one in the smallest split
        small = sizes < need
        in_small = int(sizes[small].sum())
        if in_small > n / 2:
            raise ValueError(
                f"stratify_key {key!r} cannot be stratified: it has {len(uniques)} distinct "
                f"values among {n} cells, and {int(small.sum())} of them (holding {in_small} "
                f"cells) have fewer than the {need} cells a split of "
                f"{min(fractions):g} needs to get one. It looks continuous or too fine: "
                "stratify on a categorical column, or bin this one first, e.g. "
                f"`adata.obs['{key}_bins'] = pd.qcut(adata.obs[{key!r}], 5)`."
            )
        if small.any():
            shown = ", ".join(
                f"{uniques[c]!s} ({sizes[c]})"
                for c in np.flatnonzero(small)[np.argsort(sizes[small])][:10]
            )
            warnings.warn(
                f"stratify_key {key!r}: {int(small.sum())} of {len(uniques)} classes have "
                f"fewer than the {need} cells a split of {min(fractions):g} needs to hold one "
                f"in proportion: {shown}. Their cells go to train, val and test by rounding "
                "(the split sizes are kept), so those classes may miss from val or test.",
                UserWarning,
                stacklevel=3,
            )
    n_val = _count(val_size, n, "val_size")
    n_test = _count(test_size, n, "test_size")
    val_counts = _largest_remainder(n_val, sizes * val_size, sizes)
    test_counts = _largest_remainder(n_test, sizes * test_size, sizes - val_counts)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in SPLIT_NAMES}
    for c in range(len(uniques)):
        members = rows[codes == c]
        train, val, test = _random_split(members, int(val_counts[c]), int(test_counts[c]), rng)
        for name, part in zip(SPLIT_NAMES, (train, val, test), strict=True):
            parts[name].append(part)
    return tuple(
        np.concatenate(parts[k]) if parts[k] else np.empty(0, np.int64) for k in SPLIT_NAMES
    )


def _holdout_mask(obs: pd.DataFrame, holdout: Mapping[str, Sequence]) -> np.ndarray:
    mask = np.zeros(len(obs), dtype=bool)
    for key, values in holdout.items():
        if key not in obs.columns:
            raise KeyError(f"holdout column {key!r} is not in obs; obs has: {list(obs.columns)}.")
        values = [values] if isinstance(values, (str, int, float)) else list(values)
        column = obs[key]
        hit = column.isin(values).to_numpy()
        present = set(pd.unique(column.dropna()))
        absent = [v for v in values if v not in present]
        if absent:
            raise ValueError(
                f"holdout values {absent} of obs column {key!r} match no cell; the column has "
                f"{sorted(present, key=str)[:20]}."
            )
        mask |= hit
    return mask


def make_splits(
    obs: pd.DataFrame,
    *,
    val_size: float | int = 0.1,
    test_size: float | int = 0.1,
    stratify_key: str | None = None,
    holdout: Mapping[str, Sequence] | None = None,
    holdout_split: str = "test",
    indices: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Split the cells of ``obs`` into train/val/test (and predict = every cell).

    Parameters
    ----------
    obs
        The AnnData's ``obs`` (only its length and the named columns are read).
    val_size, test_size
        Fractions of the cells that are not held out (float in [0, 1)) or numbers of cells.
    stratify_key
        obs column whose class proportions every split keeps (fractions only). The split
        sizes are those without stratification. A column whose classes are mostly smaller
        than a split needs (continuous, or too fine) raises; a few such classes warn.
    holdout
        ``{obs column: values}``: cells with any of these values go to ``holdout_split``
        entirely (a time point, a well, a donor), before the random split of the rest.
    holdout_split
        Where held-out cells go: ``"test"`` (default) or ``"val"``.
    indices
        Explicit row positions per split, e.g. ``{"train": [...], "val": [...]}``; overrides
        everything else. Splits must be disjoint.
    seed
        Seed of the random split.

    Returns
    -------
    dict
        ``{"train", "val", "test", "predict"}`` -> sorted int64 row positions.
    """
    n = len(obs)
    if n == 0:
        raise ValueError("Cannot split an AnnData with no cells.")
    if indices is not None:
        splits = _explicit(indices, n)
    else:
        if holdout_split not in ("test", "val"):
            raise ValueError(f"holdout_split must be 'test' or 'val', got {holdout_split!r}.")
        held = _holdout_mask(obs, holdout) if holdout else np.zeros(n, dtype=bool)
        rows = np.flatnonzero(~held).astype(np.int64)
        rng = np.random.default_rng(seed)
        if stratify_key is not None:
            if stratify_key not in obs.columns:
                raise KeyError(
                    f"stratify_key {stratify_key!r} is not in obs; obs has: {list(obs.columns)}."
                )
            labels = obs[stratify_key].to_numpy()[rows]
            train, val, test = _stratified_split(
                rows, labels, val_size, test_size, rng, stratify_key
            )
        else:
            n_val = _count(val_size, len(rows), "val_size")
            n_test = _count(test_size, len(rows), "test_size")
            if n_val + n_test > len(rows):
                raise ValueError(
                    f"val ({n_val}) + test ({n_test}) cells exceed the {len(rows)} cells available."
                )
            train, val, test = _random_split(rows, n_val, n_test, rng)
        extra = np.flatnonzero(held).astype(np.int64)
        if holdout_split == "test":
            test = np.concatenate([test, extra])
        else:
            val = np.concatenate([val, extra])
        splits = {"train": train, "val": val, "test": test}
    splits = {k: np.sort(np.asarray(v, dtype=np.int64)) for k, v in splits.items()}
    if len(splits["train"]) == 0:
        raise ValueError(
            "The train split is empty: lower val_size/test_size or hold out fewer cells."
        )
    splits["predict"] = np.arange(n, dtype=np.int64)
    return splits


def _sha256(parts) -> str:
    return hashlib.sha256("\x00".join(parts).encode("utf-8", "surrogatepass")).hexdigest()


def fingerprint(
    obs_names: Sequence[str], sources: Sequence[tuple[str, int]] | None = None
) -> dict[str, int | str]:
    """What a split's row positions refer to: the cells' number and their names, in order.

    Saved with a split (e.g. in a checkpoint) so that it is only applied to the cells it was
    drawn on: the same names in the same order give the same fingerprint, on every process
    and in every session; a cell added, removed, renamed or moved changes it. For a
    collection of sources, the sources' keys and sizes enter it too, so a split is not applied
    to another collection whose cells happen to carry the same names (files renamed,
    reordered, or cells moved from one file to another).

    Parameters
    ----------
    obs_names
        The AnnData's ``obs_names`` (a collection's, concatenated), in row order.
    sources
        For a collection: ``(key, n_obs)`` of each source, in order; ``None`` for one AnnData.

    Returns
    -------
    dict
        ``{"n_obs": number of cells, "obs_names_sha256": hex SHA-256 digest of the names}``,
        and for a collection ``"n_sources"`` and ``"sources_sha256"`` (the digest of the
        sources' keys and sizes).
    """
    names = pd.Index(obs_names).astype(str)
    out: dict[str, int | str] = {"n_obs": len(names), "obs_names_sha256": _sha256(names)}
    if sources is not None:
        pairs = [(str(key), int(n)) for key, n in sources]
        out["n_sources"] = len(pairs)
        out["sources_sha256"] = _sha256(f"{key}\x01{n}" for key, n in pairs)
    return out


def _explicit(indices: Mapping[str, Sequence[int]], n: int) -> dict[str, np.ndarray]:
    unknown = set(indices) - set(SPLIT_NAMES)
    if unknown:
        raise ValueError(f"indices has unknown splits {sorted(unknown)}; use {SPLIT_NAMES}.")
    out = {}
    for name in SPLIT_NAMES:
        rows = np.asarray(indices.get(name, []))
        if rows.size and not np.issubdtype(rows.dtype, np.integer):
            raise TypeError(f"indices[{name!r}] must hold integer row positions, got {rows.dtype}.")
        rows = rows.astype(np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise IndexError(f"indices[{name!r}] has positions outside [0, {n}).")
        if len(np.unique(rows)) != len(rows):
            raise ValueError(f"indices[{name!r}] repeats row positions.")
        out[name] = rows
    for i, a in enumerate(SPLIT_NAMES):
        for b in SPLIT_NAMES[i + 1 :]:
            common = np.intersect1d(out[a], out[b])
            if common.size:
                raise ValueError(
                    f"indices[{a!r}] and indices[{b!r}] share {common.size} cells "
                    f"(e.g. {common[:5].tolist()}); splits must be disjoint."
                )
    return out
