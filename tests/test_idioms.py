"""Plain PyTorch idioms: ``DataLoader`` with PyTorch's default ``collate_fn``, ``random_split``
subsets, worker processes (fork and spawn), a user's own ``collate_fn`` and a Lightning
``Trainer``, every batch checked against anndata's own rows."""

from __future__ import annotations

import pickle
import random

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import check_batch, expected_matrix, make_adata
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    RandomSampler,
    StackDataset,
    Subset,
    default_collate,
    random_split,
)

import torch_adata as ta
from torch_adata import AnnDataset, SparseBatch, TimeResolvedAnnDataset

HANG_GUARD = pytest.mark.timeout(120, method="thread")
FORK_WARNING = "ignore:This process .* fork:DeprecationWarning"

# the datasets the package makes: one field, a dict of fields, sparse output, a time course
KINDS = {
    "X": {},
    "sparse": {"sparse": True},
    "fields": {"obs_keys": ["cell_type", "size"], "obsm_keys": "X_pca", "return_index": True},
    "sparse fields": {"obs_keys": "cell_type", "sparse": True, "return_index": True},
    "time": {"time": True, "return_index": True},
}


def dataset_of(kind: str, adata=None):
    adata = make_adata("csr") if adata is None else adata
    kwargs = dict(KINDS[kind])
    if kwargs.pop("time", False):
        adata.obs["day"] = np.arange(adata.n_obs) % 3 * 2.0
        return adata, TimeResolvedAnnDataset(adata, "day", **kwargs)
    return adata, AnnDataset(adata, **kwargs)


def check(dataset, ref, rows, batch) -> None:
    """``batch`` holds exactly anndata's cells at ``rows``, with the dataset's keys."""
    rows = np.asarray(rows)
    obsm_keys = [k for k in ("X_pca",) if isinstance(batch, dict) and k in batch]
    check_batch(dataset, ref, rows, batch, obsm_keys=obsm_keys)
    if isinstance(dataset, TimeResolvedAnnDataset):
        assert batch["t"].tolist() == ref.obs["day"].to_numpy()[rows].tolist()
        assert batch["t_eval"].tolist() == [0.0, 2.0, 4.0]  # batch-level: once, not stacked


def sorted_rows(x: np.ndarray) -> np.ndarray:
    return x[np.lexsort(x.T[::-1])]


def test_the_seed_idiom_on_pbmc68k_reduced():
    """The issue's code, as a new user writes it."""
    sc = pytest.importorskip("scanpy")
    adata = sc.datasets.pbmc68k_reduced()
    ds = AnnDataset(adata)
    np.testing.assert_array_equal(ds[3].numpy(), adata.X[3])
    (first,) = list(DataLoader(ds, sampler=[5]))
    np.testing.assert_array_equal(first.numpy(), adata.X[[5]])
    tr, _ = random_split(ds, [600, 100], generator=torch.Generator().manual_seed(0))
    got = torch.cat(list(DataLoader(tr, batch_size=32, shuffle=True))).numpy()
    assert got.shape == (600, adata.n_vars)  # every cell of the split once, in some order
    np.testing.assert_array_equal(sorted_rows(got), sorted_rows(adata.X[tr.indices]))
    labelled = AnnDataset(adata, obs_keys=["bulk_labels"])
    batch = next(iter(DataLoader(labelled, batch_size=32)))
    np.testing.assert_array_equal(batch["X"].numpy(), adata.X[:32])
    np.testing.assert_array_equal(
        labelled.decode("bulk_labels", batch["bulk_labels"]),
        adata.obs["bulk_labels"].to_numpy()[:32].astype(object),
    )


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize(
    "options", [{"batch_size": 1}, {"batch_size": 5}, {"batch_size": 5, "drop_last": True}]
)
def test_default_collate_gives_anndatas_rows(kind, options):
    ref, dataset = dataset_of(kind)
    order = np.random.default_rng(0).permutation(ref.n_obs)
    batches = list(DataLoader(dataset, sampler=order.tolist(), **options))
    size = options["batch_size"]
    full = len(order) // size if options.get("drop_last") else -(-len(order) // size)
    assert len(batches) == full
    for k, batch in enumerate(batches):
        check(dataset, ref, order[k * size : (k + 1) * size], batch)
        # plain types, as with torch_adata.collate
        x = batch["X"] if isinstance(batch, dict) else batch
        assert type(x) in (torch.Tensor, SparseBatch)


