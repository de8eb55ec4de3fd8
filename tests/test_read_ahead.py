"""Reading ahead: block shuffling announces its next pools, the dataset starts their reads.

Real ``.h5ad`` files evicted from the page cache (``posix_fadvise(DONTNEED)``); whether a row's
bytes are cached is asked with ``mincore``, which starts no read.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import pickle
import threading
import time

import anndata as ad
import lightning.pytorch as pl
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import backed_csr_readers, evict, make_adata, write_h5ad

import torch_adata as ta
from torch_adata import AnnDataModule, AnnDataset, Fields, Loader, _gather
from torch_adata._gather import _byte_ranges
from torch_adata.samplers import BlockShuffleSampler

linux_only = pytest.mark.skipif(
    not (hasattr(os, "RWF_NOWAIT") and hasattr(os, "posix_fadvise")),
    reason="needs posix_fadvise and preadv2's RWF_NOWAIT (Linux)",
)


@pytest.fixture(scope="module")
def rows_file(h5ad_dir):
    """600 cells of ~1,100 stored values (a few pages each), anndata's chunked layout."""
    adata = make_adata("csr", n_obs=600, n_vars=2000, seed=7)
    adata.X = sp.random(600, 2000, density=0.55, format="csr", random_state=7, dtype=np.float32)
    path = h5ad_dir / "read_ahead.h5ad"
    write_h5ad(adata, path)
    return str(path), adata.X.toarray()


