"""``TimeResolvedAnnDataset``: cells grouped by time point (and clone) for trajectory models."""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from . import samplers
from ._source import FieldKeyError
from .collection import SourceCollection
from .dataset import AnnDataset

Mode = Literal["populations", "initial", "lineage"]


# one number in a label, with the same words around it in every label: "day 2", "D10", "12h"
_TIME_LABEL = re.compile(r"^\s*([^\d\s+.-]*?)\s*([-+]?\d+(?:\.\d*)?|[-+]?\.\d+)\s*([^\d\s]*?)\s*$")


def _parse_times(labels) -> np.ndarray | None:
    """The numbers in labels such as ``"day 2"``, ``"D10"`` or ``"12h"``, or None when that is
    ambiguous: a label without exactly one number, different words around the numbers (``"12h"``
    next to ``"2d"``), or two labels with the same number."""
    values, units = [], set()
    for label in labels:
        match = _TIME_LABEL.match(str(label))
        if match is None:
            return None
        values.append(float(match[2]))
        units.add((match[1].lower(), match[3].lower()))
    if len(units) > 1 or len(set(values)) != len(values):
        return None
    return np.asarray(values, dtype=np.float64)


def _natural_order(labels) -> list:
    """Labels sorted with their numbers compared as numbers ("day 2" before "day 10")."""

    def key(label):
        parts = re.split(r"(\d+(?:\.\d+)?)", str(label))
        return [(0, float(p), "") if i % 2 else (1, 0.0, p.lower()) for i, p in enumerate(parts)]

    return sorted(labels, key=key)


