"""Dataset names that :func:`load_dataset` (and ``AnnDataModule("name")``) understands."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anndata as ad

__all__ = ["available_datasets", "load_dataset", "register_dataset"]

Loader = Callable[..., ad.AnnData]

_REGISTRY: dict[str, Loader] = {}


def register_dataset(name: str, loader: Loader, *, overwrite: bool = False) -> None:
    """Make ``load_dataset(name, **kwargs)`` call ``loader(**kwargs)``.

    Parameters
    ----------
    name
        Dataset name: non-empty, no path separator, not ending in ``.h5ad`` (so that names
        and paths cannot be confused).
    loader
        Callable returning an :class:`~anndata.AnnData`. It receives the keyword arguments
        of :func:`load_dataset`, including ``backed`` when the caller passes one that is
        not ``None``.
    overwrite
        Replace an existing registration of ``name`` instead of raising.

    Raises
    ------
    ValueError
        If the name is invalid, or already registered and ``overwrite`` is false.
    """
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(f"A dataset name must be a non-empty string, got {name!r}.")
    if "/" in name or os.sep in name or name.endswith(".h5ad"):
        raise ValueError(
            f"Dataset name {name!r} looks like a path; names must not contain '/' or end "
            "in '.h5ad'."
        )
    if not callable(loader):
        raise TypeError(f"loader must be callable, got {type(loader).__name__}.")
    if name in _REGISTRY and not overwrite and _REGISTRY[name] is not loader:
        raise ValueError(
            f"A dataset named {name!r} is already registered; pass overwrite=True to replace it."
        )
    _REGISTRY[name] = loader


def available_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`, sorted.

    Returns
    -------
    list of str
    """
    return sorted(_REGISTRY)


def load_dataset(source: str | os.PathLike[str], **kwargs: Any) -> ad.AnnData:
    """Load a registered dataset by name, or an existing ``.h5ad`` file by path.

    Parameters
    ----------
    source
        A name from :func:`available_datasets` (e.g. ``"simulated"``, ``"larry"``) or the
        path of an existing ``.h5ad`` file. A registered name wins over a file of the same
        name in the working directory.
    **kwargs
        For a name: passed to its loader (e.g. ``experiment="in_vivo"`` for ``"larry"``).
        For a path: only ``backed`` (``None`` to load into memory, ``"r"`` to read
        on demand), passed to :func:`anndata.read_h5ad`.

    Returns
    -------
    anndata.AnnData

    Raises
    ------
    ValueError
        Unknown name, or a path that does not end in ``.h5ad``.
    FileNotFoundError
        A ``.h5ad`` path that does not exist.
    TypeError
        Keyword arguments other than ``backed`` with a path.
    """
    if isinstance(source, str) and source in _REGISTRY:
        if kwargs.get("backed", "absent") is None:
            kwargs.pop("backed")  # the default everywhere: do not bother the loader with it
        return _REGISTRY[source](**kwargs)

    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a dataset name or a path, got {type(source).__name__}.")
    path = Path(source).expanduser()
    backed = kwargs.pop("backed", None)
    if kwargs:
        raise TypeError(
            f"Only 'backed' can be passed when loading a file; got {sorted(kwargs)} "
            f"for {str(path)!r}."
        )
    if path.suffix == ".h5ad" and path.is_file():
        return ad.read_h5ad(path, backed=backed)

    rule = (
        f"Available dataset names: {', '.join(available_datasets()) or '(none)'}. "
        "Anything else must be the path of an existing file ending in '.h5ad'."
    )
    if path.suffix != ".h5ad":
        raise ValueError(f"Unknown dataset {str(source)!r}. {rule}")
    raise FileNotFoundError(f"No such .h5ad file: {str(path)!r}. {rule}")


def _load_simulated(**kwargs: Any) -> ad.AnnData:
    backed = kwargs.pop("backed", None)
    if backed is not None:
        raise ValueError(
            "The simulated dataset is generated in memory and cannot be opened backed; "
            "write it with adata.write_h5ad(path) and load that path with backed='r'."
        )
    from ._simulated import simulated

    return simulated(**kwargs)


def _load_larry(**kwargs: Any) -> ad.AnnData:
    from ._larry import _prepare, _read_cached, larry

    backed = kwargs.pop("backed", None)
    if backed is None:
        return larry(**kwargs)
    # Backed: make sure the cached .h5ad exists, then open it on demand.
    bound = inspect.signature(larry).bind(**kwargs)  # TypeError for unknown arguments
    bound.apply_defaults()
    options = dict(bound.arguments)
    path, _ = _prepare(options.pop("experiment"), **options)
    return _read_cached(path, backed=backed)


register_dataset("simulated", _load_simulated)
register_dataset("larry", _load_larry)
