"""Where a dataset's rows live: an in-memory AnnData, a backed AnnData, a view, or a path.

:class:`AnnDataSource` gives every dataset the same small surface (number of cells, ``obs``,
variable names, and a :class:`~torch_adata._gather.RowReader` for X, a layer or an obsm entry)
whatever the storage. It never modifies the user's AnnData and never copies a matrix: views
are read through their parent with a row map.
"""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._compat import read_elem, view_parent
from ._gather import (
    MappedReader,
    RowReader,
    backed_reader,
    check_io_threads,
    memory_reader,
    read_whole,
)
from ._kernels import get_kernels

Source = ad.AnnData | str | os.PathLike


def _positions(index, n: int) -> np.ndarray | None:
    """A view's row or column index (slice, mask or positions) as int64 positions; None if all."""
    if isinstance(index, slice):
        if index == slice(None):
            return None
        return np.arange(n, dtype=np.int64)[index]
    index = np.asarray(index)
    if index.dtype == bool:
        return np.flatnonzero(index).astype(np.int64)
    return index.astype(np.int64)


def _check_h5ad(path: Path) -> None:
    import h5py

    if not path.exists():
        raise FileNotFoundError(
            f"No such file: '{path}'. Pass the path to an existing .h5ad file "
            "(written by anndata's `adata.write_h5ad`) or an AnnData object."
        )
    if path.is_dir():
        raise ValueError(f"'{path}' is a folder; pass the path to an .h5ad file.")
    if not h5py.is_hdf5(path):
        raise ValueError(
            f"'{path}' is not an .h5ad file (not HDF5). torch_adata reads .h5ad files written by "
            "anndata; convert other formats with anndata/scanpy first, e.g. "
            "`sc.read_10x_h5(...).write_h5ad(path)`."
        )
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise ValueError(
            f"'{path}' is an HDF5 file that cannot be opened, probably cut short or corrupt "
            f"(h5py: {err}). Download or write it again (`adata.write_h5ad(path)`)."
        ) from err
    with f:
        missing = [k for k in ("obs", "var") if k not in f]
        if missing:
            raise ValueError(
                f"'{path}' is an HDF5 file but not an .h5ad file: it has no {missing} group. "
                "Write it with `adata.write_h5ad(path)`."
            )


