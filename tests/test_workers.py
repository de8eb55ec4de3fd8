"""Worker processes and pickling: backed datasets cross process boundaries by path.

Each DataLoader test reads from the dataset in the parent first (so the parent holds an open
file, ``pread``-based readers and, with numba, started threads), then iterates two epochs with two
persistent workers and checks that every cell arrives exactly once per epoch with the right
values.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch
from conftest import N_OBS, backed_csr_readers, expected_matrix, force_h5py
from torch.utils.data import DataLoader

import torch_adata as ta
from torch_adata import AnnDataset

MASK = np.arange(N_OBS) % 4 != 3

# A worker that dies can leave the loader's queues locked and the test hanging; the thread
# method ends the run with every thread's stack instead of hanging CI.
HANG_GUARD = pytest.mark.timeout(60, method="thread")

# Python 3.12 warns that forking a multi-threaded process may deadlock: forking after the
# parent has read (numba and torch threads running) is exactly what these tests check.
pytestmark = pytest.mark.filterwarnings("ignore:This process .* fork:DeprecationWarning")


def epochs(dataset, context: str, n_epochs: int = 2, **kwargs):
    loader = DataLoader(
        dataset,
        batch_size=5,
        shuffle=True,
        collate_fn=ta.collate,
        num_workers=2,
        multiprocessing_context=context,
        persistent_workers=True,
        generator=torch.Generator().manual_seed(1),
        **kwargs,
    )
    return [list(loader) for _ in range(n_epochs)]


@HANG_GUARD
@pytest.mark.parametrize("context", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])
@pytest.mark.parametrize("kind", ["path", "backed_view"])
def test_workers_read_every_cell_once_per_epoch(h5ad_files, in_memory, kind, context):
    path = h5ad_files["csr"]
    backed = None
    if kind == "path":
        given_, ref = str(path), in_memory
    else:
        backed = ad.read_h5ad(path, backed="r")
        given_, ref = backed[MASK], in_memory[MASK]
    try:
        dataset = AnnDataset(given_, obs_keys="cell_type", return_index=True, sparse=True)
        parent = dataset[[0, 3, 1]]  # open the file (and start kernels) in the parent first
        assert parent["index"].tolist() == [0, 3, 1]
        for epoch in epochs(dataset, context):
            seen = []
            for batch in epoch:
                rows = batch["index"].numpy()
                np.testing.assert_array_equal(
                    batch["X"].to_dense().numpy(), expected_matrix(ref, rows)
                )
                np.testing.assert_array_equal(
                    dataset.decode("cell_type", batch["cell_type"]),
                    ref.obs["cell_type"].to_numpy()[rows],
                )
                seen += rows.tolist()
            assert sorted(seen) == list(range(ref.n_obs))
    finally:
        if backed is not None:
            backed.file.close()


@HANG_GUARD
def test_fork_workers_with_h5py_reads_and_a_compressed_file(h5ad_files, in_memory):
    datasets = [
        force_h5py(AnnDataset(h5ad_files["csr"], return_index=True)),
        AnnDataset(h5ad_files["gzip"], return_index=True, engine="numpy"),
    ]
    for dataset in datasets:
        dataset[[5, 2]]
        (epoch,) = epochs(dataset, "fork", n_epochs=1)
        seen = []
        for batch in epoch:
            rows = batch["index"].numpy()
            np.testing.assert_array_equal(batch["X"].numpy(), expected_matrix(in_memory, rows))
            seen += rows.tolist()
        assert sorted(seen) == list(range(N_OBS))


@pytest.mark.parametrize(
    ("kind", "read"),
    [(k, r) for k in ("path", "backed", "backed_view") for r in ("direct", "h5py")]
    + [("dense_path", "dense")],
)
def test_pickle_after_reading_drops_and_reopens_handles(h5ad_files, in_memory, kind, read):
    path = h5ad_files["dense" if kind == "dense_path" else "csr"]
    backed, ref = None, in_memory
    if kind in ("path", "dense_path"):
        given_ = str(path)
    else:
        backed = ad.read_h5ad(path, backed="r")
        given_ = backed if kind == "backed" else backed[MASK]
        ref = in_memory if kind == "backed" else in_memory[MASK]
    try:
        dataset = AnnDataset(given_, obs_keys=["cell_type", "size"], obsm_keys="X_pca")
        if read == "h5py":
            force_h5py(dataset)
        rows = [7, 0, 7, ref.n_obs - 1]
        before = dataset[rows]  # opens the file in this process
        clone = pickle.loads(pickle.dumps(dataset))
        for reader in backed_csr_readers(clone):
            assert reader._state is None and reader.file._file is None
            assert reader.direct_reads == (read == "direct")
        after = clone[rows]
        assert before.keys() == after.keys()
        for key in before:
            assert torch.equal(before[key], after[key])
        np.testing.assert_array_equal(after["X"].numpy(), expected_matrix(ref, rows))
        for reader in backed_csr_readers(clone):
            assert reader.mode == read
        assert clone.encoders == dataset.encoders
        assert repr(clone) == repr(dataset)
        if kind.startswith("backed"):
            assert clone.adata is None  # the backed AnnData itself does not cross processes
        # the original still works after being pickled
        assert torch.equal(dataset[rows]["X"], before["X"])
    finally:
        if backed is not None:
            backed.file.close()


def test_pickle_of_in_memory_dataset_keeps_the_anndata():
    from conftest import make_adata

    adata = make_adata("csr")
    dataset = AnnDataset(adata[MASK], obs_keys="batch", sparse=True)
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone.adata is not None and clone.adata.n_obs == MASK.sum()
    a, b = dataset[[3, 1]], clone[[3, 1]]
    assert torch.equal(a["X"].to_dense(), b["X"].to_dense())
    assert torch.equal(a["batch"], b["batch"])


@HANG_GUARD
@pytest.mark.parametrize(
    "pin",
    [
        False,
        pytest.param(
            True,
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(
                    not torch.cuda.is_available(), reason="pinning needs a CUDA device"
                ),
            ],
        ),
    ],
)
def test_sparse_batches_cross_worker_processes(h5ad_files, in_memory, pin):
    """SparseBatch is made of plain tensors: it survives the worker queue and, with a CUDA
    device, the loader's pin_memory thread (without one, torch turns pinning off)."""
    dataset = AnnDataset(h5ad_files["csr"], sparse=True, return_index=True)
    (epoch,) = epochs(dataset, "fork", n_epochs=1, pin_memory=pin)
    assert len(epoch) == -(-N_OBS // 5)  # every batch of the epoch arrived
    seen = []
    for batch in epoch:
        assert isinstance(batch["X"], ta.SparseBatch)
        parts = [*batch["X"][:3], batch["index"]]
        assert all(t.is_pinned() == pin for t in parts)
        rows = batch["index"].numpy()
        np.testing.assert_array_equal(
            ta.densify(batch)["X"].numpy(), expected_matrix(in_memory, rows)
        )
        seen += rows.tolist()
    assert sorted(seen) == list(range(N_OBS))


THREADS_SCRIPT = """
import sys, threading
import numpy as np
sys.path.insert(0, sys.argv[1])
from conftest import expected_matrix, make_adata
from torch_adata import AnnDataset

adata = make_adata("csr", n_obs=2000, n_vars=300)
dataset = AnnDataset(adata, engine="numba")
bad = []

def work(seed):
    rng = np.random.default_rng(seed)
    for _ in range(100):
        rows = rng.integers(0, adata.n_obs, 256)
        if not np.array_equal(dataset[rows].numpy(), expected_matrix(adata, rows)):
            bad.append(seed)

threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("wrong batches:", len(bad))
sys.exit(1 if bad else 0)
"""


@pytest.mark.slow
def test_reads_from_several_threads_at_once():
    """Run in a subprocess: the failure is an abort of the process, not an exception."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    proc = subprocess.run(
        [sys.executable, "-c", THREADS_SCRIPT, str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrong batches: 0" in proc.stdout


class _ThreadsSeen(AnnDataset):
    """Each batch also says how many threads the kernels had in the process that made it."""

    def __getitems__(self, indices):
        import numba

        return {"X": super().__getitems__(indices), "threads": numba.get_num_threads()}


@HANG_GUARD
def test_each_worker_gets_its_share_of_the_kernel_threads(h5ad_files, in_memory):
    numba = pytest.importorskip("numba")
    dataset = _ThreadsSeen(h5ad_files["csr"], engine="numba")
    loader = DataLoader(dataset, batch_size=8, collate_fn=ta.collate, num_workers=2)
    share = max(1, numba.config.NUMBA_NUM_THREADS // 2)
    batches = list(loader)
    assert {batch["threads"] for batch in batches} == {share}
    rows = np.arange(len(batches[0]["X"]))
    np.testing.assert_array_equal(batches[0]["X"].numpy(), expected_matrix(in_memory, rows))
    assert dataset.__getitems__([0])["threads"] == numba.get_num_threads()  # here: untouched
