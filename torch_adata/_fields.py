"""What a batch carries: fields, their dtypes, and the label encoders of categorical columns.

A *field* turns row positions into one tensor of the batch:

- :class:`MatrixField`: rows of X, a layer or an obsm entry (through a
  :class:`~torch_adata._gather.RowReader`), dense or as a :class:`~torch_adata.SparseBatch`;
- :class:`ObsField`: values of one ``obs`` column, decoded once at construction into a numpy
  array (float32, int64, bool, or int64 category codes).

Categorical and string columns are encoded by a :class:`CategoryEncoder` fitted once on the
whole column, kept on the dataset, decodable, and reusable on another AnnData.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch

from ._batch import SparseBatch
from ._gather import RowReader
from ._transport import BatchArrays, empty_batch

_TORCH_TO_NUMPY = {
    torch.float16: np.float16,
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.int32: np.int32,
    torch.int64: np.int64,
    torch.bool: np.bool_,
}


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype matching a torch dtype (raises for unsupported ones)."""
    if dtype not in _TORCH_TO_NUMPY:
        raise TypeError(
            f"Unsupported dtype {dtype}; use one of {[str(d) for d in _TORCH_TO_NUMPY]}."
        )
    return np.dtype(_TORCH_TO_NUMPY[dtype])


class UnknownCategoryError(ValueError):
    """Labels a :class:`CategoryEncoder` was not fitted on, met while encoding a column.

    Raised by :meth:`CategoryEncoder.encode` (and so by datasets and data modules given
    ``encoders=`` or a checkpoint's encoders) when a column holds labels outside the
    encoder's categories. The message names the column, the unknown labels and the fixes.

    Parameters
    ----------
    message
        What went wrong and how to fix it.
    column
        The obs column being encoded.
    labels
        The unknown labels (up to ten).

    Attributes
    ----------
    column
        The obs column being encoded.
    labels
        The unknown labels (up to ten).
    """

    def __init__(self, message: str, column: str | None = None, labels: Sequence = ()):
        super().__init__(message)
        self.column = column
        self.labels = list(labels)

    def __reduce__(self):
        return type(self), (str(self), self.column, self.labels)


