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


class _SeesItsFetcher(torch.utils.data.Dataset):
    """Records the collate_fn that fetcher_collate finds from its __getitems__."""

    def __init__(self):
        self.seen = []

    def __len__(self):
        return 8

    def __getitems__(self, indices):
        import sys

        self.seen.append(_compat.fetcher_collate(sys._getframe(1)))
        return [torch.tensor(i) for i in indices]


def _my_collate(samples):
    return torch.stack(samples)


def test_fetcher_collate_finds_the_loader_s_collate_fn_through_a_subset():
    dataset = _SeesItsFetcher()
    batches = list(torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=_my_collate))
    subset = torch.utils.data.Subset(dataset, range(4))
    list(torch.utils.data.DataLoader(subset, batch_size=4, collate_fn=_my_collate))
    assert torch.equal(batches[1], torch.arange(4, 8))
    assert dataset.seen == [_my_collate] * 3
    # called from anywhere else (here: the test itself), no fetcher is found
    dataset.__getitems__([0])
    assert dataset.seen[-1] is None


def test_torch_collate_module_knows_the_samples_of_torch_adata():
    from torch_adata._batch import SparseBatch, _Row, _Sample

    module = _compat.torch_collate_module()
    assert module is not None
    assert {_Row, _Sample, SparseBatch} <= set(module.default_collate_fn_map)
    pair = [torch.ones(2), torch.zeros(2)]
    joined = module.collate(pair, collate_fn_map=module.default_collate_fn_map)
    assert torch.equal(joined, torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
