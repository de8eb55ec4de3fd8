"""Batch samplers: exactly-once coverage, disjoint ranks, equal counts, seeds, layouts, errors."""

import pickle

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, DistributedSampler

from torch_adata import samplers as samplers_module
from torch_adata.samplers import (
    BlockShuffleSampler,
    ClonalBatchSampler,
    SequentialBatchSampler,
    TimePointBatchSampler,
    UniformBatchSampler,
)

WORLDS = [(0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3)]
PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def shares(make, world, epoch=0):
    """Batches of every rank of a world, as lists of arrays, after set_epoch(epoch)."""
    out = []
    for r in range(world):
        s = make(rank=r, num_replicas=world)
        s.set_epoch(epoch)
        batches = list(s)
        assert len(s) == len(batches), "len() must equal the batches actually yielded"
        for b in batches:
            assert isinstance(b, np.ndarray) and b.dtype == np.int64 and b.ndim == 1
            assert len(b) > 0, "empty batch"
        out.append(batches)
    assert len({len(b) for b in out}) == 1, f"unequal batch counts: {[len(b) for b in out]}"
    return out


def flat(per_rank):
    return np.concatenate([np.concatenate(b) for b in per_rank])


def assert_full_but_last(per_rank, batch_size):
    """Every batch has batch_size entries but each rank's last, which has 1..batch_size."""
    for batches in per_rank:
        assert all(len(b) == batch_size for b in batches[:-1]), [len(b) for b in batches]
        assert 1 <= len(batches[-1]) <= batch_size
    last = [len(batches[-1]) for batches in per_rank]
    assert max(last) - min(last) <= 1, f"ranks' last batches are not near-equal: {last}"