class AnnDataSource:
    """The rows of an AnnData, however stored.

    Parameters
    ----------
    data
        An AnnData (in memory or opened with ``backed="r"``; views allowed) or a path to an
        ``.h5ad`` file.
    backed
        For a path only: read matrices from the file on demand (``True``, default) or load
        into memory the matrices a dataset batches (``False``; other layers and obsm entries
        stay on disk, unlike ``anndata.read_h5ad``).
    engine
        Gather kernels: ``"auto"``, ``"numba"`` or ``"numpy"``.
    io_threads
        Reads in flight at once for a backed CSR batch not in the page cache (``None``: the
        most, 32; see :class:`~torch_adata._gather.BackedCSRReader`).
    """

    def __init__(
        self,
        data: Source,
        *,
        backed: bool = True,
        engine: str = "auto",
        io_threads: int | None = None,
    ):
        get_kernels(engine)  # a bad engine name (or numba missing) fails here, not at a read
        self.engine = engine
        self.io_threads = check_io_threads(io_threads)
        self.path: str | None = None
        self.adata: ad.AnnData | None = None
        if isinstance(data, (str, os.PathLike)):
            path = Path(data)
            _check_h5ad(path)
            self._init_from_file(path, load=not backed)
            return
        if not isinstance(data, ad.AnnData):
            raise TypeError(
                f"Expected an AnnData or a path to an .h5ad file, got {type(data).__name__}."
            )
        self._init_from_anndata(data)

    # -- construction ---------------------------------------------------------------------

    def _init_from_anndata(self, adata: ad.AnnData) -> None:
        self.adata = adata
        self._obs = adata.obs
        self._var_names = adata.var_names
        self.n_obs, self.n_vars = adata.n_obs, adata.n_vars
        if adata.is_view:
            root, oidx, vidx = view_parent(adata)
            self._root = root
            self._row_map = _positions(oidx, root.n_obs)
            self._cols = _positions(vidx, root.n_vars)
        else:
            self._root, self._row_map, self._cols = adata, None, None
        self._backed_path = str(self._root.filename) if self._root.isbacked else None
        self.layer_keys = list(self._root.layers.keys())
        self.obsm_keys = list(self._root.obsm.keys())
        raw = self._root.raw
        self.has_raw = raw is not None
        self._raw_var_names = raw.var_names if raw is not None else None

    def _init_from_file(self, path: Path, load: bool) -> None:
        import h5py

        self.path = str(path)
        self._load = load  # matrices into memory when a reader asks for them
        with h5py.File(path, "r") as f:
            # obs and var are read when first asked for: a dataset that batches no obs column
            # never holds them (about 25 MB at 100k cells, ten times that at 1M)
            self._obs, self._var_names = None, None
            self.n_obs, self.n_vars = _frame_length(f["obs"]), _frame_length(f["var"])
            self._encodings = {}
            for group in ("X", "raw/X", "layers", "obsm"):
                if group not in f:
                    continue
                items = [(group, f[group])] if group.endswith("X") else list(f[group].items())
                for name, elem in items:
                    key = name if group.endswith("X") else f"{group}/{name}"
                    enc = elem.attrs.get("encoding-type", "array")
                    # groups without a shape attribute (an obsm DataFrame) have no .shape
                    shape = (
                        elem.attrs["shape"]
                        if "shape" in elem.attrs
                        else getattr(elem, "shape", None)
                    )
                    shape = tuple(int(s) for s in shape) if shape is not None else None
                    self._encodings[key] = (str(enc), shape)
            self.layer_keys = list(f["layers"].keys()) if "layers" in f else []
            self.obsm_keys = list(f["obsm"].keys()) if "obsm" in f else []
            self.has_raw = "raw/X" in f
        self._raw_var_names = None  # read from raw/var when first asked for
        self._root, self._row_map, self._cols, self._backed_path = None, None, None, self.path
        if self.n_obs is None:  # a layout without an index array: read the tables now
            self.n_obs = len(self.obs)
        if self.n_vars is None:
            self.n_vars = len(self.var_names)

    def _read_frame(self, key: str) -> pd.DataFrame:
        import h5py

        with h5py.File(self.path, "r") as f:
            return read_elem(f[key])

    @property
    def obs(self) -> pd.DataFrame:
        """The cells' table (read from the file on first use for a path)."""
        if self._obs is None:
            self._obs = self._read_frame("obs")
        return self._obs

    @property
    def obs_names(self) -> pd.Index:
        return self.obs.index

    @property
    def var_names(self) -> pd.Index:
        if self._var_names is None:
            self._var_names = self._read_index("var")
        return self._var_names

    def _read_index(self, key: str) -> pd.Index:
        """The index of the table ``key`` of the file (its index array alone where the file
        names one: a var table's annotation columns are never read for its names)."""
        import h5py

        with h5py.File(self.path, "r") as f:
            elem = f[key]
            name = elem.attrs.get("_index")
            if isinstance(name, str) and name in elem:
                index = pd.Index(read_elem(elem[name]))
                index.name = None if name == "_index" else name
                return index
        return self._read_frame(key).index

    @property
    def raw_var_names(self) -> pd.Index:
        """The genes of ``adata.raw`` (the columns of its ``X``)."""
        if not self.has_raw:
            raise self.no_raw()
        if self._raw_var_names is None:
            self._raw_var_names = self._read_index("raw/var")
        return self._raw_var_names

    def require_obs(self, key: str, na: str = "raise") -> None:
        """Raise a ``KeyError`` listing the columns unless ``obs`` has the column ``key``."""
        if key not in self.obs.columns:
            raise FieldKeyError(
                f"Unknown obs column {key!r}. adata.obs has: {list(self.obs.columns)}."
            )

    def no_raw(self) -> FieldKeyError:
        """The error for asking for ``adata.raw`` when there is none."""
        return FieldKeyError(
            "The AnnData has no .raw (adata.raw is None), so use_raw=True / layer='raw' has "
            f"nothing to read. Its layers: {sorted(self.layer_keys) or 'none'}; batch one "
            "with layer='<name>', or X (the default)."
        )

    def __getstate__(self):
        state = self.__dict__.copy()
        if self.path is None and self._backed_path is not None:
            # A backed AnnData (and a view's obs, which refers to it) holds h5py handles, which
            # do not pickle. The readers reopen the file by path; only obs is needed from it.
            state["adata"] = state["_root"] = None
            state["_obs"] = pd.DataFrame(self.obs, copy=True)
        return state

    # -- readers ----------------------------------------------------------------------------

    def matrix_reader(
        self, kind: str, key: str | None = None, columns: np.ndarray | None = None
    ) -> RowReader:
        """A reader for ``X`` (kind ``"X"``), ``adata.raw.X`` (``"raw"``), a layer
        (``"layer"``) or an obsm entry (``"obsm"``).

        Raises a ``KeyError`` that lists the existing keys when ``key`` is unknown.
        obsm entries are read into memory once (they are small), also from a backed file.
        ``columns`` selects and orders the columns of X, raw or a layer (positions among the
        AnnData's variables, or the raw ones), e.g. to align genes.
        """
        if kind == "raw" and not self.has_raw:
            raise self.no_raw()
        if kind == "layer" and key not in self.layer_keys:
            raise _missing("layer", key, self.layer_keys, "adata.layers")
        if kind == "obsm" and key not in self.obsm_keys:
            raise _missing("obsm key", key, self.obsm_keys, "adata.obsm")
        cols = self._cols if kind in ("X", "layer") else None
        if columns is not None and kind != "obsm":
            cols = columns if cols is None else cols[columns]
        h5_key = {"X": "X", "raw": "raw/X", "layer": f"layers/{key}", "obsm": f"obsm/{key}"}[kind]
        if self.path is not None:  # opened from a path
            if h5_key not in self._encodings:
                raise ValueError(f"'{self.path}' has no matrix X; nothing to batch.")
            encoding, shape = self._encodings[h5_key]
            # obsm entries are small (a few to a few hundred columns): read once rather than
            # from disk every batch, and a DataFrame's columns are checked as in memory. With
            # backed=False only the matrices batched are loaded, not the whole file.
            if kind == "obsm" or self._load:
                return _memory_matrix_reader(
                    _read_matrix(self.path, h5_key, encoding, shape, self.engine),
                    kind,
                    key,
                    cols,
                    self.engine,
                )
            return backed_reader(
                self.path, h5_key, encoding, shape, cols, self.engine, io_threads=self.io_threads
            )
        root = self._root
        if kind in ("X", "raw") and root.isbacked:
            import h5py

            with h5py.File(self._backed_path, "r") as f:
                elem = f[h5_key]
                encoding = str(elem.attrs.get("encoding-type", "array"))
            shape = root.shape if kind == "X" else (root.n_obs, len(root.raw.var_names))
            reader = backed_reader(
                self._backed_path,
                h5_key,
                encoding,
                shape,
                cols,
                self.engine,
                io_threads=self.io_threads,
            )
        else:
            matrix = {
                "X": lambda: root.X,
                "raw": lambda: root.raw.X,
                "layer": lambda: root.layers[key],
                "obsm": lambda: root.obsm[key],
            }[kind]()
            if matrix is None:
                raise ValueError(
                    "adata.X is None. Pass layer='<name>' to batch a layer instead "
                    f"(layers: {self.layer_keys or 'none'})."
                )
            reader = _memory_matrix_reader(matrix, kind, key, cols, self.engine)
        if self._row_map is not None:
            reader = MappedReader(reader, self._row_map)
        return reader