def _time_values(column: pd.Series, key: str, ranks: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell float time values and the sorted distinct time points of an obs column.

    Numbers are used as they are; labels with one number each and the same unit (``"day 2"``,
    ``"D10"``, ``"12h"``) become that number, categorical or not; an ordered categorical whose
    labels do not parse (or any, with ``ranks``) becomes its category ranks 0, 1, 2...
    """
    categorical = isinstance(column.dtype, pd.CategoricalDtype)
    if ranks:
        if not (categorical and column.cat.ordered):
            raise TypeError(
                f"time_ranks=True needs obs column {key!r} to be an ordered categorical (the "
                f"order is the time); it is {column.dtype}. Drop time_ranks to use its values."
            )
        values = column.cat.codes.to_numpy().astype(np.float64)
        values[column.isna().to_numpy()] = np.nan
    elif categorical:
        categories = column.cat.categories
        parsed = _parse_times(categories)
        if parsed is not None:
            codes = column.cat.codes.to_numpy()
            values = np.where(codes < 0, np.nan, parsed[np.maximum(codes, 0)])
            if column.cat.ordered and (np.diff(parsed) <= 0).any():
                warnings.warn(
                    f"obs column {key!r} is an ordered categorical whose order "
                    f"{list(categories)} disagrees with the times in its labels "
                    f"{parsed.tolist()}; the times are used. Pass time_ranks=True to use the "
                    "order (as evenly spaced ranks) instead.",
                    UserWarning,
                    stacklevel=3,
                )
        elif column.cat.ordered:
            values = column.cat.codes.to_numpy().astype(np.float64)  # order = time
            values[column.isna().to_numpy()] = np.nan
        else:
            order = _natural_order(categories)
            raise TypeError(
                f"obs column {key!r} is categorical with labels that are not times "
                f"{list(categories[:5])} and no order. Make it numeric (e.g. days), or give "
                f"its order: `adata.obs[{key!r}] = adata.obs[{key!r}].cat.reorder_categories("
                f"{order[:10]}{'...' if len(order) > 10 else ''}, ordered=True)` (the "
                "categories, in time order; time points then count as evenly spaced)."
            )
    elif pd.api.types.is_numeric_dtype(column.dtype) and not pd.api.types.is_bool_dtype(column):
        values = column.to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        labels = pd.unique(column.dropna())
        parsed = _parse_times(labels)
        if parsed is None:
            order = _natural_order(pd.unique(column.dropna().astype(str)))
            raise TypeError(
                f"obs column {key!r} has values that are not times: {order[:5]}. Use numbers "
                "(e.g. days), labels with one number and the same unit each ('day 2', 'D10', "
                "'12h'), or an ordered categorical in time order: "
                f"`adata.obs[{key!r}] = pd.Categorical(adata.obs[{key!r}], categories="
                f"{order[:10]}{'...' if len(order) > 10 else ''}, ordered=True)`."
            )
        lookup = dict(zip(labels, parsed, strict=True))
        values = column.map(lookup).to_numpy(dtype=np.float64, na_value=np.nan)
    nan = np.isnan(values)
    if nan.any():
        raise ValueError(
            f"obs column {key!r} has {int(nan.sum())} missing (NaN) time values out of "
            f"{len(values)}. Drop those cells first: `adata = adata[adata.obs[{key!r}].notna()]`."
        )
    points = np.unique(values)
    if len(points) < 2:
        raise ValueError(
            f"obs column {key!r} has a single time point ({points.tolist()}); a time-resolved "
            "dataset needs at least two. Use AnnDataset for a single snapshot."
        )
    return values, points


def _clone_ids(clones, n_obs: int, policy: str, name: str) -> np.ndarray:
    """Clone id per cell (-1: none) from obs values or a cells x clones membership matrix."""
    if isinstance(clones, pd.Series):
        if isinstance(clones.dtype, pd.CategoricalDtype):
            ids = clones.cat.codes.to_numpy().astype(np.int64)
        elif pd.api.types.is_numeric_dtype(clones.dtype):
            filled = clones.to_numpy(dtype=np.float64, na_value=np.nan)
            ids = np.where(np.isnan(filled), -1, filled).astype(np.int64)
        else:
            codes, _ = pd.factorize(clones)
            ids = codes.astype(np.int64)
        return np.where(ids < 0, -1, ids)
    matrix = sp.csr_matrix(clones) if not sp.issparse(clones) else clones.tocsr()
    if matrix.shape[0] != n_obs:
        raise ValueError(
            f"The clone matrix {name!r} has {matrix.shape[0]} rows but the AnnData has {n_obs} "
            "cells; it must be cells x clones (transpose it if it is clones x cells)."
        )
    matrix = matrix.copy()
    matrix.eliminate_zeros()
    per_cell = np.diff(matrix.indptr)
    ids = np.full(n_obs, -1, dtype=np.int64)
    one = per_cell >= 1
    ids[one] = matrix.indices[matrix.indptr[:-1][one]]
    several = per_cell > 1
    if several.any():
        if policy == "raise":
            raise ValueError(
                f"{int(several.sum())} cells belong to several clones in {name!r}. Pass "
                "multi_clone='drop' to treat them as clone-less or multi_clone='first' to keep "
                "their first clone."
            )
        if policy == "drop":
            ids[several] = -1
        elif policy != "first":
            raise ValueError(f"multi_clone must be 'raise', 'drop' or 'first', got {policy!r}.")
    return ids


class TimeResolvedAnnDataset(AnnDataset):
    """Cells of a time course, sampled per time point or per clone.

    Every batch is a dict with the fields of :class:`~torch_adata.AnnDataset` plus

    ``"t"``
        ``(batch,)`` float32: each cell's time value.
    ``"t_eval"``
        ``(T',)`` float32: ``start_time`` followed by every later time point, the times a
        drift model integrates to.
    ``"clone"``
        ``(batch,)`` int64 clone ids (-1: none), when clones are known.

    The keys are the same whatever sampler reads the dataset: a loader of ``"initial"`` batches
    and one of ``"populations"`` batches over one dataset both get ``"t_eval"``, whatever the
    dataset's ``mode``. Which cells a batch holds is decided by the sampler from
    :meth:`batch_sampler`, one per mode:

    ``"populations"``
        ``n = cells_per_time`` cells from every time point: rows ``[k*n:(k+1)*n]`` are time
        point ``time_points[k]``. Without replacement within an epoch.
    ``"initial"``
        ``batch_size`` cells of the start time point.
    ``"lineage"``
        whole clones (or ``cells_per_clone`` sisters per time point), grouped by clone.

    ``dataset[idx]`` returns the requested cells with the same keys. ``"t_eval"`` is
    batch-level: one cell (``dataset[i]``, or a sample a DataLoader's ``collate_fn`` receives)
    carries the whole ``(T',)`` tensor, and collating keeps it once (shape ``(T',)``, not
    stacked); a ``collate_fn`` of your own should take it from the first sample.

    Parameters
    ----------
    adata
        AnnData (in memory, backed, or a view) or a path to an ``.h5ad`` file.
    time_key
        obs column with the time of each cell (required: no column name is assumed): numbers; labels with one number each and the
        same unit (``"day 2"``, ``"D10"``, ``"12h"``; categorical or strings), which become
        that number; or an ordered categorical whose labels are not times (then the category
        order is the time, 0, 1, 2...). For a collection whose files are one time point each:
        a mapping ``{source key or file name: time}``, e.g. ``{"day2.h5ad": 2, ...}`` (a
        column every file has works as well).
    mode
        The default sampling mode (see above).
    clone_key
        Clone assignment: an obs column (ids or labels; NaN or -1 = no clone) or an obsm
        cells x clones membership matrix such as LARRY's ``"X_clone"``.
    clones
        A cells x clones matrix given directly instead of ``clone_key``.
    multi_clone
        Cells in several clones: ``"raise"`` (default), ``"drop"`` (no clone) or ``"first"``.
    drop_single_time_clones
        Clones seen at only one time point carry no lineage across time. ``True`` treats their
        cells as clone-less, ``False`` keeps them; ``None`` (default) keeps them and warns when
        there are any. Either way their ids are in :attr:`single_time_clones`.
    start_time
        The start time point of ``mode="initial"`` (default: the earliest).
    time_ranks
        Use the category order of an ordered categorical ``time_key`` as evenly spaced time
        points 0, 1, 2... even when its labels hold times.
    **kwargs
        Fields and options of :class:`~torch_adata.AnnDataset` (``layer``, ``obs_keys``,
        ``obsm_keys``, ``X``, ``dtype``, ``sparse``, ``backed``, ...).

    Attributes
    ----------
    time_points
        The distinct time values, sorted (float64 array of length ``T``).
    time_index
        Each cell's time point as an index into ``time_points`` (int64).
    start_time
        The start time point of ``mode="initial"``.
    clone_ids
        Each cell's clone id (int64, -1 for none), or ``None`` without clones.
    clone_table
        With clones: a DataFrame indexed by clone id with ``n_cells`` and ``n_time_points``
        (after ``drop_single_time_clones``).
    single_time_clones
        With clones: the ids of the clones seen at a single time point (int64; dropped or
        kept per ``drop_single_time_clones``), or ``None`` without clones.
    """

    def __init__(
        self,
        adata,
        time_key: str | Mapping[str, float],
        *,
        mode: Mode = "populations",
        clone_key: str | None = None,
        clones: Any = None,
        multi_clone: Literal["raise", "drop", "first"] = "raise",
        drop_single_time_clones: bool | None = None,
        start_time: float | None = None,
        time_ranks: bool = False,
        **kwargs,
    ):
        super().__init__(adata, **kwargs)
        if isinstance(time_key, Mapping):
            column = self._source_times(time_key)
        else:
            obs = self.source.obs
            if time_key not in obs.columns:
                raise FieldKeyError(
                    f"Unknown time_key {time_key!r}. adata.obs has: {list(obs.columns)}."
                )
            self.source.require_obs(time_key)
            column = obs[time_key]
        if mode not in ("populations", "initial", "lineage"):
            raise ValueError(f"mode must be 'populations', 'initial' or 'lineage', got {mode!r}.")
        self.time_key = time_key
        self.mode = mode
        values, self.time_points = _time_values(
            column, time_key if isinstance(time_key, str) else "time_key", time_ranks
        )
        self.time_index = np.searchsorted(self.time_points, values).astype(np.int64)
        self._t = values.astype(np.float32)
        self.start_time = self.time_points[0] if start_time is None else float(start_time)
        if self.start_time not in self.time_points:
            raise ValueError(
                f"start_time={start_time} is not a time point; time points: "
                f"{self.time_points.tolist()}."
            )
        later = self.time_points[self.time_points >= self.start_time]
        self._t_eval = later.astype(np.float32)
        self.single_time_clones: np.ndarray | None = None
        self.clone_ids = self._read_clones(clone_key, clones, multi_clone, drop_single_time_clones)
        if mode == "lineage" and self.clone_ids is None:
            raise ValueError("mode='lineage' needs a clone assignment: pass clone_key= or clones=.")

    def _source_times(self, times: Mapping) -> pd.Series:
        """Each cell's time from ``{source key or file name: time}`` (a collection's files)."""
        source = self.source
        if not isinstance(source, SourceCollection):
            raise TypeError(
                "time_key as a mapping {source: time} gives each source of a collection one "
                "time point; this dataset reads a single AnnData. Pass the obs column that "
                "holds the times instead."
            )
        names = [
            (key, Path(path).name if path is not None else key)
            for key, path in zip(source.keys, source.paths, strict=True)
        ]
        known = {n for pair in names for n in pair}
        unknown = [k for k in times if k not in known]
        if unknown:
            raise ValueError(
                f"time_key names sources the collection does not have: {unknown[:10]}. Its "
                f"sources: {source.keys[:20]}."
            )
        per_source, lacking = [], []
        for key, file_name in names:
            value = times.get(key, times.get(file_name))
            if value is None:
                lacking.append(key)
            per_source.append(value)
        if lacking:
            raise ValueError(
                f"time_key gives no time for the sources {lacking[:10]}; give every source of "
                "the collection its time point."
            )
        lengths = np.diff(source.offsets)
        return pd.Series(np.repeat(np.asarray(per_source), lengths))

    def _read_clones(self, clone_key, clones, policy, drop_single):
        if clone_key is None and clones is None:
            return None
        if clone_key is not None and clones is not None:
            raise ValueError("Pass either clone_key= or clones=, not both.")
        if clone_key is not None:
            if clone_key in self.source.obs.columns:
                self.source.require_obs(clone_key, na="code")  # a cell without a clone: NaN
                clones = self.source.obs[clone_key]
            elif clone_key in self.source.obsm_keys:
                reader = self.source.matrix_reader("obsm", clone_key)
                clones = sp.csr_matrix(self._whole(reader))
            else:
                raise FieldKeyError(
                    f"Unknown clone_key {clone_key!r}: it is neither an obs column "
                    f"({list(self.source.obs.columns)}) nor an obsm key ({self.source.obsm_keys})."
                )
        ids = _clone_ids(clones, len(self), policy, clone_key or "clones")
        table = self._clone_table(ids)
        single = table.index[table["n_time_points"] < 2].to_numpy().astype(np.int64)
        self.single_time_clones = single
        if len(single) and drop_single is None:
            warnings.warn(
                f"{len(single)} of {len(table)} clones are seen at a single time point; they "
                "stay in lineage batches. Pass drop_single_time_clones=True to treat them as "
                "clone-less, or False to keep them without this warning (their ids are in "
                "dataset.single_time_clones).",
                UserWarning,
                stacklevel=3,
            )
        if len(single) and drop_single:
            ids = np.where(np.isin(ids, single), -1, ids)
            table = self._clone_table(ids)
        self.clone_table = table
        return ids

    @staticmethod
    def _whole(reader) -> sp.csr_matrix:
        """All rows of a (small) obsm matrix, as CSR."""
        return reader.csr(np.arange(reader.shape[0], dtype=np.int64), np.float32).to_scipy()

    def _clone_table(self, ids: np.ndarray) -> pd.DataFrame:
        has = ids >= 0
        df = pd.DataFrame({"clone": ids[has], "t": self.time_index[has]})
        table = df.groupby("clone").agg(n_cells=("t", "size"), n_time_points=("t", "nunique"))
        return table

    # -- batches --------------------------------------------------------------------------

    _batch_keys = frozenset({"t_eval"})

    def _gather(self, rows: np.ndarray) -> dict[str, Any]:
        """The fields of checked int64 positions, plus ``"t"``, ``"t_eval"`` and ``"clone"``."""
        batch = super()._gather(rows)
        if not isinstance(batch, dict):
            batch = {next(iter(self.fields)): batch}
        batch["t"] = torch.from_numpy(self._t[rows])
        if self.clone_ids is not None:
            batch["clone"] = torch.from_numpy(self.clone_ids[rows])
        batch["t_eval"] = torch.from_numpy(self._t_eval.copy())
        return batch

    def indices_at(self, time_point: float) -> np.ndarray:
        """Row positions of the cells at ``time_point``.

        Parameters
        ----------
        time_point
            One of the dataset's ``time_points`` (e.g. ``4`` for day 4).
        """
        hits = np.flatnonzero(self.time_points == time_point)
        if not len(hits):
            raise ValueError(
                f"{time_point} is not a time point; time points: {self.time_points.tolist()}."
            )
        return np.flatnonzero(self.time_index == hits[0]).astype(np.int64)

    @property
    def indices_by_time(self) -> dict[float, np.ndarray]:
        """``{time point: row positions}`` in time order."""
        return {float(t): self.indices_at(t) for t in self.time_points}

    def batch_sampler(
        self,
        *,
        indices: Sequence[int] | None = None,
        mode: Mode | None = None,
        batch_size: int = 256,
        cells_per_time: int = 128,
        clones_per_batch: int = 16,
        cells_per_clone: int | None = None,
        shuffle: bool = True,
        replacement: bool = False,
        num_batches: int | None = None,
        drop_last: bool = False,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> samplers.DistributedBatchSampler:
        """The batch sampler for ``mode`` (default: the dataset's), over ``indices`` (default all).

        The sampler yields row positions of this dataset, so ``DataLoader(dataset, sampler=s,
        batch_size=None, collate_fn=torch_adata.collate)`` gives one vectorised read per batch.
        ``indices`` restricts sampling to those rows (a split); the sampler then yields positions
        into ``indices``, as a ``torch.utils.data.Subset(dataset, indices)`` expects.

        Parameters
        ----------
        indices
            Rows to sample from (e.g. the train split); ``None`` for every cell.
        mode
            ``"populations"``, ``"initial"`` or ``"lineage"``; ``None`` for the dataset's
            ``mode``.
        batch_size
            ``"initial"``: cells of the start time point per batch.
        cells_per_time
            ``"populations"``: cells of every time point per batch (a batch has
            ``T * cells_per_time`` cells).
        clones_per_batch
            ``"lineage"``: clones per batch (at most).
        cells_per_clone
            ``"lineage"``: at most this many cells per clone and time point, drawn afresh every
            epoch; ``None`` for whole clones.
        shuffle
            ``"initial"``: shuffle every epoch (``False`` keeps row order).
        replacement
            ``"populations"``: let small time points repeat cells so the largest is seen whole
            (see :class:`~torch_adata.samplers.TimePointBatchSampler`).
        num_batches
            ``"populations"``: batches per epoch over all ranks (default: as many as the
            smallest time point allows without replacement).
        drop_last
            ``"initial"`` and ``"lineage"``: drop the remainder so every batch is full.
        seed
            Seed of the draws; epoch ``e`` draws from ``(seed, e)``.
        num_replicas, rank
            World size and rank for distributed training; ``None`` reads the initialised
            process group (else a single process).

        Returns
        -------
        torch_adata.samplers.DistributedBatchSampler
            A :class:`~torch_adata.samplers.TimePointBatchSampler` (populations),
            :class:`~torch_adata.samplers.UniformBatchSampler` (initial) or
            :class:`~torch_adata.samplers.ClonalBatchSampler` (lineage).
        """
        mode = mode or self.mode
        rows = (
            np.arange(len(self), dtype=np.int64)
            if indices is None
            else np.asarray(indices, dtype=np.int64)
        )
        local = np.arange(len(rows), dtype=np.int64)  # == rows when indices is None
        times = self.time_index[rows]
        common = {"seed": seed, "num_replicas": num_replicas, "rank": rank}
        if mode == "populations":
            groups = [local[times == k] for k in range(len(self.time_points))]
            groups = [g for g in groups if len(g)]
            return samplers.TimePointBatchSampler(
                groups, cells_per_time, replacement=replacement, num_batches=num_batches, **common
            )
        if mode == "initial":
            start = int(np.searchsorted(self.time_points, self.start_time))
            first = local[times == start]
            if not len(first):
                raise ValueError(
                    f"No cells at the start time point {self.start_time} in these rows."
                )
            return samplers.UniformBatchSampler(
                first, batch_size, shuffle=shuffle, drop_last=drop_last, **common
            )
        if mode == "lineage":
            if self.clone_ids is None:
                raise ValueError("Lineage sampling needs clones: pass clone_key= or clones=.")
            return samplers.ClonalBatchSampler(
                self.clone_ids[rows],
                times,
                clones_per_batch,
                cells_per_clone=cells_per_clone,
                drop_last=drop_last,
                **common,
            )
        raise ValueError(f"mode must be 'populations', 'initial' or 'lineage', got {mode!r}.")

    def __repr__(self) -> str:
        counts = np.bincount(self.time_index, minlength=len(self.time_points))
        lines = super().__repr__().splitlines()
        lines[0] += (
            f", {len(self.time_points)} time points of {self.time_key!r} (mode {self.mode!r})"
        )
        lines.append(
            "    time points: "
            + ", ".join(f"{t:g} ({c} cells)" for t, c in zip(self.time_points, counts, strict=True))
        )
        return "\n".join(lines)