def _cached_fraction(dataset: AnnDataset, rows) -> float:
    """Fraction of the pages holding ``rows``' values and indices that are in the page cache."""
    (reader,) = backed_csr_readers(dataset)
    st = reader._open()
    rows = np.unique(np.asarray(rows))
    starts, stops = st.layout.indptr[rows], st.layout.indptr[rows + 1]
    pages = set()
    for layout, itemsize in zip(st.layout.layouts, (4, 4), strict=True):
        offsets, lengths = _byte_ranges(layout, itemsize, starts, stops)
        for offset, length in zip(offsets.tolist(), lengths.tolist(), strict=True):
            pages.update(range(offset // 4096 * 4096, offset + length, 4096))
    resident = _resident_pages(st.descriptor.fd)
    return float(np.mean([resident[page // 4096] for page in pages]))


def _resident_pages(fd: int) -> np.ndarray:
    """Whether each 4 KiB page of the file is in the page cache, from ``mincore`` over a
    mapping of it: asking starts no read (a ``preadv(RWF_NOWAIT)`` probe of a page not cached
    starts the kernel's read-ahead of the pages after it)."""
    size = os.fstat(fd).st_size
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int]
    libc.mmap.argtypes += [ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    assert address not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
    try:
        vec = np.zeros((size + 4095) // 4096, dtype=np.uint8)
        assert libc.mincore(address, size, vec.ctypes.data) == 0, os.strerror(ctypes.get_errno())
    finally:
        libc.munmap(address, size)
    return (vec & 1).astype(bool)


def _wait_cached(dataset, rows, timeout=10.0) -> float:
    deadline = time.monotonic() + timeout
    while (fraction := _cached_fraction(dataset, rows)) < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    return fraction


def test_byte_ranges_cover_exactly_the_elements_asked_for():
    rng = np.random.default_rng(0)
    chunk_len, itemsize = 10, 4
    base = rng.permutation(12) * 1000  # chunks stored out of order, some adjacent
    base[3], base[4] = 5000, 5040  # chunk 4 right after chunk 3 in the file: merged
    starts = np.array([0, 25, 31, 38, 57, 80, 119])
    stops = np.array([4, 31, 38, 52, 57, 100, 120])  # one empty range (57, 57)
    offsets, lengths = _byte_ranges((base, chunk_len), itemsize, starts, stops)
    got = set()
    for o, n in zip(offsets.tolist(), lengths.tolist(), strict=True):
        got |= set(range(o, o + n))
    want = set()
    for s, e in zip(starts.tolist(), stops.tolist(), strict=True):
        for el in range(s, e):
            c = el // chunk_len
            b = int(base[c]) + (el - c * chunk_len) * itemsize
            want |= set(range(b, b + itemsize))
    assert got == want
    # sorted, disjoint and not touching (touching ranges are merged): chunks 3 and 4 are one
    assert (offsets[1:] > offsets[:-1] + lengths[:-1]).all()
    assert 5000 in offsets.tolist() and 5040 not in offsets.tolist()


@linux_only
def test_prefetch_reads_exactly_the_rows_into_the_page_cache(rows_file):
    path, expected = rows_file
    dataset = AnnDataset(path)
    evict(path)
    block, far = np.arange(100, 164), np.arange(520, 560)
    if _cached_fraction(dataset, block) > 0:
        pytest.skip("this file system keeps the file cached after POSIX_FADV_DONTNEED")
    dataset.prefetch(block[::-1])  # any order
    (reader,) = backed_csr_readers(dataset)
    reader._open().hinted.result()  # the kernel has queued the reads
    assert _wait_cached(dataset, block) == 1
    assert _cached_fraction(dataset, far) == 0  # nothing beyond the rows asked for
    np.testing.assert_array_equal(dataset[block].numpy(), expected[block])


@linux_only
def test_prefetch_through_a_view_and_in_memory(rows_file):
    path, expected = rows_file
    backed = ad.read_h5ad(path, backed="r")
    view = backed[300:]  # position i of the view is row 300 + i of the file
    dataset = AnnDataset(view)
    direct = AnnDataset(path)  # to look at the file's pages (opening it reads a few)
    evict(path)
    dataset.prefetch(np.arange(200, 230))
    assert _wait_cached(direct, np.arange(500, 530)) == 1
    # the file's own rows 200-230 (what ignoring the view would announce) stay on disk
    assert _cached_fraction(direct, np.arange(200, 230)) == 0
    np.testing.assert_array_equal(dataset[[229, 200]].numpy(), expected[[529, 500]])
    memory = AnnDataset(ad.read_h5ad(path))
    memory.prefetch([1, 2, 3])  # nothing to read ahead: no error, no effect
    with pytest.raises(IndexError, match="out of range"):
        memory.prefetch([600])


def _recording(path: str, **kwargs):
    class Recording(AnnDataset):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            self.announced: list[np.ndarray] = []

        def prefetch(self, rows):
            self.announced.append(np.sort(np.asarray(rows)))
            super().prefetch(rows)

    return Recording(path, **kwargs)


@pytest.mark.parametrize(("rank", "world"), [(0, 1), (1, 2)])
def test_block_sampler_announces_each_rank_pools_two_ahead(rows_file, rank, world):
    path, _ = rows_file
    dataset = _recording(path)
    options = dict(block_size=8, pool_batches=4, seed=3, num_replicas=world, rank=rank)
    plain = BlockShuffleSampler(600, 16, **options)
    ahead = BlockShuffleSampler(600, 16, read_ahead=dataset, **options)
    for s in (plain, ahead):
        s.set_epoch(2)
    everything = plain.epoch_batches()  # all ranks' batches: pools of 4 consecutive batches
    mine = list(range(rank, len(everything), world))
    pools = sorted({j // 4 for j in mine})
    seen = []
    for k, batch in enumerate(ahead):
        j = mine[k]
        np.testing.assert_array_equal(batch, everything[j])
        i = pools.index(j // 4)
        first = k == 0 or mine[k - 1] // 4 != j // 4
        want = 1 if k == 0 else i + 2 if first else i + 3  # two pools ahead after the first
        seen.append(len(dataset.announced))
        assert len(dataset.announced) == min(want, len(pools)), (k, seen)
    assert len(seen) == len(plain) == len(mine)
    for i, rows in enumerate(dataset.announced):  # each pool's own batches of this rank
        pool_rows = [everything[j] for j in mine if j // 4 == pools[i]]
        np.testing.assert_array_equal(rows, np.sort(np.concatenate(pool_rows)))


def test_read_ahead_must_be_a_dataset():
    with pytest.raises(TypeError, match=r"read_ahead must be the dataset .* got list"):
        BlockShuffleSampler(100, 10, read_ahead=[1, 2])


@linux_only
@pytest.mark.parametrize("context", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])
def test_read_ahead_in_workers_gives_the_rows(rows_file, context):
    path, expected = rows_file
    dataset = AnnDataset(path)
    sampler = BlockShuffleSampler(600, 32, block_size=16, pool_batches=3, read_ahead=dataset)
    loader = torch.utils.data.DataLoader(
        dataset,
        sampler=sampler,
        batch_size=None,
        collate_fn=ta.collate,
        num_workers=2,
        multiprocessing_context=context,
    )
    evict(path)
    batches = list(sampler)
    got = list(loader)
    assert len(got) == len(batches) == len(sampler)
    for rows, batch in zip(batches, got, strict=True):
        np.testing.assert_array_equal(batch.numpy(), expected[rows])
    # the main process only announced the pools (for the workers' page cache): it read none
    # into memory
    (reader,) = backed_csr_readers(dataset)
    st = reader._open()
    assert st.staged_batches == 0 and st.spare == []


class _Reporting(AnnDataset):
    """Batches that also say which process read them, and how many batches and pools that
    process had gathered from staged pools and started staging by then."""

    def __getitem__(self, index):
        batch = super().__getitem__(index)
        st = self.fields["X"].reader._open()
        return batch, os.getpid(), st.staged_batches, st.staged_pools


def _as_is(batch):
    return batch


@linux_only
@pytest.mark.parametrize("workers", [2, 3])
def test_workers_stage_their_share_of_each_pool(rows_file, workers):
    """With workers, the sampler's batches carry their pools: each worker reads its share of
    a pool (the batches the DataLoader hands it in turn) whole into memory, and its share of
    the next pool in the background, and gathers every one of its batches from there:
    anndata's rows, no share read in vain, none missed."""
    path, _ = rows_file
    dataset = _Reporting(path)
    # pools of 3 batches, 19 batches (the last pool has one): shares shift from pool to pool
    sampler = BlockShuffleSampler(600, 32, block_size=16, pool_batches=3, read_ahead=dataset)
    plain = BlockShuffleSampler(600, 32, block_size=16, pool_batches=3)
    batches = list(sampler)
    assert [b.tolist() for b in batches] == [b.tolist() for b in plain]
    back = pickle.loads(pickle.dumps(batches[4]))  # how a batch reaches a worker
    assert back.pool[0] == batches[4].pool[0] and back.pool[2] == 1  # batch 1 of pool 1
    assert [b.tolist() for b in back.pool[1]] == [b.tolist() for b in batches[3:6]]
    assert [b.tolist() for b in back.next_pool[1]] == [b.tolist() for b in batches[6:9]]
    assert batches[-1].next_pool is None and type(np.asarray(back)) is np.ndarray
    loader = torch.utils.data.DataLoader(
        dataset,
        sampler=sampler,
        batch_size=None,
        collate_fn=_as_is,
        num_workers=workers,
        multiprocessing_context="fork",
    )
    evict(path)
    served: dict[int, list] = {}
    for j, (rows, (batch, pid, staged, pools)) in enumerate(zip(batches, loader, strict=True)):
        np.testing.assert_array_equal(batch.numpy(), _anndata_rows(path, rows))
        served.setdefault(pid, []).append((j // 3, staged, pools))
    assert len(served) == workers
    for got in served.values():
        assert [staged for _, staged, _ in got] == list(range(1, len(got) + 1))
        # a share is staged once, for the pools whose batches came to this worker
        assert got[-1][2] == len({pool for pool, _, _ in got})


def _anndata_rows(path: str, rows) -> np.ndarray:
    # read whole (the file is small): anndata 0.10's backed fancy indexing fails on scipy 1.15+
    return ad.read_h5ad(path).X[np.asarray(rows)].toarray()


@linux_only
@pytest.mark.parametrize("sparse", [False, True])
def test_block_read_ahead_gathers_from_staged_pools(rows_file, sparse):
    """With no workers, each announced pool is read whole into memory (the next one by a
    background thread) and its batches gathered from there: anndata's rows, dense or sparse,
    every batch staged, nothing left held or running after the epoch."""
    path, _ = rows_file
    dataset = AnnDataset(path, sparse=sparse)
    sampler = BlockShuffleSampler(600, 32, block_size=16, pool_batches=3, read_ahead=dataset)
    loader = torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=None, collate_fn=ta.collate
    )
    (reader,) = backed_csr_readers(dataset)
    buffers = None
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        evict(path)
        batches = list(sampler)
        got = list(loader)
        assert len(got) == len(batches)
        for rows, batch in zip(batches, got, strict=True):
            values = batch.to_dense() if sparse else batch
            np.testing.assert_array_equal(values.numpy(), _anndata_rows(path, rows))
        st = reader._open()
        assert st.staged_batches == (epoch + 1) * len(batches)  # every batch from a pool
        assert len(st.pools) == 0  # each pool dropped once all its rows were read
        held = [pair[0].ctypes.data for pair in st.spare]
        assert 1 <= len(held) <= 2  # the current pool's buffers and the next one's
        if buffers is not None:
            assert held == buffers  # the second epoch reused the first one's memory
        buffers = held
    stagers = [t for t in threading.enumerate() if t.name.startswith("torch_adata-stage")]
    assert len(stagers) <= 1  # one staging thread, idle: every pool's read has finished


@linux_only
def test_rows_outside_the_announced_pools_are_read_from_the_file(rows_file, monkeypatch):
    path, expected = rows_file
    dataset = AnnDataset(path)
    (reader,) = backed_csr_readers(dataset)
    dataset.prefetch(np.arange(100, 164))
    st = reader._open()
    rows = [163, 100, 100, 120]  # any order, duplicates: from the pool
    np.testing.assert_array_equal(dataset[rows].numpy(), expected[rows])
    assert st.staged_batches == 1
    rows = [99, 120]  # one row outside the pool: read from the file, the pool kept
    np.testing.assert_array_equal(dataset[rows].numpy(), expected[rows])
    assert st.staged_batches == 1 and len(st.pools) == 1
    # a pool larger than the staging limit is only announced to the kernel
    monkeypatch.setattr(_gather, "_STAGE_MAX_BYTES", 1000)
    dataset.prefetch(np.arange(200, 264))
    rows = [201, 263]
    np.testing.assert_array_equal(dataset[rows].numpy(), expected[rows])
    assert st.staged_batches == 1


class _Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2000, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch["X"]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def test_data_module_reads_block_pools_ahead_of_training(rows_file, tmp_path):
    path, expected = rows_file
    module = AnnDataModule(
        path,
        backed=True,
        batch_size=32,
        fields=Fields(obs_keys=["cell_type"], return_index=True, io_threads=2),
        loader=Loader(sampler="block", block_size=16, pool_batches=3),
    )
    module.setup("fit")
    loader = module.train_dataloader()
    assert loader.sampler.read_ahead is loader.dataset  # the split the positions index
    (reader,) = backed_csr_readers(module.dataset)
    assert reader.io_threads == 2
    evict(path)
    for batch in loader:
        np.testing.assert_array_equal(batch["X"].numpy(), expected[batch["index"].numpy()])
    assert reader._open().hinted is not None  # the pools were announced
    assert reader._open().staged_batches == len(loader)  # and each batch read from its pool
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=5,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(_Tiny(), datamodule=module)
    assert trainer.global_step == 5


def test_io_threads_option(rows_file):
    path, expected = rows_file
    for value, stored in ((None, None), (1, 1), (np.int64(4), 4)):
        dataset = AnnDataset(path, io_threads=value)
        (reader,) = backed_csr_readers(dataset)
        assert reader.io_threads == stored
        rows = [5, 599, 5, 100]
        np.testing.assert_array_equal(dataset[rows].numpy(), expected[rows])
    for bad in (0, -2, 1.5, True, "4"):
        with pytest.raises(ValueError, match=r"io_threads must be None .* whole number >= 1"):
            AnnDataset(path, io_threads=bad)
        with pytest.raises(ValueError, match=r"io_threads must be None"):
            Fields(io_threads=bad)
    adata = make_adata("csr")
    with pytest.raises(ValueError, match=r"io_threads must be None .* got 0; use 1"):
        AnnDataset(adata, io_threads=0)  # checked in memory too, where it has no effect
