"""Gene alignment: the columns of new data put in the gene order a model was trained on.

A model trained on one AnnData takes its genes in that AnnData's ``var_names`` order. New data
(a query, another file) may hold the genes in another order, a subset or a superset of them.
:func:`align_genes` matches them by name (as scvi-tools' query preparation does): genes are
reordered, extra genes dropped, and missing genes either raise or, when asked
(``fill_missing=True``), are filled with zeros and counted. ``AnnDataset(..., var_names=genes)``
applies the alignment to every batch.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ._gather import CSRPieces, RowReader

__all__ = ["GeneAlignment", "align_genes"]


class GeneAlignment:
    """How the genes of some data map onto reference genes (made by :func:`align_genes`).

    Parameters
    ----------
    reference
        The reference genes, in the order batches give them.
    columns
        For each reference gene present in the data, its column in the data (int64), in
        reference order.
    targets
        For each entry of ``columns``, its position among the reference genes (int64).
    missing
        The reference genes absent from the data (zero-filled).
    n_extra
        Number of genes of the data that are not reference genes (dropped).
    """

    def __init__(self, reference: pd.Index, columns, targets, missing: pd.Index, n_extra: int):
        self.reference = reference
        self.columns = np.asarray(columns, dtype=np.int64)
        self.targets = np.asarray(targets, dtype=np.int64)
        self.missing = missing
        self.n_extra = n_extra

    @property
    def identity(self) -> bool:
        """Whether the data already have exactly the reference genes, in order."""
        n = len(self.reference)
        return len(self.missing) == 0 and np.array_equal(self.columns, np.arange(n))

    def __repr__(self) -> str:
        return (
            f"GeneAlignment({len(self.reference)} reference genes: {len(self.columns)} found, "
            f"{len(self.missing)} missing (zero-filled), {self.n_extra} extra dropped)"
        )


def align_genes(
    reference: Sequence[str],
    var_names: Sequence[str],
    *,
    fill_missing: bool = False,
    what: str = "the data",
) -> GeneAlignment:
    """Match the genes of some data to reference genes by name.

    Parameters
    ----------
    reference
        The genes a model was trained on, in its input order (e.g. the training dataset's
        ``var_names``, saved with a checkpoint).
    var_names
        The genes of the new data (``adata.var_names``, or ``adata.raw.var_names``).
    fill_missing
        Reference genes absent from the data: raise (``False``, default) or fill them with
        zeros (``True``; a ``UserWarning`` gives their number).
    what
        Name of the new data, for messages.

    Returns
    -------
    GeneAlignment
        The data columns to read, in reference order, and the genes missing.

    Raises
    ------
    ValueError
        Duplicate reference genes, duplicate data genes among those needed, or (without
        ``fill_missing``) missing genes; the message gives the numbers and the fix.
    """
    reference = pd.Index(reference).astype(str)
    data = pd.Index(var_names).astype(str)
    if reference.has_duplicates:
        dup = reference[reference.duplicated()].unique()
        raise ValueError(
            f"The reference genes repeat names ({list(dup[:5])}); they cannot be matched by "
            "name. Make them unique (`adata.var_names_make_unique()`) before training."
        )
    positions = data.get_indexer(reference) if data.is_unique else None
    if positions is None:
        needed = data[data.isin(reference)]
        dup = needed[needed.duplicated()].unique()
        if len(dup):
            raise ValueError(
                f"{what} has several columns for the genes {list(dup[:5])}; they cannot be "
                "matched by name. Make its var_names unique (`adata.var_names_make_unique()`) "
                "or drop the duplicates."
            )
        first = ~data.duplicated()
        kept = np.flatnonzero(first)
        positions = np.where(
            (idx := data[first].get_indexer(reference)) >= 0, kept[np.maximum(idx, 0)], -1
        )
    found = positions >= 0
    missing = reference[~found]
    n_extra = int((~data.isin(reference)).sum())
    if len(missing) and not fill_missing:
        raise ValueError(
            f"{len(missing)} of the {len(reference)} genes the model was trained on are missing "
            f"from {what} (e.g. {list(missing[:5])}; {int(found.sum())} found). Check that "
            "both use the same gene identifiers (symbols vs Ensembl ids, the same annotation), "
            "or pass fill_missing=True to fill the missing genes with zeros."
        )
    if len(missing):
        warnings.warn(
            f"{len(missing)} of the {len(reference)} reference genes are missing from {what} "
            f"and are filled with zeros (e.g. {list(missing[:5])}).",
            UserWarning,
            stacklevel=3,
        )
    return GeneAlignment(reference, positions[found], np.flatnonzero(found), missing, n_extra)


class FilledReader(RowReader):
    """Rows whose columns are spread into a wider matrix of zeros (missing genes)."""

    def __init__(self, base: RowReader, targets: np.ndarray, n_cols: int):
        self.base = base
        self.targets = targets
        self.shape = (base.shape[0], n_cols)
        self.engine = base.engine

    def dense(self, rows, dtype, out=None):
        block = self.base.dense(rows, dtype)
        if out is None:
            out = np.zeros((len(rows), self.shape[1]), dtype=dtype)
        else:
            out.fill(0)
        out[:, self.targets] = block
        return out

    def csr(self, rows, dtype, alloc=np.empty):
        pieces = self.base.csr(rows, dtype, alloc)
        pieces.indices[:] = self.targets[pieces.indices]  # in place: it may be the batch's memory
        return CSRPieces(pieces.indptr, pieces.indices, pieces.values, self.shape[1])

    def prepare(self):
        self.base.prepare()

    def prefetch(self, rows):
        self.base.prefetch(rows)

    def describe(self):
        n_missing = self.shape[1] - len(self.targets)
        return f"{self.base.describe()}, with {n_missing} missing genes as zeros"
