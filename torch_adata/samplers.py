"""Batch samplers: uniform, block shuffle, time point and clone; distributed-aware.

Every sampler here yields whole batches: one 1-D int64 ``numpy`` array of dataset positions per
batch. Pass it as ``DataLoader(dataset, sampler=s, batch_size=None,
collate_fn=torch_adata.collate)`` and each batch is read with one vectorised
``dataset[positions]`` call, in worker processes too.

All samplers derive from :class:`torch.utils.data.DistributedSampler`, so Lightning keeps them
under DDP instead of injecting its own, and calls :meth:`~DistributedBatchSampler.set_epoch`
every epoch. The draw of an epoch is a pure function of ``(seed, epoch)``, identical on every
rank; each rank takes a disjoint share, and every rank yields the same number of batches
(an uneven count would hang DDP at the end of the epoch).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch.distributed as dist
from torch.utils.data import DistributedSampler


def _world(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    """Resolve (num_replicas, rank): given values, else the process group, else (1, 0)."""
    if num_replicas is None or rank is None:
        if dist.is_available() and dist.is_initialized():
            num_replicas = dist.get_world_size() if num_replicas is None else num_replicas
            rank = dist.get_rank() if rank is None else rank
        else:
            num_replicas = 1 if num_replicas is None else num_replicas
            rank = 0 if rank is None else rank
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be >= 1, got {num_replicas}.")
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank must be in [0, {num_replicas - 1}], got {rank}.")
    return int(num_replicas), int(rank)


def _positions(indices: int | Sequence[int] | np.ndarray) -> np.ndarray:
    if isinstance(indices, (int, np.integer)):
        if indices < 0:
            raise ValueError(f"The number of positions must be >= 0, got {indices}.")
        return np.arange(int(indices), dtype=np.int64)
    rows = np.asarray(indices)
    if rows.size and not np.issubdtype(rows.dtype, np.integer):
        raise TypeError(f"indices must be integer positions, got dtype {rows.dtype}.")
    return rows.astype(np.int64).reshape(-1)


def _positive(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


class DistributedBatchSampler(DistributedSampler):
    """Base class: seeded epochs, rank resolution, and ``len`` = batches per rank.

    Subclasses implement :meth:`epoch_batches`, the list of every batch of the epoch (all
    ranks), whose length is a multiple of ``num_replicas``; rank ``r`` takes batches
    ``r, r + W, r + 2W, ...``.
    """

    def __init__(
        self,
        n_positions: int,
        *,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ):
        num_replicas, rank = _world(num_replicas, rank)
        # DistributedSampler only needs len(dataset); give it explicit rank/world so it never
        # touches the process group.
        super().__init__(
            range(n_positions), num_replicas=num_replicas, rank=rank, shuffle=False, seed=seed
        )
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the draw of ``epoch`` (Lightning calls this before every epoch)."""
        self.epoch = int(epoch)

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch])

    def epoch_batches(self) -> list[np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __iter__(self) -> Iterator[np.ndarray]:
        batches = self.epoch_batches()
        return iter(batches[self.rank :: self.num_replicas])

    def __len__(self) -> int:
        return self.num_batches_per_rank()

    def num_batches_per_rank(self) -> int:
        return len(self.epoch_batches()) // self.num_replicas


def _cut(order: np.ndarray, batch_size: int, world: int, drop_last: bool) -> list[np.ndarray]:
    """Cut an epoch's order into batches for ``world`` ranks, every position exactly once.

    Without ``drop_last``: ``k = ceil(N / (world * batch_size))`` batches per rank, made of
    ``world * k`` near-equal contiguous pieces (sizes differ by at most one, none larger than
    ``batch_size``). With ``drop_last``: the trailing ``N mod (world * batch_size)`` positions
    are dropped and every batch has exactly ``batch_size``.
    """
    n = len(order)
    if drop_last:
        per_round = world * batch_size
        keep = (n // per_round) * per_round
        return [order[i : i + batch_size] for i in range(0, keep, batch_size)]
    if n < world:
        raise ValueError(
            f"{n} positions cannot be shared by {world} ranks (each needs at least one); "
            "use fewer devices or more cells."
        )
    per_rank = -(-n // (world * batch_size))
    return np.array_split(order, world * per_rank)


class UniformBatchSampler(DistributedBatchSampler):
    """Uniformly shuffled batches; every position exactly once per epoch across ranks.

    Parameters
    ----------
    indices
        ``n`` (positions ``0..n-1``) or the positions to draw from (e.g. a split's rows).
    batch_size
        Largest batch. Without ``drop_last``, batches are cut near-equal (never padded with
        repeats) so that every rank gets the same number of batches.
    shuffle
        Shuffle every epoch (seeded); otherwise keep the given order (evaluation).
    drop_last
        Drop the remainder so every batch has exactly ``batch_size`` positions.
    seed, num_replicas, rank
        Seed of the draw; world size and rank (default: from ``torch.distributed``).
    """

    def __init__(
        self,
        indices,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ):
        positions = _positions(indices)
        super().__init__(len(positions), seed=seed, num_replicas=num_replicas, rank=rank)
        self.positions = positions
        self.batch_size = _positive(batch_size, "batch_size")
        self.shuffle = shuffle
        self.drop_last = drop_last
        if len(self.positions) == 0:
            raise ValueError("UniformBatchSampler got no positions to sample from.")
        if not drop_last and len(self.positions) < self.num_replicas:
            _cut(self.positions, self.batch_size, self.num_replicas, False)  # raises

    def epoch_batches(self):
        order = self._rng().permutation(self.positions) if self.shuffle else self.positions
        return _cut(order, self.batch_size, self.num_replicas, self.drop_last)

    def num_batches_per_rank(self) -> int:
        n, w, b = len(self.positions), self.num_replicas, self.batch_size
        return n // (w * b) if self.drop_last else -(-n // (w * b))


class SequentialBatchSampler(UniformBatchSampler):
    """Batches in the given order (evaluation and prediction), shared across ranks."""

    def __init__(
        self, indices, batch_size: int, *, num_replicas: int | None = None, rank: int | None = None
    ):
        super().__init__(indices, batch_size, shuffle=False, num_replicas=num_replicas, rank=rank)


class BlockShuffleSampler(DistributedBatchSampler):
    """Batches pooled from random contiguous blocks: fewer, longer reads on disk.

    The sorted positions are cut into blocks of ``block_size`` consecutive positions; the blocks
    are shuffled; consecutive blocks are pooled until a pool fills ``pool_batches`` batches; the
    positions in each pool are shuffled and cut into batches. A batch thus holds cells from about
    ``batch_size * pool_batches / block_size`` blocks (at most ``batch_size``).

    Trade-off: a backed file is read in long runs (fast, above all on compressed or cold files),
    but cells that sit next to each other in the file (often the same sample or cluster) share
    batches more often than under uniform shuffling. Uniform is the default everywhere; measure
    batch diversity before training with this (see the performance docs). Same exactly-once and
    equal-count guarantees as :class:`UniformBatchSampler`.
    """

    def __init__(
        self,
        indices,
        batch_size: int,
        *,
        block_size: int = 64,
        pool_batches: int = 16,
        drop_last: bool = False,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ):
        positions = np.sort(_positions(indices))
        super().__init__(len(positions), seed=seed, num_replicas=num_replicas, rank=rank)
        self.positions = positions
        self.batch_size = _positive(batch_size, "batch_size")
        self.block_size = _positive(block_size, "block_size")
        self.pool_batches = _positive(pool_batches, "pool_batches")
        self.drop_last = drop_last
        if len(self.positions) == 0:
            raise ValueError("BlockShuffleSampler got no positions to sample from.")

    def epoch_batches(self):
        rng = self._rng()
        n = len(self.positions)
        starts = np.arange(0, n, self.block_size)
        blocks = [self.positions[s : s + self.block_size] for s in rng.permutation(starts)]
        order = np.concatenate(blocks)
        pool = self.batch_size * self.pool_batches
        for s in range(0, n, pool):  # shuffle within each pool, in place
            order[s : s + pool] = rng.permutation(order[s : s + pool])
        return _cut(order, self.batch_size, self.num_replicas, self.drop_last)

    def num_batches_per_rank(self) -> int:
        n, w, b = len(self.positions), self.num_replicas, self.batch_size
        return n // (w * b) if self.drop_last else -(-n // (w * b))


class TimePointBatchSampler(DistributedBatchSampler):
    """Batches of ``cells_per_group`` cells from every time point.

    A batch is ``[n cells of group 0, n cells of group 1, ...]``: slice ``[t*n:(t+1)*n]`` holds
    time point ``t``.

    Without replacement (default) no cell appears twice in an epoch: the epoch has
    ``min_t(len(group_t)) // n`` batches (rounded down to a multiple of the world size), each
    group drawn from a fresh seeded permutation, so larger groups are subsampled differently
    every epoch. With ``replacement=True`` the epoch has ``ceil(max_t len / n)`` batches and
    smaller groups are cycled through successive permutations (a cell then appears at most
    ``ceil(that * n / len(group))`` times). ``num_batches`` sets the count explicitly.

    Parameters
    ----------
    groups
        ``groups[t]``: dataset positions of time point ``t``, in time order.
    cells_per_group
        ``n``, cells per time point per batch.
    """

    def __init__(
        self,
        groups: Sequence[Sequence[int]],
        cells_per_group: int,
        *,
        replacement: bool = False,
        num_batches: int | None = None,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ):
        self.groups = [_positions(g) for g in groups]
        if len(self.groups) == 0:
            raise ValueError("TimePointBatchSampler needs at least one group of positions.")
        empty = [t for t, g in enumerate(self.groups) if len(g) == 0]
        if empty:
            raise ValueError(f"Time point groups {empty} are empty; drop them or add cells.")
        self.n = _positive(cells_per_group, "cells_per_group")
        self.replacement = replacement
        super().__init__(
            sum(len(g) for g in self.groups), seed=seed, num_replicas=num_replicas, rank=rank
        )
        smallest = min(len(g) for g in self.groups)
        if num_batches is None:
            if replacement:
                total = -(-max(len(g) for g in self.groups) // self.n)
                total = -(-total // self.num_replicas) * self.num_replicas
            else:
                total = (smallest // self.n) // self.num_replicas * self.num_replicas
        else:
            total = _positive(num_batches, "num_batches") * self.num_replicas
            if not replacement and total * self.n > smallest:
                raise ValueError(
                    f"{num_batches} batches per rank x {self.num_replicas} ranks x "
                    f"{self.n} cells need {total * self.n} cells per time point, but the smallest "
                    f"has {smallest}; pass replacement=True or ask for fewer batches."
                )
        if total == 0:
            raise ValueError(
                f"The smallest time point has {smallest} cells, fewer than cells_per_group={self.n}"
                f" x {self.num_replicas} rank(s): lower cells_per_group or pass replacement=True."
            )
        self.total = total

    def _draw(self, group: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
        rounds = -(-count // len(group))
        return np.concatenate([rng.permutation(group) for _ in range(rounds)])[:count]

    def epoch_batches(self):
        rng = self._rng()
        need = self.total * self.n
        draws = [self._draw(g, need, rng).reshape(self.total, self.n) for g in self.groups]
        return [np.concatenate([d[b] for d in draws]) for b in range(self.total)]

    def num_batches_per_rank(self) -> int:
        return self.total // self.num_replicas


class ClonalBatchSampler(DistributedBatchSampler):
    """Batches of whole clones (or sampled sisters), grouped by clone.

    Parameters
    ----------
    clone_ids
        Clone of each dataset position (``-1``: none; such cells are never yielded).
    time_index
        Time point index of each position, or ``None``. With ``cells_per_clone``, sisters are
        sampled per time point.
    clones_per_batch
        Clones in a batch.
    cells_per_clone
        ``None``: every cell of each clone. Else at most this many cells per clone and time
        point (seeded).
    drop_last
        Drop a last batch with fewer than ``clones_per_batch`` clones.

    Every clone appears at most once per epoch; batches are dealt round-robin to ranks and the
    last partial round is dropped so every rank yields the same number of batches. Within a batch
    positions are grouped by clone, in batch order; :meth:`clones_of` returns each position's
    clone.
    """

    def __init__(
        self,
        clone_ids,
        time_index=None,
        clones_per_batch: int = 16,
        *,
        cells_per_clone: int | None = None,
        drop_last: bool = False,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ):
        self.clone_ids = np.asarray(clone_ids, dtype=np.int64).reshape(-1)
        self.time_index = None if time_index is None else np.asarray(time_index, np.int64)
        if self.time_index is not None and len(self.time_index) != len(self.clone_ids):
            raise ValueError("time_index and clone_ids must have one entry per position.")
        self.clones_per_batch = _positive(clones_per_batch, "clones_per_batch")
        self.cells_per_clone = (
            None if cells_per_clone is None else _positive(cells_per_clone, "cells_per_clone")
        )
        super().__init__(len(self.clone_ids), seed=seed, num_replicas=num_replicas, rank=rank)
        self.drop_last = drop_last
        members = np.flatnonzero(self.clone_ids >= 0)
        if len(members) == 0:
            raise ValueError("No cell has a clone (every clone id is -1): nothing to sample.")
        order = members[np.argsort(self.clone_ids[members], kind="stable")]
        self.clones, starts = np.unique(self.clone_ids[order], return_index=True)
        self._members = np.split(order, starts[1:])
        n_batches = -(-len(self.clones) // self.clones_per_batch)
        if drop_last:
            n_batches = len(self.clones) // self.clones_per_batch
        self.total = n_batches // self.num_replicas * self.num_replicas
        if self.total == 0:
            raise ValueError(
                f"{len(self.clones)} clones make fewer than one batch of {self.clones_per_batch} "
                f"per rank ({self.num_replicas} ranks): lower clones_per_batch."
            )

    def _cells(self, members: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.cells_per_clone is None:
            return members
        if self.time_index is None:
            return np.sort(rng.permutation(members)[: self.cells_per_clone])
        t = self.time_index[members]
        picks = [rng.permutation(members[t == k])[: self.cells_per_clone] for k in np.unique(t)]
        return np.concatenate(picks)

    def epoch_batches(self):
        rng = self._rng()
        order = rng.permutation(len(self.clones))
        k = self.clones_per_batch
        batches = []
        for b in range(self.total):
            chosen = order[b * k : (b + 1) * k]
            batches.append(np.concatenate([self._cells(self._members[c], rng) for c in chosen]))
        return batches

    def num_batches_per_rank(self) -> int:
        return self.total // self.num_replicas

    def clones_of(self, batch: np.ndarray) -> np.ndarray:
        """Clone id of each position of a yielded batch."""
        return self.clone_ids[np.asarray(batch, dtype=np.int64)]


__all__ = [
    "BlockShuffleSampler",
    "ClonalBatchSampler",
    "DistributedBatchSampler",
    "SequentialBatchSampler",
    "TimePointBatchSampler",
    "UniformBatchSampler",
]