@pytest.mark.parametrize("kind", ["X", "fields", "sparse fields", "time"])
def test_random_split_subsets_shuffled(kind):
    ref, dataset = dataset_of(kind)
    generator = torch.Generator().manual_seed(1)
    train, val = random_split(dataset, [0.75, 0.25], generator=generator)
    for subset in (train, val):
        loader = DataLoader(subset, batch_size=4, shuffle=True, drop_last=False)
        seen = []
        for batch in loader:
            if kind == "X":
                seen.append(batch.numpy())
                continue
            rows = batch["index"].numpy()
            check(dataset, ref, rows, batch)
            seen += rows.tolist()
        if kind == "X":
            got = np.concatenate(seen)
            want = expected_matrix(ref, subset.indices)
            np.testing.assert_array_equal(sorted_rows(got), sorted_rows(want))
        else:
            assert sorted(seen) == sorted(subset.indices)


@pytest.mark.parametrize("kind", ["X", "sparse", "fields", "time"])
def test_samples_are_views_collated_back_or_restacked(kind):
    """A collate_fn sees ordinary per-cell samples (``dataset[i]``); the unchanged list
    collates to the gathered batch, a reordered or filtered one is stacked in its order."""
    ref, dataset = dataset_of(kind)
    rows = [7, 3, 30, 3, 12]
    samples = dataset.__getitems__(rows)
    assert isinstance(samples, list) and len(samples) == len(rows)
    for sample, row in zip(samples, rows, strict=True):
        one = dataset[row]
        if isinstance(one, dict):
            assert list(sample) == list(one)
            sample, one = sample["X"], one["X"]
        if isinstance(one, SparseBatch):
            assert torch.equal(sample.to_dense(), one.to_dense())
        else:
            assert torch.equal(sample, one)
    whole = default_collate(samples)
    assert ta.collate(samples) is whole  # the batch itself, not re-stacked
    check(dataset, ref, rows, whole)
    check(dataset, ref, rows[::-1], default_collate(samples[::-1]))
    check(dataset, ref, rows[1:3], default_collate(samples[1:3]))
    made = [id(s) for s in samples]
    random.Random(0).shuffle(samples)  # in place: the same list object, reordered
    order = [rows[made.index(id(s))] for s in samples]
    assert order != rows
    check(dataset, ref, order, default_collate(samples))
    check(dataset, ref, order, ta.collate(samples))


def test_sparse_cells_collate_into_one_sparse_batch():
    ref, narrow = dataset_of("sparse")
    joined = default_collate([narrow[3], narrow[0], narrow[3]])  # dataset[i]: one-row batches
    assert type(joined) is SparseBatch
    np.testing.assert_array_equal(joined.to_dense().numpy(), expected_matrix(ref, [3, 0, 3]))
    _, wide = dataset_of("sparse", make_adata("csr", n_vars=13))
    with pytest.raises(ValueError, match=r"different widths \[11, 13\].*same var_names"):
        default_collate([narrow[0], wide[0]])


def test_samples_pickle_as_plain_copies():
    _, dataset = dataset_of("X")
    row = dataset.__getitems__([4, 5])[0]
    back = pickle.loads(pickle.dumps(row))
    assert type(back) is torch.Tensor and torch.equal(back, dataset[4])
    assert type(row + 1) is torch.Tensor  # operations give plain tensors
    _, fields = dataset_of("sparse fields")
    sample = fields.__getitems__([2, 3])[1]
    back = pickle.loads(pickle.dumps(sample))
    assert type(back) is dict and type(back["X"]) is SparseBatch
    assert torch.equal(back["X"].to_dense(), fields[3]["X"].to_dense())


class Recording(AnnDataset):
    """Records what ``__getitems__`` returned (a subclass that calls ``super()``)."""

    returned: list

    def __getitems__(self, indices):
        got = super().__getitems__(indices)
        self.returned.append(type(got))
        return got


