"""CUDA paths: sparse batches densified on the GPU, pinned loaders. Skipped without CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import N_VARS, expected_matrix, make_adata
from torch.utils.data import DataLoader

import torch_adata as ta
from torch_adata import AnnDataset, SparseBatch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fmt", ["csr", "dense"])
def test_sparse_batch_densified_on_cuda_equals_cpu(fmt, dtype):
    adata = make_adata(fmt)
    dataset = AnnDataset(adata, sparse=True, dtype=dtype, obs_keys="cell_type")
    rows = [36, 0, 5, 5, 12, 0]  # with all-zero rows and duplicates
    batch = dataset[rows]
    on_cpu = ta.densify(batch)["X"]
    moved = batch["X"].to("cuda")
    assert moved.device.type == "cuda"
    on_gpu = moved.to_dense()
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == dtype
    assert torch.equal(on_gpu.cpu(), on_cpu)
    # densify(device=...) moves and densifies every field in one call
    whole = ta.densify(batch, device="cuda")
    assert whole["X"].device.type == "cuda" and whole["cell_type"].device.type == "cuda"
    assert torch.equal(whole["X"].cpu(), on_cpu)
    np.testing.assert_array_equal(on_gpu.cpu().numpy(), expected_matrix(adata, rows))


def test_sparse_csr_tensor_on_cuda():
    adata = make_adata("csr")
    batch = AnnDataset(adata, sparse=True)[[3, 1, 3]]
    csr = batch.to("cuda").to_sparse_csr()
    assert csr.is_cuda and csr.layout == torch.sparse_csr
    assert torch.equal(csr.to_dense().cpu(), batch.to_dense())


@pytest.mark.parametrize("sparse", [False, True])
def test_pinned_loader_then_cuda(h5ad_files, in_memory, sparse):
    dataset = AnnDataset(h5ad_files["csr"], sparse=sparse, return_index=True)
    loader = DataLoader(dataset, batch_size=8, shuffle=True, collate_fn=ta.collate, pin_memory=True)
    seen = []
    for batch in loader:
        x = batch["X"]
        parts = [x.indptr, x.indices, x.values] if isinstance(x, SparseBatch) else [x]
        assert all(t.is_pinned() for t in [*parts, batch["index"]])
        if sparse:
            assert isinstance(x, SparseBatch)  # pinning keeps the container
        on_gpu = ta.densify({k: v.to("cuda", non_blocking=True) for k, v in batch.items()})
        assert on_gpu["X"].is_cuda and on_gpu["X"].shape[1] == N_VARS
        rows = on_gpu["index"].cpu().numpy()
        np.testing.assert_array_equal(on_gpu["X"].cpu().numpy(), expected_matrix(in_memory, rows))
        seen += rows.tolist()
    assert sorted(seen) == list(range(len(dataset)))


def test_to_dense_on_cuda_under_deterministic_algorithms():
    """Lightning's Trainer(deterministic=True) turns deterministic algorithms on."""
    adata = make_adata("csr")
    batch = AnnDataset(adata, sparse=True)[[4, 2, 4]]
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        dense = batch.to("cuda").to_dense()
        torch.cuda.synchronize()
    finally:
        torch.use_deterministic_algorithms(was)
    np.testing.assert_array_equal(dense.cpu().numpy(), expected_matrix(adata, [4, 2, 4]))
