"""Batch samplers: uniform, block shuffle, time point and clone; distributed-aware.

Every sampler here is a *batch* sampler: iterating it yields one batch at a time, as a 1-D
``numpy.ndarray`` of ``int64`` dataset positions. Pass it as ``sampler=`` with
``batch_size=None``::

    DataLoader(dataset, sampler=s, batch_size=None, collate_fn=...)

and the DataLoader's fetcher calls ``dataset[positions]`` once per batch (one vectorised read),
in worker processes too (the sampler itself runs in the main process).

Distributed training
--------------------
Every sampler subclasses :class:`torch.utils.data.distributed.DistributedSampler`, so
Lightning keeps it under DDP instead of injecting its own, and calls ``set_epoch(epoch)`` on it
every epoch.

- The draw of an epoch is a pure function of ``(seed, epoch)``: every rank computes the same
  list of batches and takes a disjoint share of it, batch ``j`` going to rank ``j % W``.
- Every rank yields the same number of batches (``len(sampler)``): an uneven count hangs DDP at
  the end of the epoch.
- ``batch_size`` is the batch size: every batch has exactly ``batch_size`` positions except
  each rank's last batch of the epoch, which takes a near-equal share (sizes differ by at most
  one) of what the full rounds leave, ``r``. Every position is yielded exactly once per epoch
  across ranks, except in one case: when ``0 < r < W`` (fewer left over than ranks) the first
  ``W - r`` positions of the epoch's order are yielded a second time, so every rank's last
  batch holds one (at most ``W - 1`` repeats, never on a single process). ``drop_last=True``
  instead drops the remainder: every batch is full. The time point sampler's batches have a
  fixed size; see each sampler.
- ``num_replicas`` and ``rank`` default to the initialised process group, else ``(1, 0)``. A
  sampler built with a default before the process group existed picks the group up when it is
  iterated (or asked for its length), so building it early never silently gives every rank
  all the data. Explicit values are never overridden.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch.distributed as dist
from torch.utils.data import DistributedSampler

__all__ = [
    "BlockShuffleSampler",
    "ClonalBatchSampler",
    "DistributedBatchSampler",
    "SequentialBatchSampler",
    "TimePointBatchSampler",
    "UniformBatchSampler",
]

_U64 = 2**64


# -- argument checks ----------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _positive_int(value: Any, name: str) -> int:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def _check_world(num_replicas: Any, rank: Any) -> tuple[int, int]:
    if not _is_int(num_replicas) or num_replicas < 1:
        raise ValueError(f"num_replicas must be a positive integer, got {num_replicas!r}.")
    if not _is_int(rank) or not 0 <= rank < num_replicas:
        raise ValueError(
            f"rank must be an integer in [0, {int(num_replicas) - 1}] "
            f"(num_replicas={int(num_replicas)}), got {rank!r}."
        )
    return int(num_replicas), int(rank)


def _process_group() -> tuple[int, int] | None:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return None


def _resolve_world(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    """Given values, else the initialised process group, else ``(1, 0)``; validated."""
    group = _process_group() if num_replicas is None or rank is None else None
    default_world, default_rank = group if group is not None else (1, 0)
    return _check_world(
        default_world if num_replicas is None else num_replicas,
        default_rank if rank is None else rank,
    )


def _as_positions(values: Any, name: str) -> np.ndarray:
    """A 1-D int64 array of non-negative positions (``n`` means ``0..n-1``)."""
    if _is_int(values):
        if values < 0:
            raise ValueError(f"{name}: the number of positions must be >= 0, got {values}.")
        return np.arange(int(values), dtype=np.int64)
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}.")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{name} must hold integer positions, got dtype {array.dtype}.")
    array = array.astype(np.int64, copy=True)
    if array.size and array.min() < 0:
        raise ValueError(f"{name} must hold non-negative positions, got {array.min()}.")
    return array


def _cut_offsets(
    n: int, batch_size: int, world: int, drop_last: bool, what: str
) -> tuple[np.ndarray, int]:
    """Offsets of an epoch's batches over ``n`` items, and how many items are repeated.

    Batch ``j`` is ``items[off[j]:off[j+1]]`` of the epoch's order extended by its first
    ``pad`` items, and goes to rank ``j % world``. Without ``drop_last``: every rank gets
    ``k = ceil(n / (world * batch_size))`` batches; the first ``k - 1`` rounds of ``world``
    batches are full (``batch_size`` items), and the last round shares the remaining
    ``r = n - (k - 1) * world * batch_size`` items near-equally (sizes differ by at most one),
    so each rank's last batch is the only one that can be short. Every item is used exactly
    once, except when ``0 < r < world``: then ``pad = world - r`` items are repeated so every
    rank's last batch holds one. With ``drop_last``: the trailing ``n mod (world *
    batch_size)`` items are dropped and every batch has exactly ``batch_size`` items. Raises
    when no such cut exists.
    """
    if drop_last:
        per_rank = n // (world * batch_size)
        if per_rank == 0:
            raise ValueError(
                f"drop_last=True needs at least num_replicas x batch_size = {world} x "
                f"{batch_size} = {world * batch_size} {what} for one full batch per rank, "
                f"got {n}: lower the batch size or pass drop_last=False."
            )
        return np.arange(world * per_rank + 1, dtype=np.int64) * batch_size, 0
    if n < world:
        raise ValueError(
            f"{n} {what} cannot be shared by {world} ranks (every rank needs at least one): "
            "use fewer devices or more data."
        )
    per_rank = -(-n // (world * batch_size))
    rest = n - (per_rank - 1) * world * batch_size
    pad = max(0, world - rest)
    base, extra = divmod(rest + pad, world)
    sizes = np.full(world * per_rank, batch_size, dtype=np.int64)
    sizes[-world:] = base
    sizes[len(sizes) - world : len(sizes) - world + extra] += 1
    return np.concatenate([[0], np.cumsum(sizes)]), pad


# -- base class ---------------------------------------------------------------------------------


class DistributedBatchSampler(DistributedSampler):
    """Base of the batch samplers: seeded epochs, rank resolution, equal batch counts.

    A subclass implements ``_plan()`` (validate its arguments for the current world size and
    set ``self._per_rank``, the batches each rank yields) and ``_draw(rng)`` (every batch of the
    epoch, all ranks, ``num_replicas * _per_rank`` of them). Rank ``r`` yields batches
    ``r, r + W, r + 2W, ...`` of that list.

    Parameters
    ----------
    n_positions
        Length of the dataset the positions index (kept for :class:`~torch.utils.data.distributed.DistributedSampler`).
    seed
        Seed of the draw; the draw of an epoch depends only on ``(seed, epoch)``.
    num_replicas, rank
        World size and this process's rank. ``None``: from the initialised process group,
        else ``(1, 0)``; re-read when the sampler is iterated, if the group appeared since.
    shuffle, drop_last
        Recorded for the attributes of
        :class:`~torch.utils.data.distributed.DistributedSampler`; their meaning is the
        subclass's.
    """

    def __init__(
        self,
        n_positions: int,
        *,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        if not _is_int(seed):
            raise ValueError(f"seed must be an integer, got {seed!r}.")
        world, this_rank = _resolve_world(num_replicas, rank)
        # With explicit num_replicas and rank, DistributedSampler never touches the process group.
        super().__init__(
            range(int(n_positions)),
            num_replicas=world,
            rank=this_rank,
            shuffle=bool(shuffle),
            seed=int(seed),
            drop_last=bool(drop_last),
        )
        self._given_world = (num_replicas, rank)
        self._per_rank = 0

    # subclass hooks
    def _plan(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _draw(self, rng: np.random.Generator) -> Sequence[np.ndarray]:  # pragma: no cover
        raise NotImplementedError

    # common machinery
    def _sync_world(self) -> None:
        """Adopt the process group if ``num_replicas``/``rank`` were left to default."""
        given_world, given_rank = self._given_world
        if given_world is not None and given_rank is not None:
            return
        group = _process_group()
        if group is None:
            return
        world, rank = _check_world(
            group[0] if given_world is None else given_world,
            group[1] if given_rank is None else given_rank,
        )
        if (world, rank) != (self.num_replicas, self.rank):
            self.num_replicas, self.rank = world, rank
            self._plan()

    def set_epoch(self, epoch: int) -> None:
        """Select the draw of ``epoch`` (Lightning calls this before every epoch).

        Parameters
        ----------
        epoch
            The epoch number; the draw depends only on ``(seed, epoch)``.
        """
        self.epoch = int(epoch)

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng([int(self.seed) % _U64, int(self.epoch) % _U64])

    def epoch_batches(self) -> list[np.ndarray]:
        """Every batch of the current epoch, for all ranks (rank ``r`` yields ``[r::W]``)."""
        self._sync_world()
        batches = list(self._draw(self._rng()))
        assert len(batches) == self._per_rank * self.num_replicas
        return batches

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter(self.epoch_batches()[self.rank :: self.num_replicas])

    def __len__(self) -> int:
        """Batches this rank yields per epoch (the same on every rank)."""
        self._sync_world()
        return self._per_rank

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(batches_per_rank={self._per_rank}, seed={self.seed}, "
            f"epoch={self.epoch}, rank={self.rank}, num_replicas={self.num_replicas})"
        )


# -- uniform ------------------------------------------------------------------------------------


class UniformBatchSampler(DistributedBatchSampler):
    """Uniformly shuffled batches; every position exactly once per epoch across all ranks.

    Each epoch draws a seeded permutation of ``indices`` (or keeps their order with
    ``shuffle=False``) and cuts it into batches that are dealt round-robin to the ranks.

    Batch layout and distributed rule (``N`` positions, ``W`` ranks, batch size ``B``):

    - ``drop_last=False`` (default): every rank yields ``k = ceil(N / (W * B))`` batches. The
      epoch's order is cut into contiguous pieces, piece ``j`` going to rank ``j % W``: the
      first ``W * (k - 1)`` pieces have exactly ``B`` positions, the last ``W`` (one per rank,
      its last batch) share the ``r = N - W * (k - 1) * B`` positions left near-equally (sizes
      differ by at most one). On one process: ``B, B, ..., N - (k - 1) * B``. Every position is
      yielded exactly once per epoch over all ranks, except when ``0 < r < W``: then the first
      ``W - r`` positions of the epoch's order are yielded again, one in each short last batch.
    - ``drop_last=True``: the trailing ``N mod (W * B)`` positions of the epoch's order are
      dropped (different ones each epoch when shuffling) and every batch has exactly ``B``.

    Parameters
    ----------
    indices
        ``n`` (positions ``0..n-1``) or the positions to draw from (e.g. a split's rows), each
        yielded once per epoch per entry.
    batch_size
        The batch size ``B`` (only each rank's last batch can be smaller).
    shuffle
        Draw a fresh seeded permutation every epoch; ``False`` keeps the given order
        (evaluation; see :class:`SequentialBatchSampler`).
    drop_last
        Drop the remainder so every batch has exactly ``batch_size`` positions.
    seed, num_replicas, rank
        See :class:`DistributedBatchSampler`.

    Raises
    ------
    ValueError
        ``batch_size`` < 1, no positions, fewer positions than ranks, or ``drop_last=True``
        with fewer than ``W * B`` positions.
    """

    def __init__(
        self,
        indices: int | Sequence[int] | np.ndarray,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        positions = self._prepare(_as_positions(indices, "indices"))
        if len(positions) == 0:
            raise ValueError(f"{type(self).__name__} got no positions to sample from.")
        self.batch_size = _positive_int(batch_size, "batch_size")
        super().__init__(
            int(positions.max()) + 1,
            seed=seed,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            drop_last=drop_last,
        )
        self.positions = positions
        self._plan()

    @staticmethod
    def _prepare(positions: np.ndarray) -> np.ndarray:
        return positions

    def _plan(self) -> None:
        self._offsets, self._pad = _cut_offsets(
            len(self.positions), self.batch_size, self.num_replicas, self.drop_last, "positions"
        )
        self._per_rank = (len(self._offsets) - 1) // self.num_replicas

    def _order(self, rng: np.random.Generator) -> np.ndarray:
        return rng.permutation(self.positions) if self.shuffle else self.positions

    def _draw(self, rng: np.random.Generator) -> list[np.ndarray]:
        order = self._order(rng)
        if self._pad:  # see _cut_offsets: a few repeats so every rank's last batch has one
            order = np.concatenate([order, order[: self._pad]])
        return np.split(order[: self._offsets[-1]], self._offsets[1:-1])


class SequentialBatchSampler(UniformBatchSampler):
    """:class:`UniformBatchSampler` with ``shuffle=False``: batches in the given order.

    For evaluation and prediction loaders. Batch ``j`` is the ``j``-th contiguous piece of
    ``indices``, cut as :class:`UniformBatchSampler` cuts (``batch_size`` each but every rank's
    last), and goes to rank ``j % W``. ``seed`` and ``set_epoch`` have no effect on the order.

    Parameters
    ----------
    indices
        ``n`` (positions ``0..n-1``) or the positions, in the order to yield them.
    batch_size
        The batch size (only each rank's last batch can be smaller).
    drop_last
        Drop the remainder so every batch has exactly ``batch_size`` positions.
    seed, num_replicas, rank
        See :class:`DistributedBatchSampler`.
    """

    def __init__(
        self,
        indices: int | Sequence[int] | np.ndarray,
        batch_size: int,
        *,
        drop_last: bool = False,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        super().__init__(
            indices,
            batch_size,
            shuffle=False,
            drop_last=drop_last,
            seed=seed,
            num_replicas=num_replicas,
            rank=rank,
        )


# Block shuffling with read_ahead: pools announced ahead of the one being read.
_POOLS_AHEAD = 2

# Keys of the pools announced in this process (one per pool per iteration, never reused): a
# DataLoader worker stages each pool it is handed once (see PoolBatch).
_POOL_KEYS = itertools.count()


class PoolBatch(np.ndarray):
    """A batch of positions (an ``int64`` array, as every sampler yields) that also carries
    the batches of its block-shuffle pool and of the next pool, for DataLoader workers.

    The sampler announces its pools (``read_ahead.prefetch``) in the main process, where the
    DataLoader runs it; the batches are sent to the workers as they are (pickled). A worker
    handed a ``PoolBatch`` reads the pool's batches that come to it whole into memory (and
    those of the next pool in the background) instead of reading each batch's rows one run
    at a time (see ``torch_adata.dataset.stage_pools``). Slices and other derived arrays
    carry nothing.
    """

    #: ``(key, batches, place)``: this batch's pool (a key unique in the main process, its
    #: batches in order, this batch's place among them), or ``None``
    pool: tuple | None = None
    #: ``(key, batches)`` of the next pool, or ``None`` (the last pool)
    next_pool: tuple | None = None

    def __reduce_ex__(self, protocol):
        return (_pool_batch, (np.asarray(self), self.pool, self.next_pool))


def _pool_batch(positions: np.ndarray, pool: tuple | None, next_pool: tuple | None) -> PoolBatch:
    """A :class:`PoolBatch` over ``positions`` (also how one unpickles: a module-level name)."""
    batch = positions.view(PoolBatch)
    batch.pool, batch.next_pool = pool, next_pool
    return batch


# -- block shuffle ------------------------------------------------------------------------------


class BlockShuffleSampler(UniformBatchSampler):
    """Batches pooled from shuffled contiguous blocks: fewer, more local reads on disk (opt-in).

    Each epoch:

    1. the positions, sorted, are cut into blocks of ``block_size`` consecutive entries (the
       last block may be shorter);
    2. the blocks are shuffled (seeded);
    3. the resulting order is cut into batches exactly as :class:`UniformBatchSampler` cuts its
       permutation (same sizes, same exactly-once and equal-count rules, same ``drop_last``);
    4. consecutive runs of ``pool_batches`` batches form a pool; the positions within each pool
       are shuffled and dealt back into that pool's batches. A batch thus mixes cells from up
       to about ``pool_batches * batch_size / block_size`` blocks, and never reaches outside
       its pool.

    Batches are dealt round-robin to ranks (batch ``j`` to rank ``j % W``), so every rank draws
    from every pool while each batch stays within one pool's blocks.

    Trade-off: a batch touches at most the pool's blocks (about ``pool_batches * batch_size /
    block_size`` disk regions instead of up to ``batch_size``), which makes backed and
    compressed files much cheaper to read; but cells stored next to each other (often the same
    sample, donor or cluster) share batches far more often than under uniform shuffling, which
    can bias gradient steps and destabilise training. Uniform shuffling is the default
    everywhere; raise ``pool_batches`` or lower ``block_size`` for more diverse batches.

    Parameters
    ----------
    indices
        ``n`` or the positions to draw from; they are sorted first (blocks follow storage).
    batch_size
        The batch size (only each rank's last batch can be smaller).
    block_size
        Consecutive (sorted) positions per block.
    pool_batches
        Batches per pool; the pool's positions are shuffled together.
    boundaries
        Positions where storage changes, e.g. the files of a collection
        (``dataset.source.offsets``: ``[0, n_0, n_0 + n_1, ..., n]``): a block never holds
        positions on both sides of a boundary, so it never reads past a file's end (a file's
        last block may be shorter). ``None``: one storage.
    read_ahead
        The dataset the positions index (anything with a ``prefetch(positions)`` method, e.g.
        an :class:`~torch_adata.AnnDataset` over a backed file), or ``None``. When given, this
        rank's pools are passed to ``read_ahead.prefetch`` two pools ahead of the one being
        read (the first pool as iteration starts), so a backed file's reads of the pools to
        come overlap the current pool's batches instead of stalling their first batch. Each
        pool is also read whole into memory (the next one in the background) and its batches
        gathered from there (see :meth:`AnnDataset.prefetch
        <torch_adata.AnnDataset.prefetch>`): by the main process without workers; with
        DataLoader workers, the batches carry their pools (``PoolBatch``) and each
        worker reads its share of every pool, the batches the DataLoader hands it in turn.
    drop_last, seed, num_replicas, rank
        As in :class:`UniformBatchSampler`.
    """

    def __init__(
        self,
        indices: int | Sequence[int] | np.ndarray,
        batch_size: int,
        *,
        block_size: int = 64,
        pool_batches: int = 16,
        boundaries: Sequence[int] | np.ndarray | None = None,
        read_ahead: Any = None,
        drop_last: bool = False,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        self.block_size = _positive_int(block_size, "block_size")
        self.pool_batches = _positive_int(pool_batches, "pool_batches")
        if read_ahead is not None and not callable(getattr(read_ahead, "prefetch", None)):
            raise TypeError(
                "read_ahead must be the dataset the positions index, with a prefetch(positions) "
                f"method (e.g. a torch_adata.AnnDataset), or None; got {type(read_ahead).__name__}."
            )
        self.read_ahead = read_ahead
        super().__init__(
            indices,
            batch_size,
            shuffle=True,
            drop_last=drop_last,
            seed=seed,
            num_replicas=num_replicas,
            rank=rank,
        )
        self._blocks = self._cut_blocks(boundaries)

    def _cut_blocks(self, boundaries) -> tuple[np.ndarray, np.ndarray]:
        """Start (in ``positions``) and length of every block, never across a boundary."""
        n, size = len(self.positions), self.block_size
        if boundaries is None:
            starts = np.arange(0, n, size, dtype=np.int64)
            return starts, np.minimum(size, n - starts)
        bounds = _as_positions(boundaries, "boundaries")
        if (np.diff(bounds) < 0).any():
            raise ValueError(
                "boundaries must be non-decreasing positions (e.g. dataset.source.offsets), "
                f"got {bounds[:10].tolist()}."
            )
        # runs of positions between two boundaries, each cut into blocks of block_size
        part = np.searchsorted(bounds, self.positions, side="right")
        run_starts = np.flatnonzero(np.r_[True, part[1:] != part[:-1]])
        run_lengths = np.diff(np.r_[run_starts, n])
        per_run = -(-run_lengths // size)
        first = np.repeat(run_starts, per_run)
        k = np.arange(per_run.sum()) - np.repeat(np.cumsum(per_run) - per_run, per_run)
        starts = first + k * size
        ends = np.repeat(run_starts + run_lengths, per_run)
        return starts.astype(np.int64), np.minimum(size, ends - starts).astype(np.int64)

    @staticmethod
    def _prepare(positions: np.ndarray) -> np.ndarray:
        return np.sort(positions)

    def __iter__(self) -> Iterator[np.ndarray]:
        if self.read_ahead is None:
            return super().__iter__()
        return self._announcing(self.epoch_batches())

    def _announcing(self, batches: list[np.ndarray]) -> Iterator[np.ndarray]:
        """This rank's batches, its pools announced to ``read_ahead`` ahead of their reading:
        the first alone (more would slow the first batch's own reads), the next ones once the
        first batch of the pool before them has been taken."""
        pools: dict[int, list[np.ndarray]] = {}
        for j in range(self.rank, len(batches), self.num_replicas):
            pools.setdefault(j // self.pool_batches, []).append(batches[j])
        in_order = list(pools.values())
        keyed = [(next(_POOL_KEYS), tuple(pool)) for pool in in_order]
        keyed.append(None)
        announced = 0
        for i, pool in enumerate(in_order):
            place = 0
            for stop, part in ((i + 1, pool[:1]), (i + 1 + _POOLS_AHEAD, pool[1:])):
                while announced < min(stop, len(in_order)):
                    self.read_ahead.prefetch(np.concatenate(in_order[announced]))
                    announced += 1
                for batch in part:
                    yield _pool_batch(batch, (*keyed[i], place), keyed[i + 1])
                    place += 1

    def _order(self, rng: np.random.Generator) -> np.ndarray:
        n = len(self.positions)
        block_starts, block_lengths = self._blocks
        shuffled = rng.permutation(len(block_starts))
        starts, lengths = block_starts[shuffled], block_lengths[shuffled]
        ends = np.cumsum(lengths)
        # entry i of the block order: start of its block + offset within the block
        index = np.arange(n) + np.repeat(starts - (ends - lengths), lengths)
        order = self.positions[index]
        # shuffle within pools of pool_batches consecutive batches (dropped tail: its own pool)
        sizes = np.diff(self._offsets)
        pool = np.repeat(np.arange(len(sizes)) // self.pool_batches, sizes)[:n]
        pool = np.concatenate([pool, np.full(n - len(pool), len(sizes), dtype=pool.dtype)])
        return order[np.lexsort((rng.random(n), pool))]


# -- time points --------------------------------------------------------------------------------


class TimePointBatchSampler(DistributedBatchSampler):
    """Batches of ``cells_per_group`` cells from every time point, in time order.

    A batch is ``[n cells of group 0, n cells of group 1, ...]``: ``batch[t*n:(t+1)*n]`` holds
    time point ``t``, exactly ``n`` cells per group.

    Each epoch every group is drawn from fresh seeded permutations, and batch ``b`` takes the
    ``b``-th run of ``n`` cells of every group's draw. Batches are dealt round-robin to ranks
    (batch ``j`` to rank ``j % W``); the number of batches over all ranks, ``T``, is always a
    multiple of ``W`` so every rank yields ``T / W`` batches.

    - Without replacement (default): no cell appears twice within an epoch, so ranks get
      disjoint cells. ``T = min_t(len(group_t)) // n``, rounded down to a multiple of ``W``;
      larger groups are subsampled (a different subset every epoch).
    - With ``replacement=True``: ``T = ceil(max_t(len(group_t)) / n)``, rounded up to a multiple
      of ``W``, so every cell of the largest group is seen. A group with fewer than ``T * n``
      cells is cycled through successive fresh permutations: each of its cells appears at most
      ``ceil(T * n / len(group))`` times per epoch, and a batch can hold a cell twice only where
      it spans the end of one permutation or the group has fewer than ``n`` cells.
    - ``num_batches`` sets ``T`` explicitly (over all ranks), rounded down to a multiple of
      ``W``; without replacement it must fit in the smallest group.

    Parameters
    ----------
    groups
        ``groups[t]``: dataset positions of time point ``t``, in time order; non-empty and
        disjoint.
    cells_per_group
        ``n``, cells per time point per batch.
    replacement
        Allow cells to repeat within an epoch (see above).
    num_batches
        Batches per epoch over all ranks (default: see above).
    seed, num_replicas, rank
        See :class:`DistributedBatchSampler`.

    Raises
    ------
    ValueError
        No groups, an empty group, a position in two groups (or twice in one),
        ``cells_per_group`` < 1, or too few cells for one batch per rank without replacement
        (the message names the smallest group).
    """

    def __init__(
        self,
        groups: Sequence[Sequence[int] | np.ndarray],
        cells_per_group: int,
        *,
        replacement: bool = False,
        num_batches: int | None = None,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        self.groups = [_as_positions(g, f"groups[{t}]") for t, g in enumerate(groups)]
        if not self.groups:
            raise ValueError("TimePointBatchSampler needs at least one group of positions.")
        empty = [t for t, g in enumerate(self.groups) if len(g) == 0]
        if empty:
            raise ValueError(
                f"Time point group(s) {empty} are empty: drop them or give them cells."
            )
        everything = np.concatenate(self.groups)
        unique, counts = np.unique(everything, return_counts=True)
        if len(unique) != len(everything):
            raise ValueError(
                f"{int((counts > 1).sum())} position(s) appear in more than one group or twice "
                f"in a group (e.g. {int(unique[counts > 1][0])}); groups must be disjoint."
            )
        self.cells_per_group = _positive_int(cells_per_group, "cells_per_group")
        self.replacement = bool(replacement)
        self.num_batches = (
            None if num_batches is None else _positive_int(num_batches, "num_batches")
        )
        super().__init__(
            int(unique[-1]) + 1,
            seed=seed,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=True,
        )
        self._plan()

    def _plan(self) -> None:
        n, world = self.cells_per_group, self.num_replicas
        sizes = np.array([len(g) for g in self.groups])
        small = int(sizes.argmin())
        smallest = int(sizes[small])
        if self.num_batches is not None:
            total = self.num_batches // world * world
            if total == 0:
                raise ValueError(
                    f"num_batches={self.num_batches} (over all ranks) is fewer than the "
                    f"{world} ranks: every rank needs at least one batch."
                )
            if not self.replacement and total * n > smallest:
                raise ValueError(
                    f"num_batches={self.num_batches} (used: {total}) x cells_per_group={n} needs "
                    f"{total * n} cells per time point without replacement, but time point "
                    f"{small} has only {smallest}: ask for fewer batches or pass "
                    "replacement=True."
                )
        elif self.replacement:
            total = -(-int(sizes.max()) // n)
            total = -(-total // world) * world
        else:
            total = (smallest // n) // world * world
            if total == 0:
                raise ValueError(
                    f"The smallest time point (group {small}) has {smallest} cells, fewer than "
                    f"cells_per_group={n} x {world} rank(s) = {n * world} needed for one batch "
                    "per rank without replacement: lower cells_per_group or pass "
                    "replacement=True."
                )
        self.total_batches = total
        self._per_rank = total // world

    @staticmethod
    def _cycle(group: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
        """``count`` cells from successive fresh permutations of ``group``."""
        rounds = -(-count // len(group))
        if rounds == 1:
            return rng.permutation(group)[:count]
        keys = rng.random((rounds, len(group)))
        return group[np.argsort(keys, axis=1).ravel()[:count]]

    def _draw(self, rng: np.random.Generator) -> np.ndarray:
        n, total = self.cells_per_group, self.total_batches
        draws = [self._cycle(g, total * n, rng).reshape(total, n) for g in self.groups]
        return np.ascontiguousarray(np.concatenate(draws, axis=1))  # row b is batch b

    def group_of_slot(self) -> np.ndarray:
        """Time point index of each slot of a batch: ``repeat(arange(len(groups)), n)``."""
        return np.repeat(np.arange(len(self.groups)), self.cells_per_group)


# -- clones -------------------------------------------------------------------------------------


class ClonalBatchSampler(DistributedBatchSampler):
    """Batches of whole clones (or sampled sisters), positions grouped by clone.

    Each epoch the clones are put in a seeded random order and cut into batches of
    ``clones_per_batch`` clones with the same rule as :class:`UniformBatchSampler` applies to
    cells: without ``drop_last`` every rank yields ``k = ceil(C / (W * clones_per_batch))``
    batches of exactly ``clones_per_batch`` clones but its last, which takes a near-equal share
    of the clones left; every clone appears exactly once per epoch, except that when fewer
    clones are left than ranks, the first clones of the epoch's order fill the ranks' last
    batches a second time (fewer than ``W`` repeats); with ``drop_last=True`` the last ``C mod
    (W * clones_per_batch)`` clones of the epoch's order are dropped and every batch holds
    exactly ``clones_per_batch`` clones. Batch ``j`` goes to rank ``j % W``, so ranks get disjoint clones and the same
    number of batches. (Batch sizes in cells vary with clone sizes.)

    Batch layout: the positions of one clone are contiguous, clones in the batch's random
    order; within a clone, positions are sorted by time point (when ``groups_time`` is given)
    and then by position. :meth:`clones_of` gives the clone id of every position of a batch.

    Parameters
    ----------
    clone_ids
        Clone id of each dataset position ``0..N-1``: a non-negative integer, or ``-1`` for
        cells without a clone (never yielded).
    groups_time
        Time point index of each position, or ``None``. Used to sample sisters per time point
        and to order each clone's cells.
    clones_per_batch
        Clones per batch (only each rank's last batch can hold fewer).
    cells_per_clone
        ``None``: every cell of each clone. Else at most this many cells per clone *and time
        point* (per clone overall without ``groups_time``), drawn afresh every epoch.
    drop_last
        Every batch holds exactly ``clones_per_batch`` clones (see above).
    seed, num_replicas, rank
        See :class:`DistributedBatchSampler`.

    Raises
    ------
    ValueError
        No cell with a clone, clone ids below ``-1``, mismatched lengths, fewer clones than
        ranks, or (with ``drop_last``) fewer than ``W * clones_per_batch`` clones.
    TypeError
        Non-integer clone ids or time indices.
    """

    def __init__(
        self,
        clone_ids: Sequence[int] | np.ndarray,
        groups_time: Sequence[int] | np.ndarray | None,
        clones_per_batch: int,
        *,
        cells_per_clone: int | None = None,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
    ) -> None:
        ids = self._integers(clone_ids, "clone_ids")
        if len(ids) and ids.min() < -1:
            raise ValueError(f"clone_ids must be >= 0, or -1 for no clone; got {ids.min()}.")
        time = None if groups_time is None else self._integers(groups_time, "groups_time")
        if time is not None and len(time) != len(ids):
            raise ValueError(
                f"groups_time has {len(time)} entries but clone_ids has {len(ids)}: give one "
                "time point index per position."
            )
        self.clone_ids = ids
        self.groups_time = time
        self.clones_per_batch = _positive_int(clones_per_batch, "clones_per_batch")
        self.cells_per_clone = (
            None if cells_per_clone is None else _positive_int(cells_per_clone, "cells_per_clone")
        )
        members = np.flatnonzero(ids >= 0)
        if len(members) == 0:
            raise ValueError("No cell has a clone (every clone id is -1): nothing to sample.")
        super().__init__(
            len(ids),
            seed=seed,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=True,
            drop_last=drop_last,
        )
        # Cells with a clone, sorted by (clone, time, position); clone k owns a contiguous run.
        keys = (members, ids[members]) if time is None else (members, time[members], ids[members])
        self._cells = members[np.lexsort(keys)]
        self.clones, self._clone_of_cell = np.unique(ids[self._cells], return_inverse=True)
        self._clone_of_cell = self._clone_of_cell.reshape(-1)
        # sampling groups: runs of equal (clone, time), or clones
        if time is None:
            change = np.diff(self._clone_of_cell) != 0
        else:
            t = time[self._cells]
            change = (np.diff(self._clone_of_cell) != 0) | (np.diff(t) != 0)
        self._group_of_cell = np.concatenate([[0], np.cumsum(change)])
        self._group_start = np.flatnonzero(np.concatenate([[True], change]))
        self._plan()

    @staticmethod
    def _integers(values: Any, name: str) -> np.ndarray:
        array = np.asarray(values)
        if array.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {array.shape}.")
        if array.size and not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f"{name} must be integers, got dtype {array.dtype}.")
        return array.astype(np.int64)

    @property
    def n_clones(self) -> int:
        """Number of distinct clones (cells with id ``-1`` excluded)."""
        return len(self.clones)

    def _plan(self) -> None:
        self._offsets, self._pad = _cut_offsets(
            self.n_clones, self.clones_per_batch, self.num_replicas, self.drop_last, "clones"
        )
        self._per_rank = (len(self._offsets) - 1) // self.num_replicas

    def _draw(self, rng: np.random.Generator) -> list[np.ndarray]:
        slot = np.empty(self.n_clones, dtype=np.int64)  # slot of each clone in the epoch order
        slot[rng.permutation(self.n_clones)] = np.arange(self.n_clones)
        keep = np.arange(len(self._cells))
        if self.cells_per_clone is not None:  # at most m random cells per sampling group
            by_group = np.lexsort((rng.random(len(keep)), self._group_of_cell))
            rank_in_group = np.arange(len(keep)) - self._group_start[self._group_of_cell[by_group]]
            keep = np.sort(by_group[rank_in_group < self.cells_per_clone])
        cell_slot = slot[self._clone_of_cell[keep]]
        if self._pad:  # the first clones of the order again, in slots after the last one
            again = np.flatnonzero(cell_slot < self._pad)
            keep = np.concatenate([keep, keep[again]])
            cell_slot = np.concatenate([cell_slot, cell_slot[again] + self.n_clones])
        order = np.argsort(cell_slot, kind="stable")  # keeps (time, position) within a clone
        stream, stream_slot = self._cells[keep[order]], cell_slot[order]
        bounds = np.searchsorted(stream_slot, self._offsets)
        return np.split(stream[: bounds[-1]], bounds[1:-1])

    def clones_of(self, batch: np.ndarray) -> np.ndarray:
        """Clone id of each position of a yielded batch (same order).

        Parameters
        ----------
        batch
            Positions, as yielded by this sampler.
        """
        return self.clone_ids[np.asarray(batch, dtype=np.int64)]
