"""Many AnnData objects or ``.h5ad`` files read as one: the sources of a collection.

``open_source`` turns what a user passes as data into a source: one AnnData or one
``.h5ad`` path stays an ``AnnDataSource`` (exactly as fast as
before); a list or tuple of paths and/or AnnData objects, a mapping ``{key: path or AnnData}``,
a folder (its ``*.h5ad`` files, sorted by name) or a glob pattern (matches sorted) becomes a
:class:`SourceCollection`, which has the same surface: its cells are the sources' cells one
source after the other, its genes are the sources' genes joined by name, its ``obs`` the
sources' ``obs`` concatenated with a column naming each cell's source.

Positions are global: position ``p`` is row ``p - offsets[s]`` of source ``s``, where
``offsets[s] <= p < offsets[s + 1]``; :meth:`SourceCollection.locate` maps positions back.
Files are read lazily, one handle per file and process, with the same coalesced reads as one
file. A file that changed on disk (size or modification time) or disappeared after the
collection was built raises :class:`SourceChangedError` (or ``FileNotFoundError``) before
any of its rows are returned.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from . import _kernels
from ._gather import BackedCSRReader, CSRPieces, CSRReader, RowReader
from ._kernels import get_kernels
from ._source import AnnDataSource, FieldKeyError, Source
from .genes import FilledReader

__all__ = [
    "ConcatReader",
    "SourceChangedError",
    "SourceCollection",
    "is_collection",
    "open_source",
]

# "inner", "outer" or a list of genes (str | Sequence: types.UnionType, which the docs render)
Join = str | Sequence[str]
Collection = Sequence[Source] | Mapping[str, Source] | str | os.PathLike
_GLOB_CHARS = frozenset("*?[")


class SourceChangedError(RuntimeError):
    """A file of a collection changed on disk after the collection was built.

    Its rows may no longer match the ``obs``, genes and layout read then, so nothing is read
    from it; build the dataset again to read the new file.
    """


def _is_glob(text: str) -> bool:
    return any(c in _GLOB_CHARS for c in text) and not Path(text).exists()


def is_collection(data) -> bool:
    """Whether ``data`` names several sources (see ``open_source``).

    Parameters
    ----------
    data
        What a dataset was given as data.
    """
    if isinstance(data, SourceCollection):
        return True
    if isinstance(data, (ad.AnnData, AnnDataSource)):
        return False
    if isinstance(data, (str, os.PathLike)):
        return Path(data).is_dir() or (isinstance(data, str) and _is_glob(data))
    return isinstance(data, (Mapping, list, tuple))


def open_source(
    data,
    *,
    backed: bool = True,
    engine: str = "auto",
    join: Join = "inner",
    source_key: str = "source",
    io_threads: int | None = None,
) -> AnnDataSource | SourceCollection:
    """The source of a dataset: one AnnData or file, or a collection of them.

    Parameters
    ----------
    data
        An AnnData (in memory, backed, or a view) or a path to an ``.h5ad`` file: an
        ``AnnDataSource``. A list or tuple of those, a mapping
        ``{key: AnnData or path}``, a folder (its ``*.h5ad`` files, sorted by name) or a glob
        pattern such as ``"atlas/*.h5ad"`` (matches sorted by name): a
        :class:`SourceCollection`. A source or collection already built is returned as is.
    backed, engine, io_threads
        As for :class:`~torch_adata.AnnDataset`.
    join, source_key
        For a collection, see :class:`SourceCollection` (unused for one source).
    """
    if isinstance(data, (AnnDataSource, SourceCollection)):
        return data
    if is_collection(data):
        return SourceCollection(
            data,
            backed=backed,
            engine=engine,
            join=join,
            source_key=source_key,
            io_threads=io_threads,
        )
    return AnnDataSource(data, backed=backed, engine=engine, io_threads=io_threads)


def _expand(data) -> tuple[list[str | None], list]:
    """``(keys given or None, items)`` of a collection argument (folders and globs listed)."""
    if isinstance(data, Mapping):
        keys = list(data.keys())
        bad = [k for k in keys if not isinstance(k, str)]
        if bad:
            raise TypeError(f"The keys of a mapping of sources must be strings, got {bad[:5]}.")
        return keys, list(data.values())
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if path.is_dir():
            files = sorted(p for p in path.glob("*.h5ad") if p.is_file())
            if not files:
                raise ValueError(
                    f"The folder '{path}' holds no .h5ad files. Pass a folder of .h5ad files "
                    "(written by `adata.write_h5ad`), a glob such as 'atlas/*.h5ad', or a list "
                    "of paths."
                )
            return [None] * len(files), [str(p) for p in files]
        matches = sorted(glob.glob(str(data)))
        if not matches:
            raise FileNotFoundError(
                f"The glob pattern '{data}' matches no file. Check the folder and the pattern "
                "(e.g. 'atlas/*.h5ad'), or pass a list of paths."
            )
        return [None] * len(matches), matches
    if isinstance(data, (list, tuple)):
        return [None] * len(data), list(data)
    raise TypeError(
        f"Expected a list, tuple or mapping of AnnData objects or .h5ad paths, a folder or a "
        f"glob pattern, got {type(data).__name__}."
    )


def _default_key(item, i: int) -> str:
    if isinstance(item, (str, os.PathLike)):
        return Path(item).name
    if isinstance(item, ad.AnnData) and item.isbacked and item.filename is not None:
        return Path(item.filename).name
    return f"adata{i}"


def _value_kind(part: pd.Series) -> str:
    """What labels a column holds: ``"string"``, ``"number"``, ``"bool"`` or ``"other"``."""
    dtype = part.dtype
    if isinstance(dtype, pd.CategoricalDtype):
        values = part.cat.categories
        dtype = values.dtype
    else:
        values = part
    if pd.api.types.is_bool_dtype(dtype):
        return "bool"
    if pd.api.types.is_numeric_dtype(dtype):
        return "number"
    if pd.api.types.is_string_dtype(dtype):
        if pd.api.types.is_object_dtype(dtype):
            kinds = {type(v) for v in pd.Series(values).dropna()}
            if kinds and not kinds <= {str}:
                return (
                    "number"
                    if all(issubclass(k, (int, float, np.number)) for k in kinds)
                    else "other"
                )
        return "string"
    return "other"


def _concat_column(name: str, parts: list[pd.Series | None], lengths: list[int]):
    """One obs column over all sources (``None``: a source lacks it), and a dtype clash or
    ``None``. Categorical (and string) parts become one categorical with the union of their
    categories (first seen first); a part missing is missing values."""
    present = [p for p in parts if p is not None]
    kinds = {_value_kind(p) for p in present}
    categorical = [isinstance(p.dtype, pd.CategoricalDtype) for p in present]
    if len(kinds) > 1:
        clash = {
            k: [i for i, p in enumerate(parts) if p is not None and _value_kind(p) == k]
            for k in kinds
        }
        values = pd.concat(
            [
                p.astype(object).reset_index(drop=True)
                if p is not None
                else pd.Series([None] * n, dtype=object)
                for p, n in zip(parts, lengths, strict=True)
            ],
            ignore_index=True,
        )
        return values.to_numpy(), clash
    if any(categorical) and kinds <= {"string", "number", "bool"}:
        cats_list = []
        for p in present:
            if isinstance(p.dtype, pd.CategoricalDtype):
                cats_list.append(p.cat.categories)
            else:
                cats_list.append(pd.Index(np.sort(p.dropna().unique())))
        first = cats_list[0]
        same = all(c.equals(first) for c in cats_list) and all(categorical)
        ordered = same and all(p.cat.ordered for p in present)
        categories = (
            first
            if same
            else pd.Index(pd.unique(np.concatenate([c.to_numpy() for c in cats_list])))
        )
        codes = []
        for p, n in zip(parts, lengths, strict=True):
            if p is None:
                codes.append(np.full(n, -1, dtype=np.int64))
            elif isinstance(p.dtype, pd.CategoricalDtype):
                remap = categories.get_indexer(p.cat.categories)
                c = p.cat.codes.to_numpy().astype(np.int64)
                codes.append(np.where(c < 0, -1, remap[np.maximum(c, 0)]))
            else:
                codes.append(categories.get_indexer(p.astype(object).where(p.notna(), None)))
        return pd.Categorical.from_codes(np.concatenate(codes), categories, ordered=ordered), None
    filled = [
        p.reset_index(drop=True) if p is not None else pd.Series(np.full(n, np.nan))
        for p, n in zip(parts, lengths, strict=True)
    ]
    return pd.concat(filled, ignore_index=True).to_numpy(), None


class SourceCollection:
    """Several AnnData objects or ``.h5ad`` files read as one source, one after the other.

    The surface of a dataset's single source, ``AnnDataSource`` (``n_obs``, ``n_vars``,
    ``obs``, ``obs_names``, ``var_names``, ``layer_keys``, ``obsm_keys``, ``has_raw``,
    ``raw_var_names``, ``matrix_reader``...), so datasets read it as they read one source.

    Parameters
    ----------
    data
        A list or tuple of AnnData objects (in memory, backed, views) and/or ``.h5ad`` paths, a
        mapping ``{key: AnnData or path}``, a folder (its ``*.h5ad`` files, sorted by name) or a
        glob pattern (its matches, sorted).
    backed
        For paths: read rows from the files on demand (``True``, default) or load the matrices
        a dataset batches into memory (``False``).
    engine
        Gather kernels: ``"auto"``, ``"numba"`` or ``"numpy"``.
    join
        How the sources' genes are matched (by ``var_names``): ``"inner"`` (default: the genes
        of every source, in the first source's order), ``"outer"`` (the genes of any source, in
        order of first appearance; a gene a source lacks reads as 0), or a list of genes, which
        fixes the columns and their order (a gene a source lacks reads as 0).
    source_key
        Name of the categorical ``obs`` column that holds each cell's source key.
    io_threads
        Backed files: reads in flight at once for a batch not in the page cache (see
        :class:`~torch_adata.AnnDataset`).

    Attributes
    ----------
    sources
        The sources, in order (``AnnDataSource``).
    keys
        Each source's name: the mapping's key, else the file name for a path (or a backed
        AnnData), else ``"adata<i>"`` for the ``i``-th item.
    offsets
        int64 array of length ``len(sources) + 1``: source ``s`` holds global positions
        ``offsets[s]:offsets[s + 1]``.
    paths
        Each source's file (``None`` for an AnnData in memory).
    """

    adata = None  # no single AnnData
    path = None  # no single file (see paths)

    def __init__(
        self,
        data: Collection,
        *,
        backed: bool = True,
        engine: str = "auto",
        join: Join = "inner",
        source_key: str = "source",
        io_threads: int | None = None,
    ):
        get_kernels(engine)
        self.engine = engine
        given, items = _expand(data)
        if not items:
            raise ValueError(
                "The collection is empty: pass at least one AnnData or .h5ad path (a list, a "
                "mapping, a folder of .h5ad files or a glob pattern)."
            )
        if not isinstance(source_key, str) or not source_key:
            raise ValueError(f"source_key must be a non-empty string, got {source_key!r}.")
        self.source_key = source_key
        keys = [
            k if k is not None else _default_key(item, i)
            for i, (k, item) in enumerate(zip(given, items, strict=True))
        ]
        seen: dict[str, int] = {}
        for i, k in enumerate(keys):
            if k in seen:
                raise ValueError(
                    f"Two sources are named {k!r} (items {seen[k]} and {i}): source names must "
                    "be unique. Pass a mapping {name: path or AnnData} to name them."
                )
            seen[k] = i
        self.keys: list[str] = keys
        sources = []
        for k, item in zip(keys, items, strict=True):
            if isinstance(item, AnnDataSource):
                sources.append(item)
                continue
            if not isinstance(item, (ad.AnnData, str, os.PathLike)):
                raise TypeError(
                    f"Source {k!r} is a {type(item).__name__}; a collection holds AnnData "
                    "objects and paths to .h5ad files."
                )
            sources.append(AnnDataSource(item, backed=backed, engine=engine, io_threads=io_threads))
        self.sources: list[AnnDataSource] = sources
        self.paths: list[str | None] = [s._backed_path for s in sources]
        # what each file was when read: checked before rows are read from it
        self._stamps = [_stamp(p) if p is not None else None for p in self.paths]
        lengths = np.array([s.n_obs for s in sources], dtype=np.int64)
        self.offsets = np.zeros(len(sources) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self.offsets[1:])
        self.n_obs = int(self.offsets[-1])
        self.join = join if isinstance(join, str) else list(join)
        if isinstance(join, str) and join not in ("inner", "outer"):
            raise ValueError(f"join must be 'inner', 'outer' or a list of genes, got {join!r}.")
        self._var_names = None
        self._raw_var_names = None
        self._var_names = self._join("var_names")
        self.n_vars = len(self._var_names)
        self.layer_keys = [
            k for k in sources[0].layer_keys if all(k in s.layer_keys for s in sources)
        ]
        self.obsm_keys = [k for k in sources[0].obsm_keys if all(k in s.obsm_keys for s in sources)]
        self.has_raw = all(s.has_raw for s in sources)
        self._obs: pd.DataFrame | None = None
        self._clashes: dict[str, dict[str, list[int]]] = {}
        self._missing: dict[str, list[int]] = {}

    # -- naming -----------------------------------------------------------------------------

    def _label(self, i: int) -> str:
        """How messages name source ``i``: its file, else its key."""
        return f"'{self.paths[i]}'" if self.paths[i] is not None else repr(self.keys[i])

    def _labels(self, indices, limit: int = 10) -> str:
        shown = ", ".join(self._label(i) for i in list(indices)[:limit])
        more = len(indices) - limit
        return shown + (f" and {more} more" if more > 0 else "")

    def __len__(self) -> int:
        return len(self.sources)

    def __repr__(self) -> str:
        return (
            f"SourceCollection of {len(self.sources)} sources, {self.n_obs} cells x "
            f"{self.n_vars} genes (join={self.join!r}): {self.keys[:5]}"
            + ("..." if len(self.keys) > 5 else "")
        )

    # -- positions --------------------------------------------------------------------------

    def locate(self, positions) -> tuple[np.ndarray, np.ndarray]:
        """Each global position's source index and its row within that source.

        Parameters
        ----------
        positions
            Global positions in ``[0, n_obs)`` (e.g. a batch's ``"index"``).

        Returns
        -------
        tuple of numpy.ndarray
            ``(source, row)``, both int64: ``sources[source[i]]`` holds the cell at
            ``positions[i]`` as its row ``row[i]``.
        """
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        if pos.size and (pos.min() < 0 or pos.max() >= self.n_obs):
            bad = pos.max() if pos.max() >= self.n_obs else pos.min()
            raise IndexError(
                f"Position {bad} is out of range for a collection of {self.n_obs} cells."
            )
        source = np.searchsorted(self.offsets, pos, side="right").astype(np.int64) - 1
        return source, pos - self.offsets[source]

    def source_of(self, positions) -> np.ndarray:
        """Each global position's source key (see :attr:`keys`).

        Parameters
        ----------
        positions
            Global positions in ``[0, n_obs)``.
        """
        source, _ = self.locate(positions)
        return np.asarray(self.keys, dtype=object)[source]

    # -- genes ------------------------------------------------------------------------------

    def _join(self, attr: str) -> pd.Index:
        """The joined genes of ``var_names`` or ``raw_var_names``, checked per source."""
        names = []
        distinct: list[pd.Index] = []
        for i, s in enumerate(self.sources):
            index = getattr(s, attr)
            same = next((d for d in distinct if d is index or d.equals(index)), None)
            if same is None:
                if index.has_duplicates:
                    dup = list(index[index.duplicated()].unique()[:5])
                    raise ValueError(
                        f"{self._label(i)} has duplicate {attr} ({dup}): genes are matched by "
                        "name across the files, so each must be unique. Fix that file: "
                        "`adata.var_names_make_unique()` (or drop the duplicates) and write it "
                        "again."
                    )
                distinct.append(index)
                same = index
            names.append(same)  # identical gene lists share one Index
        if attr == "var_names":
            for s, index in zip(self.sources, names, strict=True):
                if s.path is not None:  # only the shared copy is kept
                    s._var_names = index
        join = self.join
        if not isinstance(join, str):
            genes = pd.Index(join)
            if genes.has_duplicates:
                raise ValueError(
                    f"join= lists genes more than once: {list(genes[genes.duplicated()][:5])}."
                )
            nowhere = genes[~np.any([genes.isin(d) for d in distinct], axis=0)]
            if len(nowhere):
                raise ValueError(
                    f"{len(nowhere)} genes of join= are in none of the {len(self.sources)} "
                    f"sources (e.g. {list(nowhere[:5])}): check the gene identifiers (symbols "
                    "vs Ensembl ids)."
                )
            return genes
        if join == "outer":
            if len(distinct) == 1:
                return distinct[0]
            return pd.Index(pd.unique(np.concatenate([d.to_numpy() for d in distinct])))
        genes = distinct[0]
        for d in distinct[1:]:
            genes = genes[genes.isin(d)]
        if not len(genes):
            summary = "; ".join(
                f"{self._label(i)}: {len(n)} genes, e.g. {list(n[:3])}"
                for i, n in enumerate(names[:10])
            )
            raise ValueError(
                f"No gene is common to all {len(self.sources)} sources ({summary}), so an "
                "inner join leaves no column. Check that they use the same gene identifiers "
                "(symbols vs Ensembl ids), or pass join='outer' to read absent genes as 0."
            )
        return genes

    @property
    def var_names(self) -> pd.Index:
        """The joined genes, the columns of X and layers."""
        return self._var_names

    @property
    def raw_var_names(self) -> pd.Index:
        """The joined genes of ``adata.raw`` (same ``join`` as ``var_names``)."""
        if not self.has_raw:
            raise self.no_raw()
        if self._raw_var_names is None:
            self._raw_var_names = self._join("raw_var_names")
        return self._raw_var_names

    def no_raw(self) -> FieldKeyError:
        """The error for asking for ``adata.raw`` when a source has none.

        :meta private:
        """
        lacking = [i for i, s in enumerate(self.sources) if not s.has_raw]
        return FieldKeyError(
            f"{len(lacking)} of the {len(self.sources)} sources have no .raw "
            f"({self._labels(lacking)}), so use_raw=True / layer='raw' has nothing to read "
            f"there. Layers every source has: {self.layer_keys or 'none'}; batch one with "
            "layer='<name>', or X (the default)."
        )

    # -- obs --------------------------------------------------------------------------------

    @property
    def obs(self) -> pd.DataFrame:
        """The sources' ``obs`` one after the other, with the column ``source_key``.

        Columns a source lacks are missing values for its cells; categorical columns get the
        union of the sources' categories. Read from ``obs`` alone (never a matrix).
        """
        if self._obs is None:
            self._obs = self._concat_obs()
        return self._obs

    @property
    def obs_names(self) -> pd.Index:
        """The cells' names, source after source (they may repeat across sources)."""
        return self.obs.index

    def _concat_obs(self) -> pd.DataFrame:
        for i in range(len(self.sources)):
            self._check_file(i)
        frames = [s.obs for s in self.sources]
        for i, f in enumerate(frames):
            if self.source_key in f.columns:
                raise ValueError(
                    f"{self._label(i)} already has an obs column {self.source_key!r}, the name "
                    "of the column that records each cell's source. Pass another name, e.g. "
                    f"source_key='{self.source_key}_file'."
                )
        columns = list(dict.fromkeys(c for f in frames for c in f.columns))
        lengths = [len(f) for f in frames]
        data = {}
        for col in columns:
            parts = [f[col] if col in f.columns else None for f in frames]
            missing = [i for i, p in enumerate(parts) if p is None]
            if missing:
                self._missing[col] = missing
            data[col], clash = _concat_column(col, parts, lengths)
            if clash is not None:
                self._clashes[col] = clash
        codes = np.repeat(np.arange(len(frames)), lengths)
        data[self.source_key] = pd.Categorical.from_codes(codes, categories=pd.Index(self.keys))
        index = (
            frames[0].index.append([f.index for f in frames[1:]])
            if len(frames) > 1
            else frames[0].index
        )
        obs = pd.DataFrame(data, index=index)
        for s in self.sources:
            if s.path is not None:  # read again from the file if asked; not held twice
                s._obs = None
        return obs

    def require_obs(self, key: str, na: str = "raise") -> None:
        """Check that the obs column ``key`` can be batched from every source.

        Raises ``KeyError`` for a column no source has, or (unless ``na="code"``) one that
        some sources lack, and ``TypeError`` for a column whose values are strings in some
        sources and numbers in others. Used by datasets.

        :meta private:
        """
        obs = self.obs
        if key not in obs.columns:
            common = [c for c in obs.columns if c not in self._missing]
            raise FieldKeyError(
                f"Unknown obs column {key!r}: no source has it. Columns every source has: {common}."
            )
        missing = self._missing.get(key, [])
        if missing and na != "code":
            raise FieldKeyError(
                f"obs column {key!r} is missing from {len(missing)} of the "
                f"{len(self.sources)} sources ({self._labels(missing)}). Add it to those "
                "files, or pass na='code' to batch their cells as missing values (label code "
                "-1, NaN for numbers)."
            )
        if key in self._clashes:
            clash = self._clashes[key]
            where = "; ".join(
                f"{kind} in {self._labels(idx, 5)}" for kind, idx in sorted(clash.items())
            )
            raise TypeError(
                f"obs column {key!r} holds values of different types across the sources "
                f"({where}), so its labels cannot be matched. Make it the same type in every "
                f"file, e.g. `adata.obs[{key!r}] = adata.obs[{key!r}].astype(str)` and write "
                "the file again."
            )

    # -- readers ----------------------------------------------------------------------------

    def _check_file(self, i: int) -> None:
        stamp = self._stamps[i]
        if stamp is not None:
            _check_stamp(self.paths[i], stamp)

    def _gene_columns(self, s: AnnDataSource, kind: str, columns: np.ndarray | None):
        """Columns of source ``s`` for the collection's genes (or ``columns`` of them):
        ``(positions to read or None, targets or None, width)``."""
        genes = self.raw_var_names if kind == "raw" else self.var_names
        if columns is not None:
            genes = genes[np.asarray(columns, dtype=np.int64)]
        own = s.raw_var_names if kind == "raw" else s.var_names
        if own is genes or (len(own) == len(genes) and own.equals(genes)):
            return None, None, len(genes)
        pos = own.get_indexer(genes)
        found = pos >= 0
        if found.all():
            return pos.astype(np.int64), None, len(genes)
        return pos[found].astype(np.int64), np.flatnonzero(found).astype(np.int64), len(genes)

    def matrix_reader(
        self, kind: str, key: str | None = None, columns: np.ndarray | None = None
    ) -> RowReader:
        """A reader over ``X``, ``raw``, a layer or an obsm entry of every source, in order.

        As ``AnnDataSource.matrix_reader``; ``columns`` are positions among the joined genes.
        Genes a source lacks read as 0. Used by datasets.

        :meta private:
        """
        if kind == "raw" and not self.has_raw:
            raise self.no_raw()
        if kind in ("layer", "obsm"):
            where = "layers" if kind == "layer" else "obsm"
            have = [key in (s.layer_keys if kind == "layer" else s.obsm_keys) for s in self.sources]
            if not any(have):
                raise FieldKeyError(
                    f"Unknown {'layer' if kind == 'layer' else 'obsm key'} {key!r}: no source "
                    f"has it. Every source has: {self.layer_keys if kind == 'layer' else self.obsm_keys or 'nothing'}."
                )
            if not all(have):
                lacking = [i for i, h in enumerate(have) if not h]
                raise FieldKeyError(
                    f"{where}[{key!r}] is missing from {len(lacking)} of the "
                    f"{len(self.sources)} sources ({self._labels(lacking)}); a field must exist "
                    f"in every source. {where.capitalize()} every source has: "
                    f"{(self.layer_keys if kind == 'layer' else self.obsm_keys) or 'none'}."
                )
        readers = []
        for i, s in enumerate(self.sources):
            self._check_file(i)
            if kind == "obsm":
                readers.append(s.matrix_reader(kind, key))
                continue
            cols, targets, width = self._gene_columns(s, kind, columns)
            try:
                reader = s.matrix_reader(kind, key, columns=cols)
            except (ValueError, TypeError) as err:
                raise type(err)(f"Source {self._label(i)}: {err}") from err
            if targets is not None:
                reader = FilledReader(reader, targets, width)
            readers.append(reader)
        if kind == "obsm":
            widths = {r.shape[1] for r in readers}
            if len(widths) > 1:
                by = "; ".join(
                    f"{self._label(i)}: {r.shape[1]}" for i, r in enumerate(readers[:10])
                )
                raise ValueError(
                    f"obsm[{key!r}] has a different number of columns across the sources "
                    f"({by}); it can only be batched where every source has the same width."
                )
        if len(readers) == 1:
            return _single(readers[0], self)
        return ConcatReader(readers, self.offsets, self.paths, self._stamps, self.engine)


def _single(reader: RowReader, collection: SourceCollection) -> RowReader:
    """One source's reader, still checked against its file."""
    return ConcatReader(
        [reader], collection.offsets, collection.paths, collection._stamps, collection.engine
    )


def _stamp(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return (st.st_size, st.st_mtime_ns)


def _check_stamp(path: str, stamp: tuple[int, int]) -> None:
    """Raise unless the file at ``path`` still has the size and modification time ``stamp``."""
    try:
        now = _stamp(path)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"'{path}' is gone: it was part of the collection when the dataset was built. "
            "Put it back, or build the dataset again without it."
        ) from None
    if now != stamp:
        raise SourceChangedError(
            f"'{path}' changed on disk after the dataset was built (size {stamp[0]} -> "
            f"{now[0]} bytes, modified at {now[1]} instead of {stamp[1]} ns): its rows may no "
            "longer match the obs and genes read then, so none are read. Build the dataset "
            "again to read the new file."
        )


def _wrapped(reader: RowReader | None):
    """``reader`` and the readers it wraps (``.base``), outermost first."""
    while reader is not None:
        yield reader
        reader = getattr(reader, "base", None)


def _file_reader(reader: RowReader) -> bool:
    """Whether ``reader`` reads its rows from a file at every batch (a backed matrix)."""
    return any(hasattr(r, "file") for r in _wrapped(reader))


def _work_dtype(dtype) -> np.dtype:
    """The dtype pieces are gathered in before the batch's: float32 for float16 (the compiled
    kernels compute float16 batches in float32)."""
    dtype = np.dtype(dtype)
    return np.dtype(np.float32) if dtype == np.float16 else dtype


def _stores_csr(reader: RowReader) -> bool:
    """Whether ``reader`` gathers from CSR arrays (in memory or in a file)."""
    return any(isinstance(r, (BackedCSRReader, CSRReader)) for r in _wrapped(reader))


class _DirectFiles:
    """Backed CSR sources read directly (uncompressed, ``pread``) as one: a batch's rows of
    every file are read by two compiled calls (values, column indices), not one reader call
    per file.

    Built per process from the sources' own layouts (inherited by forked workers). Holds each
    global row's start and length in its file (16 bytes per cell), and every file's chunk
    bases; descriptors are the sources' own.
    """

    def __init__(self, readers: list[BackedCSRReader], offsets: np.ndarray):
        self.readers = readers
        self.offsets = offsets
        layouts = [r.layout for r in readers]  # read here, or inherited from the parent
        self.row_start = np.concatenate([lay.indptr[:-1] for lay in layouts])
        self.row_length = np.concatenate([np.diff(lay.indptr) for lay in layouts])
        self.arrays = []
        for a in (0, 1):  # data, indices
            bases = [lay.layouts[a][0] for lay in layouts]
            first = np.zeros(len(bases) + 1, dtype=np.int64)
            np.cumsum([len(b) for b in bases], out=first[1:])
            lens = np.array([lay.layouts[a][1] for lay in layouts], dtype=np.int64)
            self.arrays.append((np.concatenate(bases).astype(np.int64), first, lens))
        self.pid = -1
        self.fds = None
        self.dtypes = None

    @staticmethod
    def build(readers: list[RowReader], offsets: np.ndarray) -> _DirectFiles | None:
        """The set for ``readers``, or ``None`` unless every one is a plain direct-read
        backed CSR reader (no column selection) with the same value and index dtypes."""
        if not _kernels.MULTI_FILE_READS:
            return None
        if not all(type(r) is BackedCSRReader and r.col_map is None for r in readers):
            return None
        if any(r.mode != "direct" for r in readers):
            return None
        states = [r._open() for r in readers]
        if len({(st.data.dtype, st.indices.dtype) for st in states}) != 1:
            return None
        return _DirectFiles(readers, offsets)

    def _handles(self) -> None:
        """This process's descriptors (the sources' own, opened here if need be)."""
        if self.pid != os.getpid():
            states = [r._open() for r in self.readers]
            self.fds = np.array([st.descriptor.fd for st in states], dtype=np.int32)
            self.dtypes = (states[0].data.dtype, states[0].indices.dtype)
            self.pid = os.getpid()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["pid"], state["fds"] = -1, None
        return state

    def read(self, rows: np.ndarray):
        """CSR pieces of the distinct rows and each requested row's position among them."""
        self._handles()
        uniq, inverse = np.unique(rows, return_inverse=True)
        source = np.searchsorted(self.offsets, uniq, side="right") - 1
        starts = self.row_start[uniq]
        lengths = self.row_length[uniq]
        indptr = np.zeros(len(uniq) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        nnz = int(indptr[-1])
        data = np.empty(nnz, dtype=self.dtypes[0])
        indices = np.empty(nnz, dtype=self.dtypes[1])
        if nnz:
            # rows stored one after the other in the same file: one read
            first = np.flatnonzero(
                np.r_[
                    True, (source[1:] != source[:-1]) | (starts[1:] != starts[:-1] + lengths[:-1])
                ]
            )
            run_source = source[first]
            run_starts = starts[first]
            run_lengths = np.add.reduceat(lengths, first)
            for (bases, base_first, chunk_lens), out in zip(
                self.arrays, (data, indices), strict=True
            ):
                _kernels.read_ranges_multi(
                    self.fds,
                    bases,
                    base_first,
                    chunk_lens,
                    run_source,
                    run_starts,
                    run_lengths,
                    indptr[first],
                    out,
                )
        return indptr, indices, data, inverse.reshape(-1).astype(np.int64)


class _MemoryCSR:
    """In-memory CSR sources gathered as one: a batch's rows of every source are written by
    one compiled call straight into the dense batch (or its CSR pieces), in the batch's order;
    nothing is stacked or copied per source.

    The sources' arrays are reached by address (``_kernels.source_table``), kept alive here; the table is made again in each process (a forked or spawned worker's
    arrays may lie elsewhere). A source whose genes are mapped (an inner join over different
    genes, or genes a source lacks) has a column map: its reader's own, or one composed once
    from it and the filled columns (a few bytes per gene of that source).
    """

    def __init__(self, parts: list[tuple]):
        self.parts = parts  # (indptr, indices, data, col_map or None) per source
        first = parts[0]
        self.likes = tuple(a[:0] for a in first[:3])
        self.pid = -1
        self.table = None

    @staticmethod
    def build(readers: list[RowReader]) -> _MemoryCSR | None:
        """The set for ``readers``, or ``None`` unless every one is an in-memory
        ``CSRReader`` (alone, or under a ``FilledReader`` for missing genes) and their
        ``indptr``, ``indices`` and ``data`` have the same dtypes in every source."""
        if not _kernels.MEMORY_SOURCES:
            return None
        parts = []
        for r in readers:
            base, targets = r, None
            if type(r) is FilledReader:
                base, targets = r.base, r.targets
            if type(base) is not CSRReader:
                return None
            col_map = base.col_map
            if targets is not None:
                targets = np.asarray(targets, dtype=np.int64)
                if col_map is None:
                    col_map = targets
                else:
                    col_map = np.where(col_map >= 0, targets[np.maximum(col_map, 0)], -1)
            arrays = (base.indptr, base.indices, base.data)
            if any(a.ndim != 1 or not a.flags.c_contiguous for a in arrays):
                return None
            cm = None if col_map is None else np.ascontiguousarray(col_map, dtype=np.int64)
            parts.append((*arrays, cm))
        if len({tuple(a.dtype for a in p[:3]) for p in parts}) != 1:
            return None
        memory = _MemoryCSR(parts)
        _kernels.warm_sources(memory._table(), memory.likes)  # before workers fork
        return memory

    def _table(self) -> np.ndarray:
        if self.pid != os.getpid():
            self.table = _kernels.source_table(self.parts)
            self.pid = os.getpid()
        return self.table

    def __getstate__(self):
        state = self.__dict__.copy()
        state["pid"], state["table"] = -1, None
        return state

    def dense(self, source: np.ndarray, local: np.ndarray, out: np.ndarray) -> np.ndarray:
        return _kernels.sources_to_dense(self._table(), self.likes, source, local, out)

    def csr(self, source, local, dtype, n_cols: int, alloc: Callable) -> CSRPieces:
        p, i, v = _kernels.sources_to_csr(
            self._table(), self.likes, source, local, np.dtype(dtype), n_cols, alloc
        )
        return CSRPieces(p, i, v, n_cols)


class ConcatReader(RowReader):
    """Rows of several readers stacked one after the other (a collection's matrix).

    Global row ``p`` is row ``p - offsets[s]`` of reader ``s``. A batch whose rows all lie in
    one source passes through to its reader without a copy. A batch over several sources is
    read in one pass where the sources allow it (numba): backed CSR files with the same genes
    and dtypes by two compiled reads over all of them (:class:`_DirectFiles`), in-memory CSR
    matrices of the same dtypes by one compiled gather into the batch (:class:`_MemoryCSR`).
    Otherwise it is split by source; each source's rows are read by its own reader (a backed
    file with its coalesced reads) and put back in the requested order: dense rows straight
    into ``out`` where a source's rows are contiguous in the batch, CSR pieces reassembled
    into arrays made with ``alloc``.

    Before reading from a file, its size and modification time are checked against those
    recorded when the collection was built: one ``stat`` of its path per file a batch
    touches. Only the path shows a file replaced or removed (the open descriptors keep the
    old one), so the check stays per batch and per path.
    """

    def __init__(
        self,
        readers: list[RowReader],
        offsets: np.ndarray,
        paths: list[str | None],
        stamps: list[tuple[int, int] | None],
        engine: str = "auto",
    ):
        self.readers = readers
        self.offsets = np.asarray(offsets, dtype=np.int64)
        widths = {r.shape[1] for r in readers}
        if len(widths) != 1:
            raise ValueError(f"Readers of different widths cannot be stacked: {sorted(widths)}.")
        self.shape = (int(self.offsets[-1]), widths.pop())
        self.engine = engine
        # stored sparse everywhere: batches are gathered from every source's CSR pieces
        self.sparse = all(_stores_csr(r) for r in readers)
        self._direct: _DirectFiles | None = None  # set by prepare() where it applies
        self._memory: _MemoryCSR | None = None  # likewise
        # a file is checked only where rows are read from it at every batch
        self.checks = [
            (p, st) if st is not None and _file_reader(r) else None
            for r, p, st in zip(readers, paths, stamps, strict=True)
        ]

    def _split(self, rows: np.ndarray):
        """``(source, local rows)`` of every row, and the sources touched (ascending)."""
        source = np.searchsorted(self.offsets, rows, side="right") - 1
        return source, rows - self.offsets[source]

    def _check(self, s: int) -> None:
        check = self.checks[s]
        if check is not None:
            try:  # about 3 us per file a batch touches
                st = os.stat(check[0])
                if (st.st_size, st.st_mtime_ns) == check[1]:
                    return
            except OSError:
                pass
            _check_stamp(*check)  # raises, with the message

    def _groups(self, rows: np.ndarray):
        """Split a batch over several sources: ``(order, [(source, batch positions)],
        local rows)``, the files touched checked first."""
        source, local = self._split(rows)
        touched = self._check_sources(source)
        order = np.argsort(source, kind="stable")
        bounds = [*np.searchsorted(source[order], touched).tolist(), len(rows)]
        groups = [(s, order[bounds[j] : bounds[j + 1]]) for j, s in enumerate(touched.tolist())]
        return order, groups, local

    def _one_source(self, rows: np.ndarray):
        """``(s, local rows, sources)``: ``s`` the one source every row lies in, or -1; each
        row's row in its source, and its source (``None`` where there is one source)."""
        if len(self.readers) == 1 or len(rows) == 0:
            return 0, rows, None
        source, local = self._split(rows)
        first = int(source[0])
        return (first if (source == first).all() else -1), local, source

    def _stacked(self, rows: np.ndarray, dtype):
        """The rows as CSR pieces stacked source after source (each source's rows read in one
        call), and for each requested row its row among them."""
        order, groups, local = self._groups(rows)
        pieces = [self.readers[s].csr(local[idx], dtype) for s, idx in groups]
        lengths = np.concatenate([np.diff(p.indptr) for p in pieces])
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        indices = np.concatenate([p.indices for p in pieces])
        values = np.concatenate([p.values for p in pieces])
        inverse = np.empty(len(rows), dtype=np.int64)
        inverse[order] = np.arange(len(rows), dtype=np.int64)
        return indptr, indices, values, inverse

    def dense(self, rows, dtype, out=None):
        rows = np.asarray(rows, dtype=np.int64)
        one, local, source = self._one_source(rows)
        if one >= 0:
            self._check(one)
            return self.readers[one].dense(local, dtype, out)
        if out is None:
            out = np.empty((len(rows), self.shape[1]), dtype=dtype)
        if self._memory is not None:  # every source's rows in one compiled call, into out
            return self._memory.dense(source, local, out)
        if self._direct is not None:  # every file's rows in two compiled reads
            self._check_sources(source)
            indptr, indices, values, inverse = self._direct.read(rows)
            return self.kernels.csr_to_dense(indptr, indices, values, inverse, None, out)
        if self.sparse:
            # one gather of every source's stored values straight into ``out``, in the
            # requested order: no per-source dense block, no copy of it into ``out``
            indptr, indices, values, inverse = self._stacked(rows, _work_dtype(out.dtype))
            return self.kernels.csr_to_dense(indptr, indices, values, inverse, None, out)
        _, groups, local = self._groups(rows)
        for s, idx in groups:
            lo, hi = int(idx[0]), int(idx[-1]) + 1
            if hi - lo == len(idx):  # contiguous in the batch: read straight into out
                self.readers[s].dense(local[lo:hi], dtype, out[lo:hi])
            else:
                out[idx] = self.readers[s].dense(local[idx], dtype)
        return out

    def csr(self, rows, dtype, alloc: Callable = np.empty) -> CSRPieces:
        rows = np.asarray(rows, dtype=np.int64)
        one, local, source = self._one_source(rows)
        if one >= 0:
            self._check(one)
            return self.readers[one].csr(local, dtype, alloc)
        if self._memory is not None:
            return self._memory.csr(source, local, dtype, self.shape[1], alloc)
        if self._direct is not None:
            self._check_sources(source)
            indptr, indices, values, inverse = self._direct.read(rows)
        else:
            indptr, indices, values, inverse = self._stacked(rows, _work_dtype(dtype))
        p, i, v = self.kernels.csr_to_csr(
            indptr, indices, values, inverse, None, np.dtype(dtype), self.shape[1], alloc
        )
        return CSRPieces(p, i, v, self.shape[1])

    def prefetch(self, rows) -> None:
        """Announce rows to come to every source reader that can read ahead."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return
        _, groups, local = self._groups(rows)
        for s, idx in groups:
            ahead = getattr(self.readers[s], "prefetch", None)
            if ahead is not None:
                ahead(np.sort(local[idx]))

    def _check_sources(self, source: np.ndarray) -> np.ndarray:
        """Check each file of ``source`` (sources of a batch's rows) once against what it was:
        one ``stat`` per file touched, 2-7 us each (a uniform batch of 256 over 100 files
        touches 92). Returns the sources touched, ascending."""
        touched = np.unique(source)
        for s in touched.tolist():
            self._check(s)
        return touched

    def prepare(self) -> None:
        for r in self.readers:
            r.prepare()
        if len(self.readers) > 1 and self.kernels.name == "numba":
            self._direct = _DirectFiles.build(self.readers, self.offsets)
            if self._direct is None:
                self._memory = _MemoryCSR.build(self.readers)

    def describe(self) -> str:
        if len(self.readers) == 1:
            return self.readers[0].describe()
        kinds = pd.Series([type(r).__name__ for r in self.readers]).value_counts()
        summary = ", ".join(f"{n} {k}" for k, n in kinds.items())
        return f"{len(self.readers)} sources ({summary}), e.g. {self.readers[0].describe()}"