class CategoryEncoder:
    """Maps labels to int64 codes ``0..K-1`` and back.

    Fitted once on a whole column. The category order is the column's own order for a pandas
    ``Categorical`` and the sorted unique values otherwise. Missing values are an error unless
    ``na="code"``, which encodes them as ``-1`` (usable as ``ignore_index=-1`` in a loss).

    Parameters
    ----------
    categories
        The labels, in code order.
    """

    def __init__(self, categories: Sequence):
        self.categories = pd.Index(categories)
        if self.categories.has_duplicates:
            raise ValueError("CategoryEncoder categories must be unique.")

    @classmethod
    def fit(cls, values, name: str = "column") -> CategoryEncoder:
        """Fit on a column (Series, Categorical or array of labels).

        Parameters
        ----------
        values
            The whole column. A pandas ``Categorical`` keeps its category order (unused
            categories included); other labels are sorted.
        name
            Column name, used in error messages.
        """
        values = pd.Series(values)
        if isinstance(values.dtype, pd.CategoricalDtype):
            return cls(values.cat.categories)
        present = values.dropna().unique()
        try:
            return cls(np.sort(present))
        except TypeError as err:
            raise TypeError(
                f"obs column {name!r} mixes value types that cannot be ordered "
                f"({sorted({type(v).__name__ for v in present})}); make it a categorical "
                "(`adata.obs[key] = adata.obs[key].astype(str).astype('category')`)."
            ) from err

    def __len__(self) -> int:
        return len(self.categories)

    def __repr__(self) -> str:
        shown = list(self.categories[:5]) + (["..."] if len(self) > 5 else [])
        return f"CategoryEncoder({len(self)} categories: {shown})"

    def __eq__(self, other) -> bool:
        return isinstance(other, CategoryEncoder) and self.categories.equals(other.categories)

    def encode(
        self, values, *, na: Literal["raise", "code"] = "raise", name: str = "column"
    ) -> np.ndarray:
        """Labels to int64 codes. Unknown labels raise; missing values raise or become -1.

        Parameters
        ----------
        values
            Labels (Series, Categorical, array or list).
        na
            Missing values: ``"raise"`` (default) or ``"code"`` (encoded as -1).
        name
            Column name, used in error messages.

        Raises
        ------
        UnknownCategoryError
            ``values`` has labels outside the encoder's ``categories``.
        ValueError
            ``values`` has missing values and ``na="raise"``.
        """
        values = pd.Series(values)
        missing = values.isna().to_numpy()
        codes = self.categories.get_indexer(values.astype(object).where(~missing, None))
        codes = np.asarray(codes, dtype=np.int64)
        unknown = (codes < 0) & ~missing
        if unknown.any():
            labels = pd.unique(values[unknown].astype(str))
            raise UnknownCategoryError(
                f"obs column {name!r} has {int(unknown.sum())} values whose labels the encoder "
                f"has never seen: {list(labels[:10])}. Known labels: {list(self.categories[:20])}. "
                "Fit a new encoder (do not pass encoders=) or relabel those cells.",
                column=name,
                labels=labels[:10],
            )
        if missing.any() and na == "raise":
            raise ValueError(
                f"obs column {name!r} has {int(missing.sum())} missing (NaN) values out of "
                f"{len(values)}. Fix: drop those cells (`adata = adata[adata.obs[{name!r}]"
                ".notna()]`), fill them (`.cat.add_categories('unknown').fillna('unknown')`), "
                "or pass na='code' to encode them as -1."
            )
        return codes

    def decode(self, codes) -> np.ndarray:
        """Int codes (array or tensor) to labels; -1 decodes to ``None``.

        Parameters
        ----------
        codes
            Integer codes in ``[-1, len(self) - 1]``: a tensor (any device), array or list.
        """
        if isinstance(codes, torch.Tensor):
            codes = codes.detach().cpu().numpy()
        codes = np.asarray(codes, dtype=np.int64)
        if codes.size and (codes.max() >= len(self) or codes.min() < -1):
            raise ValueError(
                f"codes must lie in [-1, {len(self) - 1}]; got {codes.min()}..{codes.max()}."
            )
        labels = np.asarray(self.categories, dtype=object)[np.where(codes < 0, 0, codes)]
        labels[codes < 0] = None
        return labels

    def to_dict(self) -> dict:
        """A plain-python form (for checkpoints); inverse of :meth:`from_dict`."""
        return {"categories": self.categories.tolist()}

    @classmethod
    def from_dict(cls, state: dict) -> CategoryEncoder:
        """The encoder saved by :meth:`to_dict`.

        Parameters
        ----------
        state
            ``{"categories": [...]}`` as returned by :meth:`to_dict`.
        """
        return cls(state["categories"])


class MatrixField:
    """Rows of X, a layer or an obsm entry as a dense tensor or a :class:`SparseBatch`."""

    def __init__(self, name: str, reader: RowReader, dtype: torch.dtype, sparse: bool = False):
        if not (dtype.is_floating_point or dtype in (torch.int32, torch.int64)):
            raise TypeError(
                f"field {name!r}: dtype must be a float or int torch dtype, got {dtype}."
            )
        self.name = name
        self.reader = reader
        self.dtype = dtype
        self.sparse = sparse
        self._np_dtype = numpy_dtype(dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.reader.shape[1],)

    def take(self, rows: np.ndarray, in_worker: bool = False):
        """The rows' batch; ``in_worker``: made in a DataLoader worker (so in shared memory)."""
        if self.sparse:
            arrays = BatchArrays(in_worker)  # the kernel writes straight into the batch's tensors
            p = self.reader.csr(rows, self._np_dtype, arrays.empty)
            return SparseBatch(*map(arrays.tensor, (p.indptr, p.indices, p.values)), p.n_cols)
        shape = (len(rows), self.reader.shape[1])
        out = empty_batch(shape, self.dtype, in_worker=in_worker)
        self.reader.dense(rows, self._np_dtype, out.numpy())
        return out

    def describe(self) -> str:
        kind = "SparseBatch" if self.sparse else "Tensor"
        return f"{kind}[{self.dtype}] (batch, {self.shape[0]}) from {self.reader.describe()}"


