"""Checks that data are counts (or at least non-negative) before a model that assumes so.

Scanpy workflows keep several versions of the expression: raw counts (often a ``counts``
layer), log-normalised values (often ``adata.raw``) and scaled values (``X`` after
``sc.pp.scale``, with negative entries). A model that takes ``log1p`` of its input, or a count
likelihood, fed the wrong one trains on NaN or fails deep inside torch. :func:`check_counts`
fails early instead, and says which of the AnnData's matrices would fit.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

from ._batch import SparseBatch
from ._source import AnnDataSource

__all__ = ["check_counts"]

_MAX_VALUES = 1_000_000  # values sampled by a check: enough to tell counts from the rest
_ADVICE_ROWS = 256  # rows of each other matrix read to suggest one
RAW_OPTION = "use_raw=True (or layer='raw')"


def _values(data) -> np.ndarray:
    """The stored values of a matrix, batch or tensor, as a flat float64 sample."""
    if isinstance(data, SparseBatch):
        data = data.values
    if isinstance(data, torch.Tensor):
        if data.layout != torch.strided:
            data = data.coalesce().values() if data.is_sparse else data.values()
        data = data.detach().cpu().numpy()
    if sp.issparse(data):
        data = data.tocsr().data
    values = np.asarray(data).ravel()
    if not np.issubdtype(values.dtype, np.number) and values.dtype != bool:
        raise TypeError(f"check_counts needs numeric data, got dtype {values.dtype}.")
    return values[: 2 * _MAX_VALUES].astype(np.float64, copy=False)


def reader_values(reader, rows: np.ndarray, budget: int = 2 * _MAX_VALUES) -> np.ndarray:
    """The stored (non-zero) values of ``rows`` of a row reader, read 256 rows at a time (a
    dense row of 30,000 genes is 240 kB), until ``budget`` values are collected."""
    parts, total = [], 0
    for start in range(0, len(rows), _ADVICE_ROWS):
        # float32, the dtype batches are read in (its kernels are compiled); exact for counts
        pieces = reader.csr(rows[start : start + _ADVICE_ROWS], np.dtype(np.float32))
        parts.append(np.asarray(pieces.values))
        total += len(parts[-1])
        if total >= budget:
            break
    return np.concatenate(parts) if parts else np.empty(0)


def _problem(values: np.ndarray, integer: bool) -> str | None:
    """What makes ``values`` not counts, or None."""
    if values.size == 0:
        return None
    finite = np.isfinite(values)
    if not finite.all():
        return f"has {int((~finite).sum())} NaN or infinite values"
    low = float(values.min())
    if low < 0:
        return f"has negative values (min {low:.3g}): it looks scaled or centred"
    if integer:
        fractional = values != np.round(values)
        if fractional.any():
            example = float(values[fractional][0])
            return (
                f"has non-integer values (e.g. {example:.4g}; max {float(values.max()):.3g}): "
                "it looks normalised or log-transformed"
            )
    return None


def _candidates(
    source: AnnDataSource, integer: bool, skip: str | None
) -> tuple[list[str], list[str]]:
    """The options (``layer='counts'``, ``use_raw=True``) checked, and those that pass."""
    found, checked = [], []
    n = min(source.n_obs, _ADVICE_ROWS)
    rows = np.arange(n, dtype=np.int64)
    options = [(f"layer={key!r}", "layer", key) for key in source.layer_keys]
    if source.has_raw:
        options.append((RAW_OPTION, "raw", None))
    if skip != "X":
        options.append(("adata.X", "X", None))
    for option, kind, key in options:
        if option == skip:
            continue
        checked.append(option)
        try:
            reader = source.matrix_reader(kind, key)
            sample = reader_values(reader, rows, _MAX_VALUES)
        except (KeyError, ValueError, TypeError):
            continue
        if _problem(sample[:_MAX_VALUES], integer) is None:
            found.append(option)
    return checked, found


def check_counts(
    data,
    *,
    integer: bool = True,
    name: str = "the data",
    needed_by: str = "This model",
    source: ad.AnnData | None = None,
    current: str | None = None,
) -> None:
    """Raise a clear error unless ``data`` holds non-negative (integer) counts.

    Parameters
    ----------
    data
        A dense or sparse matrix, a tensor, a :class:`~torch_adata.SparseBatch`, or an
        AnnData (its ``X``). Up to two million stored values are checked.
    integer
        Require whole numbers (raw counts, e.g. for a count likelihood). ``False`` only
        requires finite non-negative values (e.g. before ``log1p``).
    name
        What ``data`` is, for the message (e.g. ``"adata.X"``).
    needed_by
        Who needs counts, for the message (e.g. ``"CountVAE"``).
    source
        The AnnData the data came from: its layers and ``.raw`` that pass the check are
        suggested in the message.
    current
        The option that selected ``data`` (``"layer='scaled'"``, ``"adata.X"``, or
        ``"use_raw=True (or layer='raw')"``), left out of the suggestions.

    Raises
    ------
    ValueError
        Negative, NaN/infinite or (with ``integer``) non-integer values; the message names
        the layers or ``.raw`` that would fit.
    """
    if isinstance(data, ad.AnnData):
        if source is None:
            source = data
        data = data.X
        name = "adata.X" if name == "the data" else name
    problem = _problem(_values(data), integer)
    if problem is None:
        return
    want = "non-negative integer counts" if integer else "non-negative values (counts or log1p)"
    message = f"{needed_by} needs {want}, but {name} {problem}."
    if source is not None:
        if isinstance(source, ad.AnnData):
            source = AnnDataSource(source)
        checked, fits = _candidates(source, integer, current)
        if fits:
            message += f" These hold {want}: {', '.join(fits)}; pass that instead."
        else:
            what = ", ".join(checked) if checked else "it has no layers and no .raw"
            message += (
                f" None of the AnnData's other matrices ({what}) does either: keep the counts "
                "before normalising, e.g. `adata.layers['counts'] = adata.X.copy()` before "
                "`sc.pp.normalize_total`, and pass layer='counts'."
            )
    raise ValueError(message)