def _frame_length(elem) -> int | None:
    """Rows of an obs/var table in an .h5ad file, from its index array without reading it."""
    index = elem.attrs.get("_index")
    if hasattr(elem, "keys") and isinstance(index, str) and index in elem:
        return int(elem[index].shape[0])
    return None


def _read_matrix(path: str, h5_key: str, encoding: str, shape, engine: str):
    """A matrix of an .h5ad file in memory: sparse ones array by array (see
    :func:`~torch_adata._gather.read_whole`), anything else through anndata."""
    import h5py

    with h5py.File(path, "r") as f:
        if encoding in ("csr_matrix", "csc_matrix"):
            group = f[h5_key]
            arrays = [read_whole(group[k], path, engine) for k in ("data", "indices", "indptr")]
            kind = sp.csr_matrix if encoding == "csr_matrix" else sp.csc_matrix
            return kind(tuple(arrays), shape=shape)
        return read_elem(f[h5_key])


def _memory_matrix_reader(matrix, kind: str, key, cols, engine: str) -> RowReader:
    """A reader over an in-memory matrix, after checking that it can become a tensor."""
    if isinstance(matrix, pd.DataFrame):
        if not all(pd.api.types.is_numeric_dtype(t) for t in matrix.dtypes):
            raise _non_numeric_obsm(key, "a DataFrame with non-numeric columns")
        matrix = matrix.to_numpy()
    if hasattr(matrix, "dtype") and not (
        np.issubdtype(matrix.dtype, np.number) or matrix.dtype == bool
    ):
        where = "obsm" if kind == "obsm" else kind
        raise TypeError(
            f"{where} {key or 'X'!r} has dtype {matrix.dtype}, which is not numeric. "
            "Only numeric matrices can be batched as tensors; encode it numerically first."
        )
    return memory_reader(matrix, cols, engine)


def _missing(what: str, key, existing: list[str], where: str) -> KeyError:
    return FieldKeyError(
        f"Unknown {what} {key!r}. {where} has: {sorted(existing) or 'nothing'}. "
        "Check the spelling, or add it to the AnnData first."
    )


def _non_numeric_obsm(key, what: str) -> TypeError:
    return TypeError(
        f"obsm {key!r} is {what}; only numeric obsm arrays (dense or sparse) can be batched. "
        "Convert it, e.g. adata.obsm[key] = adata.obsm[key].to_numpy(dtype='float32')."
    )


class FieldKeyError(KeyError):
    """A ``KeyError`` whose message reads as a sentence (``KeyError`` quotes its argument)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""
