"""Shared-memory rings that carry DataLoader workers' batches to the main process.

Real forked DataLoader workers throughout: batches must arrive intact, slots be reused while the
caller drops its batches, never be overwritten while the caller keeps one (or a view of one),
and a ring outlive its worker so that the next epoch's workers adopt it, one worker per ring.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

import torch_adata as ta
from torch_adata import _transport
from torch_adata._transport import BatchArrays, empty_batch


def in_worker() -> bool:
    """What the dataset layer tells the transport: whether this runs in a DataLoader worker."""
    return get_worker_info() is not None


class _RingFill(Dataset):
    """Each item: a 2 MiB batch filled with its index, written where a worker allocates it."""

    def __len__(self):
        return 12

    def __getitem__(self, i):
        big = empty_batch((512, 1024), torch.float32, in_worker=in_worker())
        big.numpy()[...] = i
        state = getattr(big, "_ring_state", None)
        small = empty_batch((2, 3), torch.float16, in_worker=in_worker())
        for _ in range(6):  # batches used up inside the worker give their slots back
            empty_batch((512, 1024), torch.float32, in_worker=in_worker()).numpy()[...] = -1
        return {
            "big": big,
            "slot": None if state is None else state[1],
            "small": small,
            "row": big[3],  # a view of the slot travels as a copy of its own
        }


def test_worker_batches_reuse_shared_slots_while_the_caller_drops_them():
    in_main = empty_batch((512, 1024), torch.float32, in_worker=False)
    assert type(in_main) is torch.Tensor and not in_main.is_shared()
    loader = DataLoader(_RingFill(), batch_size=None, num_workers=1, collate_fn=ta.collate)
    slots = []
    for i, batch in enumerate(loader):  # each batch is dropped when the next one arrives
        assert type(batch["big"]) is torch.Tensor
        assert torch.equal(batch["big"], torch.full((512, 1024), float(i)))
        assert torch.equal(batch["row"], torch.full((1024,), float(i)))
        assert batch["small"].shape == (2, 3) and batch["small"].dtype == torch.float16
        slots.append(batch["slot"])
    assert None not in slots  # the ring never ran dry: slots were freed and reused
    assert len(set(slots)) < len(slots)


def test_worker_batches_kept_by_the_caller_are_never_overwritten():
    loader = DataLoader(_RingFill(), batch_size=None, num_workers=1, collate_fn=ta.collate)
    kept, views = [], []
    for i, batch in enumerate(loader):
        if i % 2:
            kept.append(batch["big"])  # the batch itself kept
        else:
            views.append(batch["big"][5:7])  # only a view kept: it holds the slot as well
    for j, big in enumerate(kept):
        assert torch.equal(big, torch.full((512, 1024), float(2 * j + 1)))
    for j, view in enumerate(views):
        assert torch.equal(view, torch.full((2, 1024), float(2 * j)))


class _VariableFill(Dataset):
    """Item i: a float32 vector of a size that changes with i (~1.2-1.6 MB), filled with i."""

    def __len__(self):
        return 10

    def __getitem__(self, i):
        out = BatchArrays(in_worker()).tensor(np.full(300_000 + 10_000 * i, i, dtype=np.float32))
        state = getattr(out, "_ring_state", None)
        return {"values": out, "slot": None if state is None else state[1]}


def test_sparse_pieces_of_changing_size_share_one_ring():
    loader = DataLoader(_VariableFill(), batch_size=None, num_workers=1, collate_fn=ta.collate)
    slots, kept = [], []
    for i, batch in enumerate(loader):
        assert batch["values"].shape == (300_000 + 10_000 * i,)
        assert bool((batch["values"] == i).all())
        slots.append(batch["slot"])
        if i == 2:
            kept.append(batch["values"])  # held: its slot must not be refilled
    used = [slot for slot in slots if slot is not None]
    # slots were reused (a ring that briefly runs dry falls back to fresh memory: allowed)
    assert len(used) > len(set(used)) >= 1
    assert bool((kept[0] == 2).all())  # the kept batch's slot was never refilled


class _KeyedFill(Dataset):
    """Item i: a 2 MiB batch filled with i, the key of the ring it was written into and the
    worker's pid."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        big = empty_batch((512, 1024), torch.float32, in_worker=in_worker())
        big.numpy()[...] = i
        state = getattr(big, "_ring_state", None)
        return {"big": big, "ring": None if state is None else state[0].key, "pid": os.getpid()}


def _epoch(loader, keep=None):
    seen = []
    for i, batch in enumerate(loader):
        assert torch.equal(batch["big"], torch.full((512, 1024), float(i)))
        seen.append((batch["ring"], batch["pid"]))
        if keep is not None and i == 1:
            keep.append(batch["big"])
    return seen


def test_next_epochs_workers_adopt_the_rings_of_ended_workers():
    loader = DataLoader(_KeyedFill(), batch_size=None, num_workers=2, collate_fn=ta.collate)
    kept = []
    epochs = [_epoch(loader, keep=kept if e == 0 else None) for e in range(3)]
    for seen in epochs:
        assert None not in {ring for ring, _ in seen}
        rings_of = {}
        for ring, pid in seen:
            rings_of.setdefault(pid, set()).add(ring)
        assert len(rings_of) == 2 and all(len(r) == 1 for r in rings_of.values())
        assert len({next(iter(r)) for r in rings_of.values()}) == 2  # one ring per worker
    pids = [{pid for _, pid in seen} for seen in epochs]
    assert not pids[0] & pids[1] and not pids[1] & pids[2]  # fresh workers every epoch...
    rings = [{ring for ring, _ in seen} for seen in epochs]
    assert rings[0] == rings[1] == rings[2]  # ...writing into the first epoch's rings
    # the batch kept from the first epoch sat in an adopted ring: it was never overwritten
    assert torch.equal(kept[0], torch.full((512, 1024), 1.0))