def test_fast_path_skips_the_samples_only_where_the_batch_goes_to_collate():
    ref = make_adata("csr")
    dataset = Recording(ref, obs_keys="cell_type")
    dataset.returned = []
    fast = DataLoader(dataset, batch_size=8, shuffle=True, collate_fn=ta.collate)
    subset = DataLoader(Subset(dataset, range(20)), batch_size=8, collate_fn=ta.collate)
    for loader in (fast, subset):
        dataset.returned.clear()
        assert all(isinstance(b, dict) for b in loader)
        assert set(dataset.returned) == {dict}  # the batch, no per-cell samples made
    dataset.returned.clear()
    plain = list(DataLoader(dataset, batch_size=8))
    assert len(plain) == 5 and issubclass(dataset.returned[0], list)
    check(dataset, ref, range(8), plain[0])
    # a dataset of datasets takes the samples apart (it needs them, so they are made)
    stacked = StackDataset(dataset, AnnDataset(ref, X=False, obs_keys="size"))
    (left, right), *_ = DataLoader(stacked, batch_size=8)
    check(dataset, ref, range(8), left)
    assert right.tolist() == ref.obs["size"].to_numpy(np.float32)[:8].tolist()


def test_batch_size_none_keeps_its_meanings():
    ref, dataset = dataset_of("fields")
    cells = list(DataLoader(dataset, batch_size=None, sampler=[4, 2]))
    assert [c["index"].item() for c in cells] == [4, 2]  # one cell each: dataset[i]
    assert cells[0]["X"].shape == (ref.n_vars,)
    batches = BatchSampler(RandomSampler(dataset), 8, drop_last=False)
    for batch in DataLoader(dataset, sampler=batches, batch_size=None):
        check(dataset, ref, batch["index"].numpy(), batch)


def test_a_batch_sampler_given_as_sampler_needs_batch_size_none():
    _, dataset = dataset_of("time")
    loader = DataLoader(dataset, sampler=dataset.batch_sampler(cells_per_time=4))
    with pytest.raises(TypeError, match=r"batch_size=None"):
        next(iter(loader))
    # as batch_sampler= it works, one vectorised read per batch
    batch = next(iter(DataLoader(dataset, batch_sampler=dataset.batch_sampler(cells_per_time=4))))
    assert batch["t"].tolist() == [0.0] * 4 + [2.0] * 4 + [4.0] * 4