def same_draw(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def assert_exactly_once(per_rank, expected):
    got = flat(per_rank)
    assert len(got) == len(np.unique(got)), "a position was yielded twice in an epoch"
    np.testing.assert_array_equal(np.sort(got), np.sort(expected))


def assert_disjoint(per_rank):
    sets = [set(flat([b]).tolist()) for b in per_rank]
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            assert not sets[i] & sets[j], f"ranks {i} and {j} share positions"


# -- uniform and sequential ----------------------------------------------------------------------


def test_sequential_exact_batches_per_rank():
    # 10 positions, B=3, W=2: k = ceil(10/6) = 2 per rank, 4 pieces of sizes 3, 3, 2, 2
    expected = {
        0: [[0, 1, 2], [6, 7]],
        1: [[3, 4, 5], [8, 9]],
    }
    for r in (0, 1):
        s = SequentialBatchSampler(10, 3, rank=r, num_replicas=2)
        assert [b.tolist() for b in s] == expected[r]
        assert len(s) == 2
    one = SequentialBatchSampler(np.arange(100, 110), 4)
    assert [b.tolist() for b in one] == [[100, 101, 102, 103], [104, 105, 106, 107], [108, 109]]


def test_batch_size_means_the_batch_size():
    # issue 13.2: 700 cells in batches of 64 are 10 x 64 + 60, not 63, 63, 62, ...
    assert [len(b) for b in SequentialBatchSampler(700, 64)] == [64] * 10 + [60]
    assert [len(b) for b in UniformBatchSampler(700, 64, seed=3)] == [64] * 10 + [60]
    assert [len(b) for b in BlockShuffleSampler(700, 64, block_size=16)] == [64] * 10 + [60]
    # two ranks: 5 full rounds of 2 x 64, then the 60 left shared 30/30 by the last batches
    for r in (0, 1):
        assert [len(b) for b in UniformBatchSampler(700, 64, num_replicas=2, rank=r)] == (
            [64] * 5 + [30]
        )


def test_fewer_left_than_ranks_repeats_the_first_of_the_epoch():
    # 13 positions, B=4, W=3: one full round (12), 1 left for 3 ranks -> 2 repeats
    per_rank = [
        [b.tolist() for b in SequentialBatchSampler(13, 4, num_replicas=3, rank=r)]
        for r in range(3)
    ]
    assert per_rank == [[[0, 1, 2, 3], [12]], [[4, 5, 6, 7], [0]], [[8, 9, 10, 11], [1]]]
    shuffled = shares(lambda **kw: UniformBatchSampler(13, 4, seed=2, **kw), 3)
    got = flat(shuffled)
    assert len(got) == 15 and set(got.tolist()) == set(range(13))
    repeated = np.unique(got, return_counts=True)
    assert (repeated[1] == 2).sum() == 2  # exactly W - r = 2 positions twice
    # batch_size=1 with a count not divisible by the world size works the same way
    assert [len(shares(lambda **kw: UniformBatchSampler(5, 1, **kw), 2)[r]) for r in (0, 1)] == [
        3,
        3,
    ]


@pytest.mark.parametrize(("rank", "world"), WORLDS)
@pytest.mark.parametrize("shuffle", [True, False])
def test_uniform_exactly_once_per_world(rank, world, shuffle):
    positions = np.arange(500, 500 + 103) * 2  # a split's rows, not 0..n-1

    def make(**kw):
        return UniformBatchSampler(positions, 10, shuffle=shuffle, seed=7, **kw)

    per_rank = shares(make, world)
    assert_exactly_once(per_rank, positions)
    assert_disjoint(per_rank)
    assert len(per_rank[rank]) == -(-103 // (10 * world))
    assert_full_but_last(per_rank, 10)
    mine = list(make(rank=rank, num_replicas=world))
    assert same_draw(mine, per_rank[rank])
    if not shuffle:  # evaluation order: the input order, piece j on rank j % world
        s = make(rank=0, num_replicas=1)
        assert np.array_equal(np.concatenate(s.epoch_batches()), positions)


@PROPERTY
@given(
    n=st.integers(1, 300),
    batch_size=st.integers(1, 40),
    world=st.integers(1, 3),
    seed=st.integers(-3, 3),
    drop_last=st.booleans(),
    block=st.booleans(),
    block_size=st.integers(1, 20),
    pool_batches=st.integers(1, 4),
)
def test_uniform_and_block_properties(
    n, batch_size, world, seed, drop_last, block, block_size, pool_batches
):
    positions = np.random.default_rng(n).choice(10 * n, n, replace=False)

    def make(**kw):
        if block:
            return BlockShuffleSampler(
                positions,
                batch_size,
                block_size=block_size,
                pool_batches=pool_batches,
                drop_last=drop_last,
                seed=seed,
                **kw,
            )
        return UniformBatchSampler(positions, batch_size, drop_last=drop_last, seed=seed, **kw)

    feasible = n >= world * batch_size if drop_last else n >= world
    if not feasible:
        with pytest.raises(ValueError, match=r"ranks|drop_last"):
            make(rank=0, num_replicas=world)
        return
    per_rank = shares(make, world)
    got = flat(per_rank)
    assert np.isin(got, positions).all()
    sizes = [len(b) for batches in per_rank for b in batches]
    if drop_last:
        assert_disjoint(per_rank)
        assert len(got) == len(np.unique(got))
        assert set(sizes) == {batch_size}
        assert len(got) == n - n % (world * batch_size)
        assert len(per_rank[0]) == n // (world * batch_size)
        return
    k = -(-n // (world * batch_size))
    assert len(per_rank[0]) == k
    assert_full_but_last(per_rank, batch_size)
    rest = n - (k - 1) * world * batch_size
    pad = max(0, world - rest)
    assert len(got) == n + pad  # every position once, plus W - r repeats when 0 < r < W
    assert set(got.tolist()) == set(positions.tolist())
    assert (np.unique(got, return_counts=True)[1] > 1).sum() == pad
    if pad == 0:
        assert_disjoint(per_rank)


@pytest.mark.parametrize(("rank", "world"), WORLDS)
def test_uniform_drop_last_full_batches(rank, world):
    def make(**kw):
        return UniformBatchSampler(103, 10, drop_last=True, seed=1, **kw)

    s = make(rank=rank, num_replicas=world)
    batches = list(s)
    assert [len(b) for b in batches] == [10] * (103 // (10 * world)) == [10] * len(s)
    per_rank = shares(make, world)
    assert len(flat(per_rank)) == 103 - 103 % (10 * world)
    assert_disjoint(per_rank)
    # the dropped tail is random, so it changes across epochs
    dropped = [set(range(103)) - set(flat(shares(make, world, epoch=e)).tolist()) for e in range(3)]
    assert len({frozenset(d) for d in dropped}) > 1


@pytest.mark.parametrize(
    "make",
    [
        lambda seed: UniformBatchSampler(200, 16, seed=seed),
        lambda seed: BlockShuffleSampler(200, 16, block_size=8, pool_batches=2, seed=seed),
        lambda seed: TimePointBatchSampler([np.arange(100), np.arange(100, 200)], 8, seed=seed),
        lambda seed: ClonalBatchSampler(np.arange(200) // 5, None, 4, seed=seed),
        lambda seed: ClonalBatchSampler(
            np.arange(200) // 10, np.arange(200) % 2, 4, cells_per_clone=2, seed=seed
        ),
    ],
    ids=["uniform", "block", "timepoint", "clonal", "clonal-sisters"],
)
def test_seed_and_epoch_change_the_draw_reproducibly(make):
    a, b, c = make(1), make(1), make(2)
    first = list(a)
    assert same_draw(first, list(b)), "same seed, same epoch: same batches"
    assert not same_draw(first, list(c)), "another seed: another draw"
    a.set_epoch(1)
    second = list(a)
    assert not same_draw(first, second), "set_epoch must change the draw"
    assert len(second) == len(first)
    b.set_epoch(1)
    assert same_draw(second, list(b)), "the draw is a function of (seed, epoch) only"
    a.set_epoch(0)
    assert same_draw(first, list(a))
    assert same_draw(first, list(pickle.loads(pickle.dumps(make(1)))))


def test_sequential_ignores_seed_and_epoch():
    a = SequentialBatchSampler(20, 6, seed=3)
    a.set_epoch(5)
    assert same_draw(list(a), list(SequentialBatchSampler(20, 6)))


def test_every_sampler_is_a_distributed_sampler():
    made = [
        (UniformBatchSampler(10, 2), 5),
        (SequentialBatchSampler(10, 2), 5),
        (BlockShuffleSampler(10, 2), 5),
        (TimePointBatchSampler([[0, 1], [2, 3]], 1), 2),
        (ClonalBatchSampler([0, 0, 1, -1], None, 1), 2),
    ]
    for s, n_batches in made:
        assert isinstance(s, DistributedSampler)
        assert (s.num_replicas, s.rank) == (1, 0)
        assert len(s) == n_batches == len(list(s))
        s.set_epoch(3)
        assert repr(s) == (
            f"{type(s).__name__}(batches_per_rank={n_batches}, seed=0, epoch=3, rank=0, "
            "num_replicas=1)"
        )


def test_real_dataloader_gets_whole_batches():
    class Rows(torch.utils.data.Dataset):
        calls = 0

        def __len__(self):
            return 50

        def __getitem__(self, index):
            Rows.calls += 1
            assert isinstance(index, np.ndarray)  # the whole batch in one call
            return torch.as_tensor(index * 10)

    s = UniformBatchSampler(50, 8, seed=0, rank=1, num_replicas=2)
    loader = DataLoader(Rows(), sampler=s, batch_size=None, num_workers=0)
    assert len(loader) == len(s) == 4
    got = [b.numpy() for b in loader]
    assert Rows.calls == 4
    assert same_draw(got, [b * 10 for b in s])


# -- block shuffle -------------------------------------------------------------------------------


@pytest.mark.parametrize(("rank", "world"), WORLDS)
def test_block_exactly_once_per_world(rank, world):
    positions = np.arange(0, 3000, 3)  # unsorted input is sorted by the sampler
    rng = np.random.default_rng(0)

    def make(**kw):
        return BlockShuffleSampler(
            rng.permutation(positions), 32, block_size=16, pool_batches=3, seed=2, **kw
        )

    per_rank = shares(make, world)
    assert_exactly_once(per_rank, positions)
    assert_disjoint(per_rank)
    assert same_draw(list(make(rank=rank, num_replicas=world)), per_rank[rank])


def test_block_batches_stay_in_their_pool():
    n, batch, block, pool = 10_000, 256, 64, 4
    s = BlockShuffleSampler(n, batch, block_size=block, pool_batches=pool, seed=0)
    batches = s.epoch_batches()
    pool_cells = batch * pool
    for j in range(0, len(batches), pool):
        blocks = np.unique(np.concatenate(batches[j : j + pool]) // block)
        assert len(blocks) <= pool_cells // block + 1  # one pool: about 16 blocks
        for b in batches[j : j + pool]:
            assert np.isin(b // block, blocks).all()
    # mixed within the pool: a batch draws from many of the pool's blocks
    assert len(np.unique(batches[0] // block)) >= 8
    uniform = UniformBatchSampler(n, batch, seed=0).epoch_batches()[0]
    assert len(np.unique(uniform // block)) > 5 * len(np.unique(batches[0] // block))


def test_block_pools_are_made_of_shuffled_whole_blocks():
    n, batch, block, pool = 4000, 50, 20, 4
    s = BlockShuffleSampler(n, batch, block_size=block, pool_batches=pool, seed=0)
    firsts = []
    for epoch in range(2):
        s.set_epoch(epoch)
        batches = s.epoch_batches()
        for j in range(0, len(batches), pool):
            counts = np.bincount(np.concatenate(batches[j : j + pool]) // block)
            partial = (counts > 0) & (counts < block)
            assert partial.sum() <= 2, "a pool holds whole blocks (but the ones it is cut at)"
        firsts.append(set(np.unique(np.concatenate(batches[:pool]) // block).tolist()))
    assert firsts[0] != set(range(len(firsts[0]))), "blocks are shuffled, not read in order"
    assert firsts[0] != firsts[1], "the block order changes with the epoch"


def test_block_drop_last():
    s = BlockShuffleSampler(1000, 64, block_size=10, drop_last=True, seed=0, rank=1, num_replicas=2)
    assert [len(b) for b in s] == [64] * 7 == [64] * len(s)


# -- time points ---------------------------------------------------------------------------------

GROUPS = [np.arange(0, 50), np.arange(50, 130), np.arange(130, 160)]


@pytest.mark.parametrize(("rank", "world"), WORLDS)
def test_time_point_layout_and_no_repeats(rank, world):
    n = 4

    def make(**kw):
        return TimePointBatchSampler(GROUPS, n, seed=3, **kw)

    per_rank = shares(make, world)
    assert len(per_rank[rank]) == (30 // n) // world  # smallest group 30 -> 7 batches in all
    got = flat(per_rank)
    assert len(got) == len(np.unique(got)), "no cell twice within an epoch"
    assert_disjoint(per_rank)
    for batch in per_rank[rank]:
        assert len(batch) == 3 * n
        for t, g in enumerate(GROUPS):
            assert np.isin(batch[t * n : (t + 1) * n], g).all()
    assert same_draw(list(make(rank=rank, num_replicas=world)), per_rank[rank])
    assert make(rank=0, num_replicas=1).group_of_slot().tolist() == [0] * n + [1] * n + [2] * n


def test_time_point_subsamples_larger_groups_differently_each_epoch():
    s = TimePointBatchSampler(GROUPS, 10, seed=0)
    draws = []
    for epoch in range(2):
        s.set_epoch(epoch)
        draws.append(set(np.concatenate([b[10:20] for b in s]).tolist()))
    assert len(draws[0]) == 30 and draws[0] != draws[1]


@pytest.mark.parametrize(("rank", "world"), WORLDS)
def test_time_point_with_replacement(rank, world):
    groups = [np.arange(0, 10), np.arange(10, 110)]

    def make(**kw):
        return TimePointBatchSampler(groups, 10, replacement=True, seed=0, **kw)

    per_rank = shares(make, world)
    total = -(-10 // world) * world  # ceil(100 / 10) = 10 batches, up to a multiple of world
    assert len(per_rank[rank]) == total // world
    big = np.concatenate([b[10:] for batches in per_rank for b in batches])
    assert set(big.tolist()) == set(groups[1].tolist()), "every cell of the largest group"
    assert np.bincount(big).max() <= -(-total * 10 // 100)
    small = np.concatenate([b[:10] for batches in per_rank for b in batches])
    assert np.isin(small, groups[0]).all()
    assert np.bincount(small).max() == total  # 10 cells cycled total times, evenly
    assert np.bincount(small, minlength=10).min() == total


def test_time_point_num_batches():
    s = TimePointBatchSampler(GROUPS, 5, num_batches=5, seed=0, rank=0, num_replicas=2)
    assert len(s) == 2 and s.total_batches == 4  # rounded down to a multiple of the world
    r = TimePointBatchSampler(GROUPS, 5, replacement=True, num_batches=20, seed=0)
    batches = list(r)
    assert len(batches) == 20
    small = np.concatenate([b[10:15] for b in batches])
    assert np.bincount(small - 130).max() <= -(-20 * 5 // 30)


@PROPERTY
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    n=st.integers(1, 8),
    world=st.integers(1, 3),
    replacement=st.booleans(),
    seed=st.integers(0, 3),
)
def test_time_point_properties(sizes, n, world, replacement, seed):
    groups = np.split(np.random.default_rng(seed).permutation(sum(sizes)), np.cumsum(sizes)[:-1])

    def make(**kw):
        return TimePointBatchSampler(groups, n, replacement=replacement, seed=seed, **kw)

    if not replacement and min(sizes) < n * world:
        with pytest.raises(ValueError, match="smallest time point"):
            make(rank=0, num_replicas=world)
        return
    per_rank = shares(make, world)
    total = sum(len(b) for b in per_rank)
    if replacement:
        per_world = -(-max(sizes) // n)
        assert total == -(-per_world // world) * world
    else:
        assert total == (min(sizes) // n) // world * world
        got = flat(per_rank)
        assert len(got) == len(np.unique(got))
        assert_disjoint(per_rank)
    for batches in per_rank:
        for b in batches:
            for t, g in enumerate(groups):
                assert np.isin(b[t * n : (t + 1) * n], g).all()


# -- clones --------------------------------------------------------------------------------------


def random_clones(seed=0, n=600, n_clones=37, n_times=3):
    rng = np.random.default_rng(seed)
    ids = rng.integers(-1, n_clones, n)
    return ids, rng.integers(0, n_times, n)


def assert_clone_blocks(batch, ids, whole=True):
    clones = ids[batch]
    assert (clones >= 0).all(), "a cell without clone was yielded"
    change = np.flatnonzero(np.diff(clones) != 0) + 1
    starts = np.concatenate([[0], change])
    assert len(np.unique(clones)) == len(starts), "a clone is split within its batch"
    for s, e in zip(starts, np.concatenate([change, [len(batch)]]), strict=True):
        assert (ids[batch[s:e]] == clones[s]).all()
        if whole:
            assert len(batch[s:e]) == (ids == clones[s]).sum()
    return clones[starts]


@pytest.mark.parametrize(("rank", "world"), WORLDS)
def test_clonal_whole_clones_exactly_once(rank, world):
    ids, time = random_clones()
    n_clones = len(np.unique(ids[ids >= 0]))

    def make(**kw):
        return ClonalBatchSampler(ids, time, 5, seed=5, **kw)  # 37 clones: no repeats

    per_rank = shares(make, world)
    assert len(per_rank[rank]) == -(-n_clones // (5 * world))
    assert_disjoint(per_rank)
    seen = []
    for batches in per_rank:
        for b in batches:
            order = assert_clone_blocks(b, ids)
            assert len(order) <= 5
            seen.extend(order.tolist())
            for c in order:  # within a clone, sorted by time then position
                cells = b[ids[b] == c]
                assert np.array_equal(cells, cells[np.lexsort((cells, time[cells]))])
    assert sorted(seen) == sorted(np.unique(ids[ids >= 0]).tolist()), "every clone exactly once"
    assert_exactly_once(per_rank, np.flatnonzero(ids >= 0))
    s = make(rank=rank, num_replicas=world)
    assert same_draw(list(s), per_rank[rank])
    b = per_rank[rank][0]
    np.testing.assert_array_equal(s.clones_of(b), ids[b])


def test_clonal_sisters_per_time_point():
    ids = np.repeat(np.arange(6), 20)
    time = np.tile(np.repeat([0, 1], 10), 6)
    ids[:3] = -1  # cells without a clone are never yielded
    s = ClonalBatchSampler(ids, time, 3, cells_per_clone=2, seed=1)
    batches = list(s)
    assert len(batches) == len(s) == 2
    for b in batches:
        assert len(b) == 3 * 2 * 2
        for c in assert_clone_blocks(b, ids, whole=False):
            members = b[ids[b] == c]
            assert np.bincount(time[members]).tolist() == [2, 2]
    # without time points, up to cells_per_clone sisters overall
    s = ClonalBatchSampler(ids, None, 6, cells_per_clone=3, seed=1)
    (b,) = list(s)
    assert len(b) == 18 and np.bincount(ids[b]).tolist() == [3] * 6
    # small clones give all they have
    s = ClonalBatchSampler([0, 1, 1, 1, -1], [0, 0, 1, 1, 0], 2, cells_per_clone=5)
    assert sorted(next(iter(s)).tolist()) == [0, 1, 2, 3]


@PROPERTY
@given(
    seed=st.integers(0, 50),
    n_clones=st.integers(1, 30),
    clones_per_batch=st.integers(1, 6),
    cells_per_clone=st.one_of(st.none(), st.integers(1, 3)),
    use_time=st.booleans(),
    world=st.integers(1, 3),
    drop_last=st.booleans(),
)
def test_clonal_properties(
    seed, n_clones, clones_per_batch, cells_per_clone, use_time, world, drop_last
):
    ids, time = random_clones(seed, n=200, n_clones=n_clones)
    present = np.unique(ids[ids >= 0])
    assume(len(present) > 0)
    time = time if use_time else None

    def make(**kw):
        return ClonalBatchSampler(
            ids,
            time,
            clones_per_batch,
            cells_per_clone=cells_per_clone,
            drop_last=drop_last,
            seed=seed,
            **kw,
        )

    C = len(present)
    feasible = C >= world * clones_per_batch if drop_last else C >= world
    if not feasible:
        with pytest.raises(ValueError, match="clones"):
            make(rank=0, num_replicas=world)
        return
    per_rank = shares(make, world)
    k = len(per_rank[0])
    pad = 0 if drop_last else max(0, world - (C - (k - 1) * world * clones_per_batch))
    if pad == 0:
        assert_disjoint(per_rank)
    seen = []
    for batches in per_rank:
        for j, b in enumerate(batches):
            order = assert_clone_blocks(b, ids, whole=cells_per_clone is None)
            if drop_last or j < len(batches) - 1:
                assert len(order) == clones_per_batch
            else:
                assert 1 <= len(order) <= clones_per_batch
            seen.extend(order.tolist())
            if cells_per_clone is not None:
                key = ids[b] * 10 + (time[b] if use_time else 0)
                assert np.bincount(key).max() <= cells_per_clone
    assert len(seen) - len(set(seen)) == pad, "only the W - r padding clones repeat"
    if drop_last:
        assert len(seen) == C - C % (world * clones_per_batch)
    else:
        assert sorted(set(seen)) == present.tolist()
        assert len(per_rank[0]) == -(-C // (world * clones_per_batch))


def test_clonal_drop_last_only_drops_the_partial_batch():
    ids = np.repeat(np.arange(11), 3)
    full = list(ClonalBatchSampler(ids, None, 4))
    assert [len(np.unique(ids[b])) for b in full] == [4, 4, 3]  # all 11 clones
    dropped = list(ClonalBatchSampler(ids, None, 4, drop_last=True))
    assert [len(np.unique(ids[b])) for b in dropped] == [4, 4]


# -- process group and errors --------------------------------------------------------------------


def test_world_from_process_group_and_late_group(monkeypatch):
    s = UniformBatchSampler(12, 2, shuffle=False)  # no group yet: (1, 0)
    assert (s.num_replicas, s.rank, len(s)) == (1, 0, 6)
    monkeypatch.setattr(samplers_module.dist, "is_available", lambda: True)
    monkeypatch.setattr(samplers_module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(samplers_module.dist, "get_world_size", lambda group=None: 3)
    monkeypatch.setattr(samplers_module.dist, "get_rank", lambda group=None: 2)
    assert len(s) == 2 and (s.num_replicas, s.rank) == (3, 2)  # picked up the group
    assert [b.tolist() for b in s] == [[4, 5], [10, 11]]
    t = UniformBatchSampler(12, 2, shuffle=False)
    assert (t.num_replicas, t.rank) == (3, 2)
    explicit = UniformBatchSampler(12, 2, num_replicas=1, rank=0)
    assert len(explicit) == 6 and explicit.num_replicas == 1  # explicit values win
    with pytest.raises(ValueError, match="cannot be shared by 3 ranks"):
        UniformBatchSampler(2, 2)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: UniformBatchSampler(10, 0), ValueError, "batch_size must be a positive integer"),
        (lambda: UniformBatchSampler(10, 2.5), ValueError, "batch_size must be a positive"),
        (lambda: UniformBatchSampler(10, True), ValueError, "batch_size must be a positive"),
        (
            lambda: UniformBatchSampler(10, 2, rank=2, num_replicas=2),
            ValueError,
            r"rank .*\[0, 1\]",
        ),
        (lambda: UniformBatchSampler(10, 2, rank=-1, num_replicas=2), ValueError, "rank must be"),
        (lambda: UniformBatchSampler(10, 2, num_replicas=0, rank=0), ValueError, "num_replicas"),
        (lambda: UniformBatchSampler(10, 2, seed=1.5), ValueError, "seed must be an integer"),
        (
            lambda: UniformBatchSampler(2, 2, num_replicas=3, rank=0),
            ValueError,
            "2 positions cannot be shared by 3 ranks",
        ),
        (
            lambda: UniformBatchSampler(15, 8, drop_last=True, num_replicas=2, rank=0),
            ValueError,
            "drop_last=True needs at least",
        ),
        (lambda: UniformBatchSampler([], 2), ValueError, "no positions"),
        (lambda: UniformBatchSampler(0, 2), ValueError, "no positions"),
        (lambda: UniformBatchSampler([0.5, 1.5], 2), TypeError, "integer positions"),
        (lambda: UniformBatchSampler([3, -1], 2), ValueError, "non-negative"),
        (lambda: UniformBatchSampler([[1, 2]], 2), ValueError, "1-D"),
        (lambda: BlockShuffleSampler(10, 2, block_size=0), ValueError, "block_size"),
        (lambda: BlockShuffleSampler(10, 2, pool_batches=0), ValueError, "pool_batches"),
        (lambda: BlockShuffleSampler(1, 1, num_replicas=2, rank=1), ValueError, "cannot be shared"),
        (lambda: TimePointBatchSampler([], 1), ValueError, "at least one group"),
        (lambda: TimePointBatchSampler([[1, 2], []], 1), ValueError, r"group\(s\) \[1\] are empty"),
        (lambda: TimePointBatchSampler([[1, 2], [3]], 0), ValueError, "cells_per_group must be"),
        (lambda: TimePointBatchSampler([[1, 2], [2, 3]], 1), ValueError, "disjoint"),
        (
            lambda: TimePointBatchSampler([[1, 2, 5], [3]], 2),
            ValueError,
            r"smallest time point \(group 1\) has 1 cells, fewer than cells_per_group=2",
        ),
        (
            lambda: TimePointBatchSampler([[1, 2], [3, 4]], 1, num_replicas=3, rank=0),
            ValueError,
            "x 3 rank",
        ),
        (
            lambda: TimePointBatchSampler([[1, 2], [3, 4]], 1, num_batches=5),
            ValueError,
            "time point 0 has only 2.*replacement=True",
        ),
        (
            lambda: TimePointBatchSampler([[1], [3]], 1, num_batches=1, num_replicas=2, rank=0),
            ValueError,
            "fewer than the 2 ranks",
        ),
        (lambda: TimePointBatchSampler([[1], [3]], 1, num_batches=0), ValueError, "num_batches"),
        (lambda: ClonalBatchSampler([-1, -1], None, 1), ValueError, "No cell has a clone"),
        (lambda: ClonalBatchSampler([], None, 1), ValueError, "No cell has a clone"),
        (lambda: ClonalBatchSampler([0, -2], None, 1), ValueError, "-1 for no clone"),
        (lambda: ClonalBatchSampler([0.0, 1.0], None, 1), TypeError, "clone_ids must be integers"),
        (lambda: ClonalBatchSampler([0, 1], [0], 1), ValueError, "one time point index"),
        (lambda: ClonalBatchSampler([0, 1], [0.5, 1], 1), TypeError, "groups_time"),
        (lambda: ClonalBatchSampler([0, 1], None, 0), ValueError, "clones_per_batch"),
        (
            lambda: ClonalBatchSampler([0, 1], None, 1, cells_per_clone=0),
            ValueError,
            "cells_per_clone",
        ),
        (
            lambda: ClonalBatchSampler([0, 0, 1], None, 1, num_replicas=3, rank=0),
            ValueError,
            "2 clones cannot be shared by 3 ranks",
        ),
        (
            lambda: ClonalBatchSampler([0, 1], None, 5, drop_last=True),
            ValueError,
            "1 x 5 = 5 clones",
        ),
    ],
)
def test_bad_arguments_raise_clear_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()
