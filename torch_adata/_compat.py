"""The private or version-dependent APIs of dependencies that torch_adata uses, in one place.

Each is reached through a function here that falls back to a public API or fails with an error
naming the version in use, the versions tested, and what to do instead. The tested ranges are
the ones CI runs (``.ci/run``: the newest versions, then the oldest anndata) and the ones
``pyproject.toml`` declares.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

import anndata as ad
import torch

#: Oldest anndata CI runs against (its second job); ``pyproject.toml`` requires at least this.
ANNDATA_OLDEST = "0.10.9"
#: Oldest torch declared in ``pyproject.toml`` (CI runs only the pinned torch: see the
#: contributing page for why).
TORCH_OLDEST = "2.2"


def _unsupported(package: str, version: str, what: str, instead: str) -> RuntimeError:
    oldest = ANNDATA_OLDEST if package == "anndata" else TORCH_OLDEST
    return RuntimeError(
        f"{package} {version} no longer provides {what}, which torch_adata relies on (tested "
        f"with {package} >= {oldest}). {instead} Please report this with your {package} version."
    )


def view_parent(adata: ad.AnnData) -> tuple[ad.AnnData, Any, Any]:
    """The AnnData a view was sliced from and the view's row and column indices into it.

    anndata keeps these private (``_adata_ref``, ``_oidx``, ``_vidx``); without them a view
    would have to be copied, which for a backed view means reading the whole matrix.
    """
    try:
        return adata._adata_ref, adata._oidx, adata._vidx
    except AttributeError as error:
        raise _unsupported(
            "anndata",
            version("anndata"),
            "the parent of an AnnData view (AnnData._adata_ref, _oidx, _vidx)",
            "Pass adata.copy() (in memory) or the .h5ad path instead of the view.",
        ) from error


def _find_elem_io() -> tuple[Callable[..., Any], Callable[..., Any]]:
    try:  # anndata >= 0.11
        from anndata.io import read_elem, write_elem
    except ImportError:  # anndata 0.10
        from anndata.experimental import read_elem, write_elem
    return read_elem, write_elem


#: ``anndata.io.read_elem`` / ``write_elem`` (``anndata.experimental`` before anndata 0.11): one
#: element (a DataFrame, an array) of an open ``.h5ad`` group, read or written.
read_elem, write_elem = _find_elem_io()


def sparse_arrays_supported() -> bool:
    """Whether this anndata accepts scipy sparse *arrays* (``csr_array``) as X (0.11 and later)."""
    import scipy.sparse as sp

    try:
        ad.AnnData(sp.csr_array((1, 1), dtype="float32"))
    except ValueError:
        return False
    return True


def new_shared_storage(nbytes: int) -> torch.UntypedStorage:
    """Uninitialised CPU storage of ``nbytes`` bytes in shared memory, ready to pass to other
    processes through torch.multiprocessing.

    ``torch.UntypedStorage._new_shared`` maps the shared memory directly; without it (or with a
    changed signature), :func:`shared_storage_by_copy` is the public route.
    """
    new_shared = getattr(torch.UntypedStorage, "_new_shared", None)
    if new_shared is not None:
        try:
            return new_shared(nbytes)
        except TypeError:  # a changed signature: the public route still works
            pass
    return shared_storage_by_copy(nbytes)


def shared_storage_by_copy(nbytes: int) -> torch.UntypedStorage:
    """:func:`new_shared_storage` through public APIs: a tensor allocated in private memory and
    moved to shared memory with ``share_memory_`` (one more copy of the bytes, when made)."""
    return torch.empty(nbytes, dtype=torch.uint8).share_memory_().untyped_storage()


def torch_collate_module() -> types.ModuleType | None:
    """torch's ``default_collate`` module (``torch.utils.data._utils.collate``), whose
    ``default_collate_fn_map`` is the documented way to teach ``default_collate`` new types;
    ``None`` where it lacks ``default_collate_fn_map``, ``collate`` or ``collate_tensor_fn``
    (then per-cell samples are stacked as any tensors, which still gives the batch)."""
    try:
        from torch.utils.data._utils import collate as module

        module.default_collate_fn_map, module.collate, module.collate_tensor_fn  # noqa: B018
    except (ImportError, AttributeError):  # pragma: no cover - another torch layout
        return None
    return module


def _map_fetch_code() -> types.CodeType | None:
    try:
        from torch.utils.data._utils.fetch import _MapDatasetFetcher

        return _MapDatasetFetcher.fetch.__code__
    except (ImportError, AttributeError):  # pragma: no cover - another torch layout
        return None


#: The code of torch's map-style fetcher's ``fetch`` (``_MapDatasetFetcher.fetch``), which calls
#: a dataset's ``__getitems__``; ``None`` on a torch laid out otherwise.
MAP_FETCH_CODE = _map_fetch_code()


def fetcher_collate(frame: types.FrameType | None) -> Any:
    """The ``collate_fn`` of the torch map-style fetcher whose ``fetch`` is ``frame`` or
    reached from it through ``__getitems__`` calls that pass their dataset's result through
    unchanged (``Subset``, and datasets that say so with ``_getitems_passes_through``);
    ``None`` for any other caller, or a torch whose fetcher is not laid out as expected (then
    datasets return per-cell samples, which every collate function accepts).

    Reads torch's private fetcher frame (its ``self``), the one place torch_adata does.
    """
    if MAP_FETCH_CODE is None:  # pragma: no cover - another torch layout
        return None
    for _ in range(4):
        if frame is None:
            return None
        if frame.f_code is MAP_FETCH_CODE:
            return getattr(frame.f_locals.get("self"), "collate_fn", None)
        if frame.f_code.co_name != "__getitems__":
            return None
        owner = frame.f_locals.get("self")
        if not (
            type(owner) is torch.utils.data.Subset
            or getattr(owner, "_getitems_passes_through", False)
        ):
            return None
        frame = frame.f_back
    return None