@HANG_GUARD
@pytest.mark.filterwarnings(FORK_WARNING)
@pytest.mark.parametrize("kind", ["X", "fields", "sparse fields", "time"])
def test_fork_workers_with_default_collate(kind):
    ref, dataset = dataset_of(kind)
    dataset[[0, 1]]  # read in the parent first
    order = np.random.default_rng(2).permutation(ref.n_obs)
    loader = DataLoader(
        dataset,
        batch_size=5,
        sampler=order.tolist(),
        num_workers=2,
        multiprocessing_context="fork",
    )
    batches = list(loader)
    assert len(batches) == -(-ref.n_obs // 5)
    for k, batch in enumerate(batches):
        check(dataset, ref, order[k * 5 : (k + 1) * 5], batch)


@HANG_GUARD
def test_spawn_workers_over_random_split_subsets():
    ref, dataset = dataset_of("sparse fields")
    train, _ = random_split(dataset, [30, 7], generator=torch.Generator().manual_seed(0))
    loader = DataLoader(
        train, batch_size=8, shuffle=True, num_workers=1, multiprocessing_context="spawn"
    )
    seen = []
    for batch in loader:
        rows = batch["index"].numpy()
        check(dataset, ref, rows, batch)
        seen += rows.tolist()
    assert sorted(seen) == sorted(train.indices)


def stack_rows(samples):
    """A user's own collate_fn: stacks the rows' expression, keeps the labels as a list."""
    return torch.stack([s["X"] for s in samples]), [int(s["index"]) for s in samples]


def keep_rows(samples):
    """A user's own collate_fn that returns the samples' rows themselves."""
    return [s["X"] for s in samples], [int(s["index"]) for s in samples]


def ring_data():
    ref = make_adata("dense", n_obs=240, n_vars=4500)  # batches of 64: 1.1 MiB in float32
    loader_kwargs = {"num_workers": 2, "multiprocessing_context": "fork"}
    return ref, loader_kwargs


@HANG_GUARD
@pytest.mark.filterwarnings(FORK_WARNING)
def test_default_collate_in_workers_with_shared_memory_rings():
    ref, loader_kwargs = ring_data()
    dataset = AnnDataset(ref)  # one field: the rows of a ring batch are _Row views
    order = np.random.default_rng(3).permutation(ref.n_obs)
    kept = list(DataLoader(dataset, batch_size=64, sampler=order.tolist(), **loader_kwargs))
    for k, batch in enumerate(kept):
        assert type(batch) is torch.Tensor
        np.testing.assert_array_equal(
            batch.numpy(), expected_matrix(ref, order[k * 64 : (k + 1) * 64])
        )


def reversed_default(samples):
    """A user's own collate_fn that reorders the samples: they are stacked, not passed on."""
    return default_collate(samples[::-1])


@HANG_GUARD
@pytest.mark.filterwarnings(FORK_WARNING)
@pytest.mark.parametrize("collate_fn", [stack_rows, keep_rows, reversed_default, None])
def test_user_collate_in_workers_with_shared_memory_rings(collate_fn):
    """Batches of >= 1 MiB live in the workers' reused shared-memory slots: rows handed to a
    user's collate_fn must keep their slot busy, and rows sent on must be copies, so that no
    batch is overwritten by a later one while it is in use. Every batch is kept to the end."""
    ref, loader_kwargs = ring_data()
    dataset = AnnDataset(ref, return_index=True)
    loader = DataLoader(
        dataset,
        batch_size=64,
        shuffle=True,
        collate_fn=collate_fn,
        generator=torch.Generator().manual_seed(0),
        **loader_kwargs,
    )
    for _ in range(2):
        kept = list(loader)
        seen = []
        for batch in kept:
            if collate_fn in (None, reversed_default):
                x, rows = batch["X"], batch["index"].tolist()
                assert type(x) is torch.Tensor
            else:
                x, rows = batch
            x = torch.stack(x) if isinstance(x, list) else x
            np.testing.assert_array_equal(x.numpy(), expected_matrix(ref, rows))
            seen += rows
        assert sorted(seen) == list(range(ref.n_obs))


class Classifier(pl.LightningModule):
    def __init__(self, n_vars: int, n_classes: int):
        super().__init__()
        self.net = torch.nn.Linear(n_vars, n_classes)
        self.seen = 0

    def training_step(self, batch, batch_idx):
        self.seen += len(batch["cell_type"])
        logits = self.net(batch["X"])
        return torch.nn.functional.cross_entropy(logits, batch["cell_type"])

    def validation_step(self, batch, batch_idx):
        self.log(
            "val_loss", torch.nn.functional.cross_entropy(self.net(batch["X"]), batch["cell_type"])
        )

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_trainer_on_plain_loaders(tmp_path):
    ref = make_adata("csr")
    dataset = AnnDataset(ref, obs_keys="cell_type")
    train, val = random_split(dataset, [30, 7], generator=torch.Generator().manual_seed(0))
    model = Classifier(ref.n_vars, len(dataset.encoders["cell_type"].categories))
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(
        model,
        DataLoader(train, batch_size=8, shuffle=True),
        DataLoader(val, batch_size=8),
    )
    assert model.seen == 2 * 30
    assert torch.isfinite(trainer.callback_metrics["val_loss"])


def test_a_data_modules_split_in_a_plain_loader():
    ref = make_adata("csr")
    dm = ta.AnnDataModule(
        ref,
        fields=ta.Fields(obs_keys=["cell_type"], return_index=True),
        split=ta.Split(val_size=0.25),
        seed=0,
    )
    dm.setup("fit")
    split = dm.loader("train").dataset
    seen = []
    for batch in DataLoader(split, batch_size=4, shuffle=True):
        rows = batch["index"].numpy()
        check(dm.dataset, ref, rows, batch)
        seen += rows.tolist()
    assert sorted(seen) == sorted(dm.splits["train"].tolist())
