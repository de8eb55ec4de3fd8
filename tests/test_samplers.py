"""Samplers: coverage, disjointness across ranks, equal batch counts, seeds, epochs, layouts."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, DistributedSampler

from torch_adata import collate
from torch_adata.samplers import (
    BlockShuffleSampler,
    ClonalBatchSampler,
    SequentialBatchSampler,
    TimePointBatchSampler,
    UniformBatchSampler,
)

WORLDS = [(0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3)]


def _all_ranks(make, world):
    return [list(make(rank=r, num_replicas=world)) for r in range(world)]


def _check_exactly_once(per_rank, expected, batch_size):
    lengths = {len(b) for b in per_rank}
    assert len(lengths) == 1, f"ranks yield different batch counts: {lengths}"
    flat = np.concatenate([np.concatenate(b) for b in per_rank])
    assert len(flat) == len(np.unique(flat)), "a position was yielded twice"
    assert np.array_equal(np.sort(flat), np.sort(expected)), "a position was missed"
    assert max(len(x) for b in per_rank for x in b) <= batch_size


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(3, 400),
    batch_size=st.integers(1, 64),
    world=st.integers(1, 3),
    seed=st.integers(0, 5),
    block=st.booleans(),
)
def test_uniform_and_block_cover_every_position_once(n, batch_size, world, seed, block):
    positions = np.arange(1000, 1000 + n)
    if block:

        def make(**kw):
            return BlockShuffleSampler(
                positions, batch_size, block_size=7, pool_batches=2, seed=seed, **kw
            )
    else:

        def make(**kw):
            return UniformBatchSampler(positions, batch_size, seed=seed, **kw)

    per_rank = _all_ranks(make, world)
    _check_exactly_once(per_rank, positions, batch_size)
    assert all(len(make(rank=r, num_replicas=world)) == len(per_rank[r]) for r in range(world))


@pytest.mark.parametrize(("rank", "world"), WORLDS)
def test_drop_last_gives_full_batches(rank, world):
    s = UniformBatchSampler(103, 10, drop_last=True, rank=rank, num_replicas=world)
    batches = list(s)
    assert all(len(b) == 10 for b in batches) and len(batches) == len(s) == 103 // (10 * world)


def test_seed_and_epoch_change_the_draw_reproducibly():
    a, b, c = (UniformBatchSampler(100, 10, seed=s) for s in (1, 1, 2))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    first = [x.copy() for x in a]
    a.set_epoch(1)
    assert not all(np.array_equal(x, y) for x, y in zip(first, a, strict=True))
    a.set_epoch(0)
    assert all(np.array_equal(x, y) for x, y in zip(first, a, strict=True))


def test_sequential_keeps_order_and_is_a_distributed_sampler():
    s = SequentialBatchSampler(np.arange(10), 4)
    assert np.concatenate(list(s)).tolist() == list(range(10))
    for sampler in (s, BlockShuffleSampler(10, 2), UniformBatchSampler(10, 2)):
        assert isinstance(sampler, DistributedSampler)


def test_block_shuffle_reads_contiguous_blocks():
    s = BlockShuffleSampler(10_000, 256, block_size=64, pool_batches=4, seed=0)
    batch = next(iter(s))
    blocks_touched = len(np.unique(batch // 64))
    uniform = next(iter(UniformBatchSampler(10_000, 256, seed=0)))
    assert blocks_touched <= 4 * 256 // 64 + 1  # one pool spans at most 16-17 blocks
    assert len(np.unique(uniform // 64)) > 3 * blocks_touched


@pytest.mark.parametrize(("rank", "world"), WORLDS)
def test_time_point_batches_layout_and_no_repeats(rank, world):
    groups = [np.arange(0, 50), np.arange(50, 130), np.arange(130, 160)]
    n = 4

    def make(**kw):
        return TimePointBatchSampler(groups, n, seed=3, **kw)

    per_rank = _all_ranks(make, world)
    assert len({len(b) for b in per_rank}) == 1
    assert len(per_rank[rank]) == (30 // n) // world
    flat = np.concatenate([np.concatenate(b) for b in per_rank])
    assert len(flat) == len(np.unique(flat))
    for batch in per_rank[rank]:
        assert len(batch) == 3 * n
        for t, g in enumerate(groups):
            assert np.isin(batch[t * n : (t + 1) * n], g).all()


def test_time_point_with_replacement_covers_largest_group():
    groups = [np.arange(0, 10), np.arange(10, 110)]
    s = TimePointBatchSampler(groups, 10, replacement=True, seed=0)
    batches = list(s)
    assert len(batches) == 10
    big = np.concatenate([b[10:] for b in batches])
    assert np.array_equal(np.sort(big), groups[1]), "every cell of the largest group, once"
    small = np.concatenate([b[:10] for b in batches])
    assert np.bincount(small).max() == 10  # the 10 small-group cells cycle 10 times


def test_clonal_batches_hold_whole_clones():
    rng = np.random.default_rng(0)
    clone_ids = rng.integers(-1, 30, 500)
    time_index = rng.integers(0, 3, 500)
    for world in (1, 2):
        per_rank = [
            list(ClonalBatchSampler(clone_ids, time_index, 4, rank=r, num_replicas=world))
            for r in range(world)
        ]
        assert len({len(b) for b in per_rank}) == 1
        seen_clones = []
        for batches in per_rank:
            for batch in batches:
                ids = clone_ids[batch]
                assert (ids >= 0).all()
                for c in np.unique(ids):  # whole clone, contiguous in the batch
                    where = np.flatnonzero(ids == c)
                    assert np.array_equal(where, np.arange(where[0], where[-1] + 1))
                    assert len(where) == (clone_ids == c).sum()
                seen_clones.extend(np.unique(ids).tolist())
        assert len(seen_clones) == len(set(seen_clones)), "a clone appeared twice in an epoch"


def test_clonal_sisters_per_time_point():
    clone_ids = np.repeat(np.arange(5), 20)
    time_index = np.tile(np.repeat([0, 1], 10), 5)
    s = ClonalBatchSampler(clone_ids, time_index, 5, cells_per_clone=2, seed=1)
    (batch,) = list(s)
    assert len(batch) == 5 * 2 * 2
    np.testing.assert_array_equal(s.clones_of(batch), clone_ids[batch])
    for c in range(5):
        members = batch[clone_ids[batch] == c]
        assert np.bincount(time_index[members]).tolist() == [2, 2]


def test_real_dataloader_passes_whole_batches():
    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return 50

        def __getitem__(self, index):
            return torch.as_tensor(np.asarray(index))

    s = UniformBatchSampler(50, 8, seed=0)
    loader = DataLoader(Rows(), sampler=s, batch_size=None, collate_fn=collate)
    got = [b.numpy() for b in loader]
    expected = list(s)
    assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: UniformBatchSampler(10, 0), ValueError, "batch_size must be a positive"),
        (lambda: UniformBatchSampler(10, 2, rank=2, num_replicas=2), ValueError, "rank must be"),
        (lambda: UniformBatchSampler(10, 2, num_replicas=0, rank=0), ValueError, "num_replicas"),
        (lambda: UniformBatchSampler(2, 2, num_replicas=3, rank=0), ValueError, "cannot be shared"),
        (lambda: UniformBatchSampler([], 2), ValueError, "no positions"),
        (lambda: UniformBatchSampler([0.5, 1.5], 2), TypeError, "integer positions"),
        (lambda: TimePointBatchSampler([[1, 2], []], 1), ValueError, r"groups \[1\] are empty"),
        (lambda: TimePointBatchSampler([[1, 2], [3]], 2), ValueError, "smallest time point has 1"),
        (
            lambda: TimePointBatchSampler([[1, 2], [3, 4]], 1, num_batches=5),
            ValueError,
            "replacement=True",
        ),
        (lambda: ClonalBatchSampler([-1, -1], None, 1), ValueError, "No cell has a clone"),
        (
            lambda: ClonalBatchSampler([0, 1], None, 5, drop_last=True),
            ValueError,
            "fewer than one batch",
        ),
        (lambda: ClonalBatchSampler([0, 1], [0], 1), ValueError, "one entry per position"),
    ],
)
def test_bad_sampler_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()
