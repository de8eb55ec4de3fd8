"""torch_adata._compat: the one place that reaches into private APIs of anndata and torch."""

from __future__ import annotations

import types
from importlib.metadata import version

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import N_OBS, N_VARS, make_adata, write_h5ad
from packaging.version import Version

from torch_adata import _compat


def test_view_parent_gives_the_root_and_the_view_s_indices():
    adata = make_adata("csr")
    rows, cols = np.array([5, 1, 30]), np.array([2, 0])
    root, oidx, vidx = _compat.view_parent(adata[rows][:, cols])
    assert root is adata
    np.testing.assert_array_equal(np.arange(N_OBS)[oidx], rows)
    np.testing.assert_array_equal(np.arange(N_VARS)[vidx], cols)


def test_view_parent_without_anndata_s_private_fields_names_the_fix():
    # an object without _adata_ref stands for an anndata release that dropped it
    no_parent = types.SimpleNamespace(is_view=True)
    with pytest.raises(RuntimeError, match=r"parent of an AnnData view.*adata\.copy\(\)"):
        _compat.view_parent(no_parent)


def test_read_elem_reads_what_anndata_wrote(tmp_path):
    import h5py

    adata = make_adata("csr")
    path = tmp_path / "a.h5ad"
    write_h5ad(adata, path)
    with h5py.File(path, "r") as f:
        obs = _compat.read_elem(f["obs"])
    assert list(obs.index) == list(adata.obs_names)
    np.testing.assert_array_equal(obs["cell_type"].to_numpy(), adata.obs["cell_type"].to_numpy())


def _fill(tensor: torch.Tensor) -> None:
    tensor.copy_(torch.arange(len(tensor), dtype=torch.uint8))


@pytest.mark.parametrize("make", [_compat.new_shared_storage, _compat.shared_storage_by_copy])
def test_shared_storage_is_written_by_another_process(make):
    storage = make(64)
    assert storage.nbytes() == 64 and storage.is_shared()
    tensor = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (64,))
    tensor.zero_()
    child = mp.get_context("fork").Process(target=_fill, args=(tensor,))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    assert torch.equal(tensor, torch.arange(64, dtype=torch.uint8))


def test_sparse_array_support_matches_the_anndata_version():
    old = Version(version("anndata")) < Version("0.11")
    assert _compat.sparse_arrays_supported() is not old