class ObsField:
    """One ``obs`` column, converted once to a numpy array; a batch takes rows of it."""

    def __init__(self, name: str, values: np.ndarray, encoder: CategoryEncoder | None = None):
        self.name = name
        self.values = values
        self.encoder = encoder
        self.dtype = torch.from_numpy(np.empty(0, dtype=values.dtype)).dtype
        self.shape: tuple[int, ...] = ()

    @classmethod
    def from_column(
        cls,
        name: str,
        column: pd.Series,
        *,
        dtype: torch.dtype | None = None,
        encoder: CategoryEncoder | None = None,
        na: Literal["raise", "code"] = "raise",
    ) -> ObsField:
        """Convert a column: numeric -> float32, integer -> int64, bool -> bool, labels -> codes.

        ``dtype`` overrides the default for numeric and bool columns. Missing values raise
        unless ``na="code"``: labels then become code -1, floats stay NaN.
        """
        kind = _column_kind(name, column)
        if kind == "category":
            if dtype is not None and dtype not in (torch.int64, None):
                raise TypeError(
                    f"obs column {name!r} is categorical; it is encoded as int64 codes, "
                    f"so dtype={dtype} cannot apply. Drop the dtype override for it."
                )
            encoder = encoder if encoder is not None else CategoryEncoder.fit(column, name)
            return cls(name, encoder.encode(column, na=na, name=name), encoder)
        if encoder is not None:
            raise TypeError(f"obs column {name!r} is {kind}, not categorical: it takes no encoder.")
        if column.isna().any():
            n = int(column.isna().sum())
            if kind != "float" or (dtype is not None and not dtype.is_floating_point):
                raise ValueError(
                    f"obs column {name!r} has {n} missing values out of {len(column)}; a "
                    f"{kind} column cannot hold them. Fill or drop those cells first."
                )
            if na == "raise":
                raise ValueError(
                    f"obs column {name!r} has {n} missing (NaN) values out of {len(column)}; "
                    "they would reach the model as NaN. Fix: drop those cells "
                    f"(`adata = adata[adata.obs[{name!r}].notna()]`), fill them "
                    f"(`adata.obs[{name!r}] = adata.obs[{name!r}].fillna(0)`), or pass "
                    "na='code' to keep them as NaN in the batch."
                )
        default = {"float": torch.float32, "int": torch.int64, "bool": torch.bool}[kind]
        target = numpy_dtype(dtype or default)
        values = column.to_numpy(dtype=target if kind != "bool" or target == np.bool_ else float)
        return cls(name, np.ascontiguousarray(values.astype(target, copy=False)))

    def take(self, rows: np.ndarray, in_worker: bool = False) -> torch.Tensor:
        """The rows' values (small: never worth shared memory, wherever this runs)."""
        return torch.from_numpy(self.values[rows])

    def describe(self) -> str:
        what = f"codes of {len(self.encoder)} categories" if self.encoder is not None else "values"
        return f"Tensor[{self.dtype}] (batch,) of obs {self.name!r} {what}"


def _column_kind(name: str, column: pd.Series) -> str:
    dtype = column.dtype
    if isinstance(dtype, pd.CategoricalDtype) or pd.api.types.is_string_dtype(dtype):
        if pd.api.types.is_object_dtype(dtype):
            kinds = {type(v) for v in column.dropna()}
            if not kinds <= {str}:
                raise TypeError(
                    f"obs column {name!r} has dtype object holding {sorted(k.__name__ for k in kinds)}"
                    "; it is neither categorical nor numeric. Convert it, e.g. "
                    f"`adata.obs[{name!r}] = adata.obs[{name!r}].astype(str).astype('category')` "
                    "or `pd.to_numeric(...)`."
                )
        return "category"
    if pd.api.types.is_bool_dtype(dtype):
        return "bool"
    if pd.api.types.is_integer_dtype(dtype):
        return "int"
    if pd.api.types.is_float_dtype(dtype):
        return "float"
    raise TypeError(
        f"obs column {name!r} has dtype {dtype}, which cannot become a tensor. Use a numeric, "
        "bool, string or categorical column."
    )