def test_concurrent_loaders_never_adopt_the_same_ring():
    data = _KeyedFill()
    first = DataLoader(data, batch_size=None, num_workers=2, collate_fn=ta.collate)
    earlier = {ring for ring, _ in _epoch(first)}  # two rings, their workers now ended
    second = DataLoader(data, batch_size=None, num_workers=2, collate_fn=ta.collate)
    owners = {}
    # four live workers, forked after those rings were kept
    for a, b in zip(first, second, strict=True):
        for batch in (a, b):
            owners.setdefault(batch["ring"], set()).add(batch["pid"])
    assert all(len(pids) == 1 for pids in owners.values())  # each ring: one writer
    assert len(owners) == 4 and len(earlier & set(owners)) == 2  # two adopted, two new


def test_a_forked_child_dropping_a_batch_does_not_free_its_slot():
    loader = DataLoader(_KeyedFill(), batch_size=None, num_workers=1, collate_fn=ta.collate)
    batches = iter(loader)
    first = next(batches)["big"]
    pid = os.fork()
    if pid == 0:  # the child's copy of the batch dies here; the parent still reads it
        del first
        import gc

        gc.collect()
        os._exit(0)
    os.waitpid(pid, 0)
    for i, batch in enumerate(batches, start=1):
        assert torch.equal(batch["big"], torch.full((512, 1024), float(i)))
    assert torch.equal(first, torch.zeros((512, 1024)))


class _SizedFill(Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return 2

    def __getitem__(self, i):
        out = empty_batch((self.rows, 1024), torch.float32, in_worker=in_worker())
        out.numpy()[...] = i
        return {"big": out, "ring": out._ring_state[0].key}


def test_the_main_process_keeps_only_the_newest_ownerless_rings(monkeypatch):
    monkeypatch.setattr(_transport.TRANSPORT, "kept_rings", 1)
    keys = []
    for rows in (300, 400, 500):  # three slot sizes: no worker can adopt an earlier ring
        loader = DataLoader(_SizedFill(rows), batch_size=None, num_workers=1, collate_fn=ta.collate)
        keys.append({batch["ring"] for batch in loader}.pop())
    assert keys[0] not in _transport.TRANSPORT.received  # forgotten when the third ring arrived
    assert keys[1] in _transport.TRANSPORT.received and keys[2] in _transport.TRANSPORT.received


# -- batches of the main process: recycled buffers ---------------------------------------------


def test_a_dropped_batch_buffer_serves_the_next_batch_and_a_kept_one_is_never_reused():
    first = empty_batch((256, 1024), torch.float32, in_worker=False)  # 1 MiB: pooled
    address = first.data_ptr()
    first.fill_(1.0)
    del first
    second = empty_batch((256, 1024), torch.float32, in_worker=False)
    assert second.data_ptr() == address  # no fresh pages to fault in
    second.fill_(2.0)
    view = second[3:5]  # a view keeps the buffer, as the batch itself would
    del second
    for _ in range(3):
        other = empty_batch((256, 1024), torch.float32, in_worker=False)
        assert other.data_ptr() != address
        other.fill_(-1.0)
    assert torch.equal(view, torch.full((2, 1024), 2.0))


def test_the_pool_keeps_a_bounded_number_of_size_classes():
    transport = _transport.TRANSPORT
    for k in range(3 * transport.pool_classes):
        empty_batch(((1 << 18) + 1024 * k,), torch.float32, in_worker=False)  # each dropped at once
    assert len(transport.pool) <= transport.pool_classes
    assert all(len(free) <= transport.pool_keep for free in transport.pool.values())


class _KernelOutput(Dataset):
    """Item i: an array a kernel would write (filled with i), as the batch tensor it became."""

    def __len__(self):
        return 6

    def __getitem__(self, i):
        arrays = BatchArrays(in_worker())
        values = arrays.empty(300_000, np.dtype(np.float32))
        values[...] = i
        tensor = arrays.tensor(values)
        return {"values": tensor, "in_place": tensor.data_ptr() == values.ctypes.data}


def test_batch_arrays_hand_back_the_tensor_a_kernel_wrote_into():
    # in a worker, the array lives in a ring slot already: no second copy into one
    loader = DataLoader(_KernelOutput(), batch_size=None, num_workers=1, collate_fn=ta.collate)
    for i, batch in enumerate(loader):
        assert batch["in_place"] and bool((batch["values"] == i).all())
    direct = _KernelOutput()[3]  # and in this process, its recycled buffer
    assert direct["in_place"] and bool((direct["values"] == 3).all())


def test_sparse_batches_a_worker_gathers_straight_into_its_ring_match_anndata():
    import anndata as ad
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    X = sp.random(512, 8000, density=0.2, format="csr", dtype=np.float32, random_state=rng)
    dataset = ta.AnnDataset(ad.AnnData(X), sparse=True)
    batches = [rng.permutation(512)[:256] for _ in range(6)]  # ~1.6 MB of values: ring slots
    loader = DataLoader(
        dataset, sampler=batches, batch_size=None, num_workers=1, collate_fn=ta.collate
    )
    for rows, batch in zip(batches, loader, strict=True):
        assert batch.indices.dtype == torch.int32
        np.testing.assert_array_equal(batch.to_dense().numpy(), X[rows].toarray())
