"""Trajectory example: flow and score matching on optimal-transport pairs of cells between days.

Cells are only observed as snapshots (days 2, 4, 6). A velocity field ``v(x, t)`` moves cells
forward in a low-dimensional space: by default PCA 50 of the counts (log1p, 2,000 variable
genes, scaling: :func:`torch_adata.datasets.preprocess`, run by the data module), the
representation a user computes and the only one on LARRY; or the simulator's latent space
(``--embedding latent``). Each training step pairs the cells of consecutive training days in the
batch by an exact optimal-transport plan (POT) and regresses ``v`` onto the velocity of the
path between each pair, at a random point of it (conditional flow matching with minibatch OT
couplings). By default the path is a Brownian bridge that diffuses in the leading dimensions
only (PCA: the first 3 components; latent: clock and fate axis), a second network learns its
score, and cells are carried by the SDE ``dx = (v + sigma**2 / 2 * score) dt + sigma dW``
(Euler-Maruyama; ``--no-sde``: the ODE ``dx = v dt``, RK4). Batches come from
``torch_adata.AnnDataModule(time=TimeSampling("Time point", mode="populations"))``: rows
``[k*n:(k+1)*n]`` of a batch are cells of time point ``k``.

Day 4 is held out of training, then one model is evaluated three times, each next to baselines
computed in the same run and written beside it in ``metrics.json``:

a. interpolation: day-2 cells pushed to day 4 against the held-out day-4 cells, next to the
   McCann (displacement) interpolation of the exact OT plan between days 2 and 6 and the
   "earlier population" and "later population" guesses, all scored with the same Sinkhorn
   divergence (geomloss); the divergence between two halves of day 4 is the sampling floor;
b. fate prediction: every day-2 cell pushed to day 6 (16 paths of the SDE each,
   ``--fate-samples``), fate bias = Neutrophil / (Neutrophil + Monocyte) among the nearest
   annotated day-6 cells of its end points (averaged over the paths), scored (Pearson r,
   AUROC of truth > 0.5) against the simulator's oracle (``obs["fate_bias_oracle"]``) or, on
   LARRY, the clonal fate of the Weinreb et al. benchmark; next to the fates the exact and the
   entropic (Waddington-OT) OT plans from day 2 to day 6 carry, and a kNN on the day-2
   positions (no dynamics). On the simulated data every method is also scored against the
   clonal truth;
c. branches: the share of pushed day-2 cells on each day-6 branch (kNN label) against the
   observed share, and the divergence between predicted and observed cells of each branch.

Figures (10,000 cells, defaults; seeds 0-2 in both spaces): ``docs/_static/
trajectory_seeds.json``, written by ``benchmarks/trajectory_seeds.py`` and tabulated in the
docs (examples), with every variant tried. In short: in both spaces the model's day 4 is
below McCann interpolation's and its day-6 share of every branch within 0.05 of the observed;
on fates it beats every OT and kNN baseline in the latent space, and in PCA 50 the exact plan
and kNN, not the entropic plan, with the counting noise setting a floor under both figures.
The SDE resolves the two day-6 branches in PCA (an ODE gives one broad cloud between them).
The learning rate matters: at 1e-3 the field was under-fitted and smoothed the small
undifferentiated day-6 cluster into the branches (``--lr``, default 3e-3).

Run::

    python examples/trajectory.py --out outputs/trajectory

Outputs in ``--out``: ``metrics.json`` and ``metrics.csv`` (the evaluations, model and
baselines), ``model.ckpt``, ``logs/`` (Lightning's per-epoch loss), ``losses.png``,
``populations.png``, ``fate_bias.png`` and ``predictions.h5ad`` (``obs["fate_bias_pred"]`` and
``obsm["X_pred_day<t>"]``, each cell pushed to every later time point, one path of the SDE;
NaN where undefined).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import anndata as ad
import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from geomloss import SamplesLoss
from lightning.pytorch.loggers import CSVLogger

import torch_adata as ta

TIME_KEY = "Time point"
LABEL_KEY = "Cell type annotation"
FATES = ("Neutrophil", "Monocyte")  # fate bias = P(first) / (P(first) + P(second))
HELD_OUT_DAY = 4
BLUR = 0.05  # Sinkhorn blur of the evaluations, in normalised units
# the script's stochastic model per space: diffusion per sqrt(day) (normalised units) in the
# leading dimensions only (PCA: the three components of the branching; latent: clock and fate)
SDE_DEFAULTS = {"pca": {"sigma": 0.1, "noise_dims": 3}, "latent": {"sigma": 0.05, "noise_dims": 2}}
OT_EPSILON = 0.05  # entropic OT baseline: regularisation relative to the mean cost (WOT)


# --------------------------------------------------------------------------- the model


class DriftModel(pl.LightningModule):
    """Cells move by ``dx = v(x, t) dt`` (an ODE), or by the SDE
    ``dx = (v + sigma**2 / 2 * score) dt + sigma dW`` (``sde=True``), in a normalised
    embedding; ``v`` (and ``score``) are fitted by conditional flow (and score) matching on
    minibatch optimal-transport pairs.

    Each training step pairs the cells of consecutive training days in the batch by an exact
    optimal-transport plan (POT's ``ot.emd``, squared Euclidean cost), draws a time between the
    two days for every pair, and regresses ``v`` at a point of the path between the pair onto
    the path's velocity. With ``sigma > 0`` the path is a Brownian bridge of diffusion ``sigma``
    (in the first ``noise_dims`` dimensions) and ``v`` its probability-flow velocity; with
    ``sde=True`` a second network learns the bridges' score by denoising score matching, and
    cells are carried by Euler-Maruyama (simulation-free score and flow matching, Tong et al.
    2024). The SDE lets two cells at one place reach different branches: an ODE must send a
    cell whose fate its coordinates do not tell (counting noise, in PCA) to one place, and a
    smooth ``v`` sends it between the branches.
    The sizes and the normalisation are read from the data module in :meth:`setup` unless given
    (so a CLI config need not know them); they are saved in checkpoints.

    Parameters
    ----------
    obsm_key
        The obsm key of the embedding in the batches.
    dim
        Dimension of the embedding.
    center, scale
        The embedding is normalised as ``(x - center) / scale`` (per dimension; see
        :func:`normalisation`), so the loss and ``sigma`` do not depend on its units.
    time_points
        Every time point of the data (held-out ones included), for :meth:`predict_step`.
    train_time_points
        The training days (the bridges' ends, for :meth:`bridge_spread`); ``time_points`` if
        not given.
    hidden
        Width of the three hidden layers of the velocity (and score) MLP.
    sigma
        Diffusion of the Brownian bridge between paired cells, in normalised units per
        sqrt(day); 0 gives straight lines (displacement interpolation).
    sde
        Learn the score too and carry cells by the SDE (needs ``sigma > 0``); otherwise by the
        probability-flow ODE.
    noise_dims
        The bridges (and the SDE) diffuse in the first ``noise_dims`` dimensions only (the
        leading principal components); all when ``None``.
    dt
        Integration step in days: fixed-step RK4 (the ODE, default 0.25) or Euler-Maruyama
        (the SDE, default 0.05).
    lr
        Adam learning rate at the first step, decayed to 0 (cosine) by the last.
    """

    def __init__(
        self,
        obsm_key: str = "X_pca",
        dim: int | None = None,
        center: list[float] | None = None,
        scale: list[float] | None = None,
        time_points: list[float] | None = None,
        train_time_points: list[float] | None = None,
        hidden: int = 256,
        sigma: float = 0.0,
        sde: bool = False,
        noise_dims: int | None = None,
        dt: float | None = None,
        lr: float = 1e-3,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.velocity = self.score = None
        if sde and sigma <= 0:
            raise ValueError("sde=True needs sigma > 0 (the diffusion); pass e.g. sigma=0.2.")
        if None not in (dim, center, scale, time_points):
            self._build()

    def _build(self) -> None:
        dim, hidden = self.hparams.dim, self.hparams.hidden
        self.register_buffer("center", torch.as_tensor(self.hparams.center).float())
        self.register_buffer("scale", torch.as_tensor(self.hparams.scale).float())

        def mlp() -> torch.nn.Sequential:
            return torch.nn.Sequential(
                torch.nn.Linear(dim + 1, hidden),
                torch.nn.SiLU(),
                torch.nn.Linear(hidden, hidden),
                torch.nn.SiLU(),
                torch.nn.Linear(hidden, hidden),
                torch.nn.SiLU(),
                torch.nn.Linear(hidden, dim),
            )

        self.velocity = mlp()
        self.score = mlp() if self.hparams.sde else None

    def setup(self, stage: str) -> None:
        if self.velocity is None:  # sizes and normalisation from the training cells
            dm = self.trainer.datamodule
            gathered = dm.dataset.gather(dm.splits["train"])
            train = gathered[self.hparams.obsm_key].numpy()
            center, scale = normalisation(train)
            self.hparams.update(
                dim=train.shape[1],
                center=center,
                scale=scale,
                time_points=dm.dataset.time_points.tolist(),
                train_time_points=torch.unique(gathered["t"]).tolist(),
            )
            self._build()

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.center) / self.scale

    def denormalise(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.scale + self.center

    def forward(self, z: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """Velocity (normalised units per day) at positions ``z`` and time ``t`` (days)."""
        t = torch.as_tensor(t, dtype=z.dtype, device=z.device)
        t = t.expand(len(z), 1) if t.dim() < 2 else t
        return self.velocity(torch.cat([z, t], dim=1))

    @property
    def step(self) -> float:
        """Integration step in days: ``dt``, or 0.25 (RK4) / 0.05 (Euler-Maruyama)."""
        if self.hparams.dt is not None:
            return self.hparams.dt
        return 0.05 if self.hparams.sde else 0.25

    def integrate(self, z: torch.Tensor, t0: float, t1: float) -> torch.Tensor:
        """From time ``t0`` to ``t1`` (days): fixed-step RK4 of ``v``, or with ``sde=True``
        one Euler-Maruyama path per cell of ``dz = (v + sigma**2 / 2 * score) dt + sigma dW``
        (draws from torch's global generator)."""
        n_steps = max(1, math.ceil(abs(t1 - t0) / self.step - 1e-9))
        h = (t1 - t0) / n_steps
        if self.hparams.sde:
            sigma = self.hparams.sigma
            for step in range(n_steps):
                t = t0 + step * h
                mask = self.noise_mask(z)
                score = self.score_at(z, t) / self.bridge_spread(t)
                drift = self(z, t) + sigma**2 / 2 * score * mask
                z = z + h * drift + sigma * math.sqrt(abs(h)) * torch.randn_like(z) * mask
            return z
        for step in range(n_steps):
            t = t0 + step * h
            k1 = self(z, t)
            k2 = self(z + h / 2 * k1, t + h / 2)
            k3 = self(z + h / 2 * k2, t + h / 2)
            k4 = self(z + h * k3, t + h)
            z = z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        return z

    def noise_mask(self, z: torch.Tensor) -> torch.Tensor:
        """1 on the dimensions that diffuse (the first ``noise_dims``; all by default), else 0."""
        mask = torch.zeros(z.shape[1], dtype=z.dtype, device=z.device)
        mask[: self.hparams.noise_dims] = 1
        return mask

    def bridge_spread(self, t: float) -> float:
        """Standard deviation of the bridges at time ``t`` (days): ``sigma * sqrt(D s (1 - s))``
        in the training interval ``[a, a + D]`` that holds ``t``, ``s = (t - a) / D`` kept in
        ``[0.01, 0.99]`` as in training."""
        days = self.hparams.train_time_points or self.hparams.time_points
        start = max([d for d in days[:-1] if d <= t], default=days[0])
        stop = min(d for d in days if d > start)
        s = min(max((t - start) / (stop - start), 0.01), 0.99)
        return self.hparams.sigma * math.sqrt((stop - start) * s * (1 - s))

    def score_at(self, z: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """The score net's output: ``grad log p_t(z)`` of the bridges' marginal times their
        standard deviation (:meth:`bridge_spread`; ``sde=True`` only)."""
        t = torch.as_tensor(t, dtype=z.dtype, device=z.device)
        t = t.expand(len(z), 1) if t.dim() < 2 else t
        return self.score(torch.cat([z, t], dim=1))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        z, t = self.normalise(batch[self.hparams.obsm_key]), batch["t"]
        times = torch.unique(t).tolist()  # the time points of this batch, in order
        loss = z.new_zeros(())
        for start, stop in itertools.pairwise(times):
            source, target = z[t == start], z[t == stop]
            target = target[ot_pairs(source, target)]  # exact OT pairing of the minibatch
            s = torch.rand(len(source), 1, device=z.device) * 0.98 + 0.01  # fraction of the way
            duration = stop - start
            mean = (1 - s) * source + s * target
            # a Brownian bridge of diffusion sigma per sqrt(day) between the pair
            spread = self.hparams.sigma * torch.sqrt(duration * s * (1 - s))
            epsilon = torch.randn_like(source) * self.noise_mask(source)
            noise = spread * epsilon
            # the bridge's probability-flow velocity, per interval
            flow = target - source + (1 - 2 * s) / (2 * s * (1 - s)) * noise
            x, time_ = mean + noise, start + s * duration
            predicted = self(x, time_)
            loss = loss + ((predicted - flow / duration) ** 2).sum(1).mean() * duration**2
            if self.hparams.sde:  # denoising score matching, weighted by the bridge's variance
                loss = loss + ((self.score_at(x, time_) + epsilon) ** 2).sum(1).mean()
        self.log(
            "train_loss",
            loss,
            prog_bar=True,
            on_epoch=True,
            on_step=False,
            batch_size=len(t),  # "t_eval" has another length: Lightning cannot infer it
        )
        return loss

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict:
        """Every cell pushed to every later time point (NaN at its own and earlier ones)."""
        z, t = self.normalise(batch[self.hparams.obsm_key]), batch["t"]
        times = self.hparams.time_points or torch.unique(t).tolist()
        out = {}
        for stop in times:
            pushed = torch.full_like(z, float("nan"))
            for start in (s for s in times if s < stop):
                rows = t == start
                if rows.any():
                    pushed[rows] = self.integrate(z[rows], start, stop)
            out[f"X_pred_day{stop:g}"] = self.denormalise(pushed)
        return out

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def ot_pairs(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """For each source row, the index of its target row in an exact OT plan (POT ``ot.emd``).

    Squared Euclidean cost, uniform weights. With as many rows on both sides the plan is a
    permutation; otherwise each source row takes the target that carries most of its mass.
    """
    import ot

    cost = ot.dist(source.detach().double().cpu().numpy(), target.detach().double().cpu().numpy())
    plan = ot.emd(ot.unif(len(source)), ot.unif(len(target)), cost, numItermax=1_000_000)
    return torch.as_tensor(plan.argmax(1), device=source.device)


# --------------------------------------------------------------------------- the data


def make_datamodule(
    dataset: str = "simulated",
    *,
    embedding: str = "latent",
    n_cells: int = 10_000,
    cells_per_time: int = 256,
    seed: int = 0,
) -> ta.AnnDataModule:
    """Batches of ``cells_per_time`` cells per training day, the held-out day in the test split.

    ``dataset`` is ``"simulated"``, ``"larry"`` or a path to an ``.h5ad`` file with LARRY's
    schema (``Time point``, ``Cell type annotation``, ``obsm["X_clone"]``), e.g. LARRY saved
    after a first download.

    ``embedding="latent"`` batches the simulator's ``obsm["X_latent"]``; ``"pca"`` batches
    ``obsm["X_pca"]`` (log1p, 2,000 variable genes, scaling, PCA 50:
    :func:`torch_adata.datasets.preprocess`).
    """
    is_file = str(dataset).endswith(".h5ad")
    if dataset not in ("simulated", "larry") and not is_file:
        raise ValueError(
            f"dataset must be 'simulated', 'larry' or a path to an .h5ad file with LARRY's "
            f"schema, got {dataset!r}."
        )
    if is_file and not Path(dataset).is_file():
        raise FileNotFoundError(f"No .h5ad file at {dataset!r}: give an existing path.")
    if embedding not in ("pca", "latent"):
        raise ValueError(f"embedding must be 'pca' or 'latent', got {embedding!r}.")
    if embedding == "latent" and dataset != "simulated":
        raise ValueError("Only the simulated dataset has a latent space; use embedding='pca'.")
    return ta.AnnDataModule(
        dataset,
        load_kwargs={"n_cells": n_cells, "seed": seed} if dataset == "simulated" else None,
        preprocess={"n_pcs": 50} if embedding == "pca" else None,
        fields=ta.Fields(X=False, obsm_keys=[obsm_key(embedding)]),
        time=ta.TimeSampling(TIME_KEY, mode="populations", cells_per_time=cells_per_time),
        split=ta.Split(holdout={TIME_KEY: [HELD_OUT_DAY]}),
        seed=seed,
    )


def obsm_key(embedding: str) -> str:
    return {"pca": "X_pca", "latent": "X_latent"}[embedding]


def normalisation(x: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-dimension mean, and one scale for every dimension: the RMS distance to the mean.

    One scale keeps the geometry (a per-dimension scale would inflate noisy low-variance PCs).
    """
    center = x.mean(0)
    scale = float(np.sqrt(((x - center) ** 2).sum(1).mean())) or 1.0
    return center.tolist(), [scale] * x.shape[1]


# --------------------------------------------------------------------------- evaluation


def population_distance(
    a: torch.Tensor, b: torch.Tensor, blur: float = BLUR, max_cells: int = 2000, seed: int = 0
) -> float:
    """Debiased Sinkhorn divergence (p=2, geomloss) between two point clouds, each
    subsampled to ``max_cells``."""
    generator = torch.Generator().manual_seed(seed)

    def subsample(x):
        if len(x) <= max_cells:
            return x
        return x[torch.randperm(len(x), generator=generator)[:max_cells].to(x.device)]

    return float(SamplesLoss("sinkhorn", p=2, blur=blur)(subsample(a), subsample(b)))


def ot_plan(source: np.ndarray, target: np.ndarray, entropic: float | None = None) -> np.ndarray:
    """Optimal-transport plan between two clouds (uniform weights, squared Euclidean cost).

    Exact (POT ``ot.emd``) by default; ``entropic`` is the regularisation relative to the mean
    cost (Waddington-OT's convention; POT ``ot.sinkhorn``, log-domain).
    """
    import ot

    cost = ot.dist(np.asarray(source, np.float64), np.asarray(target, np.float64))
    a, b = ot.unif(len(source)), ot.unif(len(target))
    if entropic is None:
        return ot.emd(a, b, cost, numItermax=10_000_000)
    cost /= cost.mean()
    return ot.sinkhorn(a, b, cost, entropic, numItermax=2000, stopThr=1e-7)


def chunked_plans(
    n_source: int, n_target: int, max_cells: int, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Random blocks of source and target rows for separate OT problems of at most
    ``max_cells`` rows a side (one block, all rows, when both fit)."""
    n_blocks = max(1, math.ceil(max(n_source, n_target) / max_cells))
    rng = np.random.default_rng(seed)
    sources = np.array_split(rng.permutation(n_source), n_blocks)
    targets = np.array_split(rng.permutation(n_target), n_blocks)
    return list(zip(sources, targets, strict=True))


def day_plans(
    source: np.ndarray,
    target: np.ndarray,
    entropic: float | None = None,
    max_cells: int = 6000,
    seed: int = 0,
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """OT plans between two days as ``(source rows, target rows, plan)`` blocks: one block
    with every cell, or random blocks of at most ``max_cells`` a side (:func:`chunked_plans`)."""
    return [
        (rows, cols, ot_plan(source[rows], target[cols], entropic))
        for rows, cols in chunked_plans(len(source), len(target), max_cells, seed)
    ]


def mccann_interpolation(
    source: np.ndarray,
    target: np.ndarray,
    fraction: float,
    plans: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    n_samples: int = 2000,
    seed: int = 0,
) -> np.ndarray:
    """Displacement (McCann) interpolation: ``n_samples`` points ``(1 - f) x + f y`` of pairs
    ``(x, y)`` drawn from the exact OT ``plans`` (:func:`day_plans`) between ``source`` and
    ``target``."""
    rng = np.random.default_rng(seed)
    points = []
    for rows, cols, plan in plans:
        i, j = np.nonzero(plan)
        mass = plan[i, j] / plan[i, j].sum()
        pick = rng.choice(len(mass), size=math.ceil(n_samples / len(plans)), p=mass)
        points.append((1 - fraction) * source[rows][i[pick]] + fraction * target[cols][j[pick]])
    return np.concatenate(points)[:n_samples].astype(np.float32)


@torch.no_grad()
def evaluate_interpolation(
    model: DriftModel,
    embedding: np.ndarray,
    times: np.ndarray,
    held_out: float,
    seed: int = 0,
    plans: list | None = None,
) -> dict[str, float]:
    """Distance to the held-out population: the model (pushed from the previous day) next to
    the earlier and later populations and the McCann interpolation between them (exact OT;
    ``plans`` from :func:`day_plans` on the normalised embedding of the two days, computed
    when not given).

    ``observed_halves`` is the distance between two random halves of the held-out cells: the
    floor that sampling noise puts under every figure in this space.
    """
    points = np.unique(times)
    k = int(np.searchsorted(points, held_out))
    if not 0 < k < len(points) - 1 or points[k] != held_out:
        raise ValueError(f"held_out={held_out} must be an inner time point of {points.tolist()}.")
    before, after = float(points[k - 1]), float(points[k + 1])
    z = model.normalise(torch.as_tensor(embedding, dtype=torch.float32, device=model.device))
    t = torch.as_tensor(times, device=model.device)
    earlier, target, later = z[t == before], z[t == held_out], z[t == after]
    predicted = model.integrate(earlier, before, held_out)
    fraction = (held_out - before) / (after - before)
    earlier_np, later_np = earlier.cpu().numpy(), later.cpu().numpy()
    plans = plans if plans is not None else day_plans(earlier_np, later_np, seed=seed)
    mccann = mccann_interpolation(
        earlier_np, later_np, fraction, plans, n_samples=len(earlier), seed=seed
    )
    halves = torch.randperm(len(target), generator=torch.Generator().manual_seed(seed))
    half = len(target) // 2

    def distance(a):
        return population_distance(a, target, seed=seed)

    return {
        "model": distance(predicted),
        "mccann_interpolation": distance(torch.as_tensor(mccann, device=z.device)),
        "earlier_population": distance(earlier),
        "later_population": distance(later),
        "observed_halves": population_distance(
            target[halves[:half]], target[halves[half:]], seed=seed
        ),
    }


def bias_from_shares(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """``first / (first + second)``, 0.5 where both are 0."""
    committed = first + second
    return np.where(committed > 0, first / np.where(committed > 0, committed, 1), 0.5)


def knn_fate_shares(
    query: np.ndarray, reference: np.ndarray, reference_labels: np.ndarray, n_neighbors: int = 30
) -> tuple[np.ndarray, np.ndarray]:
    """Shares of ``FATES[0]`` and ``FATES[1]`` among each query point's nearest reference cells."""
    from sklearn.neighbors import KNeighborsClassifier

    knn = KNeighborsClassifier(n_neighbors=n_neighbors).fit(reference, reference_labels)
    proba = knn.predict_proba(query)
    share = {c: proba[:, i] for i, c in enumerate(knn.classes_)}
    first, second = (share.get(fate, np.zeros(len(query))) for fate in FATES)
    return first, second


def knn_fate_bias(
    query: np.ndarray, reference: np.ndarray, reference_labels: np.ndarray, n_neighbors: int = 30
) -> np.ndarray:
    """Fate bias of each query point: the fate shares among its nearest reference cells."""
    return bias_from_shares(*knn_fate_shares(query, reference, reference_labels, n_neighbors))


@torch.no_grad()
def push(model: DriftModel, start: np.ndarray, t0: float, t1: float) -> np.ndarray:
    """Cells (embedding coordinates) carried by the model from ``t0`` to ``t1``."""
    z = model.normalise(torch.as_tensor(start, dtype=torch.float32, device=model.device))
    ends = [model.integrate(chunk, t0, t1) for chunk in torch.split(z, 4096)]
    return model.denormalise(torch.cat(ends)).cpu().numpy()


def predict_fate_bias(
    model: DriftModel,
    start: np.ndarray,
    t0: float,
    t1: float,
    reference: np.ndarray,
    reference_labels: np.ndarray,
    n_neighbors: int = 30,
    n_samples: int = 1,
) -> np.ndarray:
    """Fate bias of each start cell: pushed from ``t0`` to ``t1``, then the fate shares among
    the nearest annotated ``reference`` cells of its end point (:func:`knn_fate_shares`).

    With a stochastic model (``sde=True``) each cell is pushed ``n_samples`` times and its
    fate shares are averaged over the end points (Monte Carlo over the model's paths)."""
    n_samples = n_samples if model.hparams.sde else 1
    ends = push(model, np.repeat(start, n_samples, axis=0), t0, t1)
    shares = knn_fate_shares(ends, reference, reference_labels, n_neighbors)
    first, second = (share.reshape(len(start), n_samples).mean(1) for share in shares)
    return bias_from_shares(first, second)


def ot_fate_bias(
    plans: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    n_source: int,
    target_labels: np.ndarray,
) -> np.ndarray:
    """Waddington-OT-style fate bias of every source cell: the share of its transported mass
    that the OT ``plans`` (:func:`day_plans`) send to ``FATES[0]`` among the two fates."""
    bias = np.empty(n_source)
    first, second = (target_labels == fate for fate in FATES)
    for rows, cols, plan in plans:
        bias[rows] = bias_from_shares(plan[:, first[cols]].sum(1), plan[:, second[cols]].sum(1))
    return bias


def branch_metrics(
    predicted: np.ndarray,
    observed: np.ndarray,
    observed_labels: np.ndarray,
    scale: float,
    n_neighbors: int = 30,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Per cell type of the observed cells (fates and ``undiff``): the share of the predicted
    cells a kNN on the observed ones gives that label, next to the observed share, and the
    Sinkhorn divergence between the predicted and observed cells of that label (embedding
    divided by ``scale``; ``None`` when fewer than two predicted cells have it)."""
    from sklearn.neighbors import KNeighborsClassifier

    knn = KNeighborsClassifier(n_neighbors=n_neighbors).fit(observed, observed_labels)
    labels = knn.predict(predicted)
    out = {}
    for label in np.unique(observed_labels):
        mine, theirs = predicted[labels == label], observed[observed_labels == label]
        out[str(label)] = {
            "predicted_share": float(np.mean(labels == label)),
            "observed_share": float(np.mean(observed_labels == label)),
            "divergence": population_distance(
                torch.as_tensor(mine / scale), torch.as_tensor(theirs / scale), seed=seed
            )
            if len(mine) > 1
            else None,  # no predicted cell of that label
        }
    return out


def clonal_fate_bias(
    adata: ad.AnnData, clone_key: str = "X_clone", after: float | None = None
) -> np.ndarray:
    """Each cell's clonal fate: ``Neu / (Neu + Mo)`` over its clone's cells later than ``after``.

    This is the truth of the Weinreb et al. (2020) fate benchmark for early cells. ``after``
    defaults to the first time point. NaN for cells without a clone or whose clone has no later
    ``Neutrophil`` or ``Monocyte`` cell. A cell in several clones pools their later cells.
    """
    import scipy.sparse as sp

    clones = sp.csr_matrix(adata.obsm[clone_key])
    clones.data = np.ones_like(clones.data)
    times = adata.obs[TIME_KEY].to_numpy(dtype=float)
    after = np.min(times) if after is None else after
    labels = adata.obs[LABEL_KEY].astype(str).to_numpy()
    later = times > after
    per_clone = [np.asarray(clones[later & (labels == fate)].sum(0)).ravel() for fate in FATES]
    first, second = (np.asarray(clones @ counts).ravel() for counts in per_clone)
    total = first + second
    bias = np.full(adata.n_obs, np.nan)
    np.divide(first, total, out=bias, where=total > 0)
    return bias


def fate_truth(adata: ad.AnnData, dataset: str) -> tuple[np.ndarray, str]:
    """The true fate bias of the first time point's cells (NaN: unknown) and its name.

    The simulator's oracle for ``"simulated"``; otherwise (LARRY, or a file with its schema)
    the clonal fate (:func:`clonal_fate_bias`) of the cells on the neutrophil/monocyte
    trajectory when ``obs["neutrophil_monocyte_trajectory"]`` exists.
    """
    early = adata.obs[TIME_KEY].to_numpy(dtype=float) == adata.obs[TIME_KEY].min()
    if dataset == "simulated":
        truth = adata.obs["fate_bias_oracle"].to_numpy(dtype=float)[early]
        return truth, "simulator oracle (fate_bias_oracle)"
    truth = clonal_fate_bias(adata)[early]
    if "neutrophil_monocyte_trajectory" in adata.obs:  # the benchmark's cells (Weinreb Fig. 5)
        on_path = adata.obs["neutrophil_monocyte_trajectory"].to_numpy(dtype=bool)[early]
        truth = np.where(on_path, truth, np.nan)
    return truth, "clonal fate of sister cells on later days (Weinreb et al. 2020, Fig. 5)"


def score_fate(predicted: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Pearson r and AUROC (of truth > 0.5) over the cells with a known truth."""
    from scipy.stats import pearsonr
    from sklearn.metrics import roc_auc_score

    known = ~np.isnan(truth)
    p, y = predicted[known], truth[known]
    positive = y > 0.5
    both = 0 < positive.sum() < len(positive)
    return {
        "pearson_r": float(pearsonr(p, y)[0]) if np.ptp(p) > 0 else float("nan"),
        "auroc": float(roc_auc_score(positive, p)) if both else float("nan"),
        "n_cells": int(known.sum()),
    }


# --------------------------------------------------------------------------- plots


def plot_losses(metrics_csv: Path, path: Path) -> None:
    """Per-epoch flow-matching loss from Lightning's ``metrics.csv``."""
    import matplotlib.pyplot as plt

    log = pd.read_csv(metrics_csv).groupby("epoch").mean(numeric_only=True)
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    ax.plot(log.index, log["train_loss"])
    ax.set(xlabel="epoch", title="flow-matching loss", yscale="log")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_populations(
    embedding: np.ndarray,
    times: np.ndarray,
    labels: np.ndarray,
    predicted: dict[float, np.ndarray],
    predicted_labels: dict[float, np.ndarray],
    path: Path,
    name: str = "X",
) -> None:
    """Observed (top row) and predicted (bottom row) cells at each time point, first two
    dimensions, coloured by cell type (observed: annotation; predicted: kNN label among the
    observed cells of that day)."""
    import matplotlib.pyplot as plt

    colours = {"undiff": "0.55", FATES[0]: "C3", FATES[1]: "C0"}
    points = np.unique(times)
    fig, axes = plt.subplots(
        2, len(points), figsize=(3.6 * len(points), 7), sharex=True, sharey=True, squeeze=False
    )
    for column, t in enumerate(points):
        here = times == t
        held = " (held out)" if t == HELD_OUT_DAY else ""
        rows = [(f"observed, day {t:g}{held}", embedding[here], labels[here])]
        if t in predicted:
            rows.append((f"predicted from day {points[0]:g}", predicted[t], predicted_labels[t]))
        for row, (title, cells, cell_labels) in enumerate(rows):
            ax = axes[row, column]
            for label, colour in colours.items():
                mine = cells[cell_labels == label]
                ax.scatter(*mine[:, :2].T, s=1.5, c=colour, alpha=0.4, label=label, lw=0)
            ax.set_title(title, fontsize=10)
            ax.legend(markerscale=5, loc="upper left", fontsize=7)
        axes[1, column].set_xlabel(f"{name}[:, 0]")
    axes[1, 0].axis("off")  # nothing is predicted for the first day
    axes[0, 0].set_ylabel(f"{name}[:, 1]")
    axes[1, 1].set_ylabel(f"{name}[:, 1]")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_fate(predicted: np.ndarray, truth: np.ndarray, scores: dict, path: Path) -> None:
    """Predicted against true fate bias of the early cells."""
    import matplotlib.pyplot as plt

    known = ~np.isnan(truth)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(truth[known], predicted[known], s=4, alpha=0.5)
    ax.plot([0, 1], [0, 1], c="0.5", lw=1)
    ax.set(
        xlabel="true fate bias (Neu / (Neu + Mo))",
        ylabel="predicted fate bias",
        title=f"Pearson r {scores['pearson_r']:.2f}, AUROC {scores['auroc']:.2f}",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- the run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/trajectory"))
    parser.add_argument(
        "--dataset",
        default="simulated",
        help="simulated, larry, or a path to an .h5ad file with LARRY's schema",
    )
    parser.add_argument(
        "--embedding",
        choices=("pca", "latent"),
        default="pca",
        help="space of the model: PCA 50 of the counts (default) or the simulator's latent",
    )
    parser.add_argument("--n-cells", type=int, default=10_000, help="simulated cells")
    parser.add_argument("--cells-per-time", type=int, default=256)
    parser.add_argument("--max-steps", type=int, default=800, help="training steps")
    parser.add_argument("--hidden", type=int, default=256, help="width of the velocity MLP")
    parser.add_argument(
        "--lr",
        type=float,
        default=3e-3,
        help="Adam learning rate at the first step, cosine-decayed to 0 by the last",
    )
    parser.add_argument(
        "--sigma",
        type=float,
        default=None,
        help="diffusion per sqrt(day), normalised units (default: 0.1 in PCA, 0.05 in the "
        "latent space with --sde; 0 with --no-sde)",
    )
    parser.add_argument(
        "--sde",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="carry cells by the stochastic model (a score net too); --no-sde: the ODE",
    )
    parser.add_argument(
        "--noise-dims",
        type=int,
        default=None,
        help="diffusion in the first N dimensions only (default: 3 in PCA, 2 in the latent space)",
    )
    parser.add_argument(
        "--fate-samples", type=int, default=16, help="paths per day-2 cell for fates (--sde)"
    )
    parser.add_argument("--n-neighbors", type=int, default=30, help="kNN for fates and branches")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads (the model is small: 1 is fastest)"
    )
    parser.add_argument("--fast-dev-run", action="store_true", help="one batch, then evaluate")
    args = parser.parse_args(argv)
    if args.sigma is None:  # the defaults of each space (docs: examples, the seeds table)
        args.sigma = SDE_DEFAULTS[args.embedding]["sigma"] if args.sde else 0.0
    if args.noise_dims is None and args.sde:
        args.noise_dims = SDE_DEFAULTS[args.embedding]["noise_dims"]
    return args


def train(args: argparse.Namespace, dm, key: str) -> tuple[DriftModel, pl.Trainer, float]:
    """Fit the model on ``dm`` and save its checkpoint; returns the model (on the training
    device, in eval mode), the trainer and the training time in seconds."""
    model = DriftModel(
        obsm_key=key,
        hidden=args.hidden,
        lr=args.lr,
        sigma=args.sigma,
        sde=args.sde,
        noise_dims=args.noise_dims,
    )
    trainer = pl.Trainer(
        max_steps=args.max_steps,
        max_epochs=-1,
        accelerator=args.accelerator,
        devices=1,
        logger=CSVLogger(args.out, name="logs", version=""),
        enable_checkpointing=False,
        fast_dev_run=args.fast_dev_run,
        log_every_n_steps=1,
    )
    fit_started = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    train_seconds = time.perf_counter() - fit_started
    trainer.save_checkpoint(args.out / "model.ckpt")
    model.to(trainer.strategy.root_device).eval()  # Lightning hands the model back on the CPU
    return model, trainer, train_seconds


def evaluate_fates(
    model: DriftModel, adata: ad.AnnData, embedding: np.ndarray, train: np.ndarray, args
) -> dict[str, Any]:
    """Fate prediction for the first day's cells whose truth is known (all, when simulated),
    labelled by the annotated cells of the last training day: the model's end points (kNN),
    next to the exact and entropic OT plans from every first-day cell to the last day (read
    for the scored cells) and a kNN on the cells' own positions (no dynamics). ``plans`` holds
    the exact plans, reused for the McCann interpolation."""
    times = adata.obs[TIME_KEY].to_numpy(dtype=float)
    first, last = float(times[train].min()), float(times[train].max())
    early = np.flatnonzero(times == first)
    truth, truth_name = fate_truth(adata, args.dataset)
    scored, truth = early[~np.isnan(truth)], truth[~np.isnan(truth)]
    reference = train[times[train] == last]
    reference_labels = adata.obs[LABEL_KEY].astype(str).to_numpy()[reference]
    k = args.n_neighbors
    z = (embedding - np.asarray(model.hparams.center)) / model.hparams.scale[0]  # OT's space
    exact = day_plans(z[early], z[reference], seed=args.seed)
    entropic = day_plans(z[early], z[reference], entropic=OT_EPSILON, seed=args.seed)
    known = np.isin(early, scored)
    predicted = predict_fate_bias(
        model,
        embedding[scored],
        first,
        last,
        embedding[reference],
        reference_labels,
        k,
        n_samples=args.fate_samples,
    )
    baselines = {
        "ot_exact": ot_fate_bias(exact, len(early), reference_labels)[known],
        "ot_entropic": ot_fate_bias(entropic, len(early), reference_labels)[known],
        "knn_no_dynamics": knn_fate_bias(
            embedding[scored], embedding[reference], reference_labels, k
        ),
    }
    vs_clones = None
    if args.dataset == "simulated":  # LARRY's benchmark truth, the clones, next to the oracle
        clonal = clonal_fate_bias(adata)[scored]
        methods = {"model": predicted, **baselines, "oracle": truth}
        vs_clones = {name: score_fate(bias, clonal) for name, bias in methods.items()}
    return {
        "first_day": first,
        "last_day": last,
        "early": early,
        "scored": scored,
        "truth": truth,
        "truth_name": truth_name,
        "predicted": predicted,
        "scores": score_fate(predicted, truth),
        "baselines": {name: score_fate(bias, truth) for name, bias in baselines.items()},
        "plans": exact,
        "plan_rows": (early, reference),
        "vs_clonal_truth": vs_clones,
    }


def write_outputs(
    args: argparse.Namespace,
    model: DriftModel,
    dm,
    embedding: np.ndarray,
    key: str,
    fates: dict,
) -> None:
    """Predictions in a copy of the AnnData (pushed cells, predicted fate bias) and the plots."""
    adata = dm.adata
    times = adata.obs[TIME_KEY].to_numpy(dtype=float)
    labels = adata.obs[LABEL_KEY].astype(str).to_numpy()
    predictor = pl.Trainer(accelerator=args.accelerator, devices=1, logger=False)
    outputs = predictor.predict(model, datamodule=dm)
    predictions = dm.write_predictions(outputs, key={name: name for name in outputs[0]})
    predictions.obs["fate_bias_pred"] = np.nan
    column = predictions.obs.columns.get_loc("fate_bias_pred")
    predictions.obs.iloc[fates["scored"], column] = fates["predicted"]
    predictions.write_h5ad(args.out / "predictions.h5ad")
    first, early = fates["first_day"], fates["early"]
    pushed, pushed_labels = {}, {}
    for t in np.unique(times[times > first]):
        from sklearn.neighbors import KNeighborsClassifier

        pushed[t] = predictions.obsm[f"X_pred_day{t:g}"][early]
        knn = KNeighborsClassifier(args.n_neighbors).fit(embedding[times == t], labels[times == t])
        pushed_labels[t] = knn.predict(pushed[t])
    if not args.fast_dev_run:  # fast_dev_run logs nothing
        plot_losses(args.out / "logs" / "metrics.csv", args.out / "losses.png")
    plot_populations(
        embedding, times, labels, pushed, pushed_labels, args.out / "populations.png", key
    )
    plot_fate(fates["predicted"], fates["truth"], fates["scores"], args.out / "fate_bias.png")


def write_metrics(out: Path, metrics: dict[str, Any]) -> None:
    """``metrics.json`` and a long-format ``metrics.csv`` (evaluation, method, metric, value)."""
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    interpolation = metrics["interpolation"]
    rows = [
        ("interpolation", name, "sinkhorn_divergence", value)
        for name, value in interpolation.items()
        if name != "held_out_day"
    ]
    rows += [
        ("fate", method, name, value)
        for method, scores in {"model": metrics["fate"], **metrics["fate_baselines"]}.items()
        for name, value in scores.items()
        if name != "truth"
    ]
    rows += [
        ("fate_vs_clonal_truth", method, name, value)
        for method, scores in (metrics.get("fate_vs_clonal_truth") or {}).items()
        for name, value in scores.items()
    ]
    rows += [
        ("branches", label, name, value)
        for label, figures in metrics["branches"].items()
        for name, value in figures.items()
    ]
    pd.DataFrame(rows, columns=["evaluation", "method", "metric", "value"]).to_csv(
        out / "metrics.csv", index=False
    )


def summary(metrics: dict[str, Any], out: Path) -> str:
    """The lines the script prints (the README quotes them): model and baselines side by side."""
    interpolation, fate = metrics["interpolation"], metrics["fate"]
    names = {
        "model": "model",
        "mccann_interpolation": "McCann (exact OT)",
        "earlier_population": "earlier population",
        "later_population": "later population",
        "observed_halves": "(two halves of day 4",
    }
    distances = ", ".join(f"{label} {interpolation[key]:.4f}" for key, label in names.items())
    settings = metrics["model"]
    kind = (
        f"SDE, diffusion {settings['sigma']:g} in "
        + (f"the first {n} dimensions" if (n := settings["noise_dims"]) else "every dimension")
        if settings["sde"]
        else f"ODE, sigma {settings['sigma']:g}"
    )
    lines = [
        f"{metrics['n_cells']} cells, {metrics['embedding']}, model: {kind}; "
        f"day {HELD_OUT_DAY} held out, Sinkhorn divergence: {distances}: sampling floor)"
    ]
    fate_names = {
        "ot_exact": "OT plan (exact)",
        "ot_entropic": "OT plan (entropic, WOT)",
        "knn_no_dynamics": "kNN, no dynamics",
    }
    scores = [("model", fate)] + [
        (fate_names[key], value) for key, value in metrics["fate_baselines"].items()
    ]
    lines.append(
        f"fate bias vs {fate['truth']}, {fate['n_cells']} cells, Pearson r / AUROC: "
        + ", ".join(f"{name} {s['pearson_r']:.3f} / {s['auroc']:.3f}" for name, s in scores)
    )
    lines.append(
        f"day-{metrics['last_day']:g} share predicted / observed (divergence): "
        + ", ".join(
            f"{label} {b['predicted_share']:.3f} / {b['observed_share']:.3f} "
            + ("(-)" if b["divergence"] is None else f"({b['divergence']:.4f})")
            for label, b in metrics["branches"].items()
        )
    )
    clonal = metrics.get("fate_vs_clonal_truth")
    if clonal:  # the simulated data: the clonal truth of LARRY's benchmark too
        lines.append(
            f"vs the clonal truth (LARRY's benchmark), {clonal['model']['n_cells']} cells, "
            "Pearson r: "
            + ", ".join(
                f"{fate_names.get(key, key)} {s['pearson_r']:.3f}" for key, s in clonal.items()
            )
        )
    lines.append(f"{metrics['total_seconds']:.0f} s; outputs in {out}/")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train, evaluate, plot and write every output; returns the metrics."""
    args = parse_args(argv)
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(args.seed, workers=True)
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)

    dm = make_datamodule(
        args.dataset,
        embedding=args.embedding,
        n_cells=args.n_cells,
        cells_per_time=args.cells_per_time,
        seed=args.seed,
    )
    dm.setup("fit")
    key = obsm_key(args.embedding)
    adata = dm.adata
    embedding = np.ascontiguousarray(adata.obsm[key], dtype=np.float32)
    times = adata.obs[TIME_KEY].to_numpy(dtype=float)
    model, trainer, train_seconds = train(args, dm, key)

    # a. interpolation of the held-out day; b. fate prediction; c. the branches of the last day
    torch.manual_seed(args.seed)
    fates = evaluate_fates(model, adata, embedding, dm.splits["train"], args)
    first, last = fates["first_day"], fates["last_day"]
    # the exact fate plans join the same cells as McCann's when days 2 and 6 are all training
    rows = fates["plan_rows"]
    same_cells = all(
        np.array_equal(r, np.flatnonzero(times == day))
        for r, day in zip(rows, (first, last), strict=True)
    )
    interpolation = evaluate_interpolation(
        model,
        embedding,
        times,
        HELD_OUT_DAY,
        seed=args.seed,
        plans=fates["plans"] if same_cells else None,
    )
    observed_last = times == last
    branches = branch_metrics(
        push(model, embedding[times == first], first, last),
        embedding[observed_last],
        adata.obs[LABEL_KEY].astype(str).to_numpy()[observed_last],
        scale=model.hparams.scale[0],
        n_neighbors=args.n_neighbors,
        seed=args.seed,
    )
    write_outputs(args, model, dm, embedding, key, fates)

    metrics = {
        "dataset": args.dataset,
        "embedding": key,
        "seed": args.seed,
        "steps": int(trainer.global_step),
        "model": {
            "sde": args.sde,
            "sigma": args.sigma,
            "noise_dims": args.noise_dims,
            "fate_samples": args.fate_samples if args.sde else 1,
            "lr": args.lr,
        },
        "n_cells": int(adata.n_obs),
        "last_day": last,
        "interpolation": {"held_out_day": HELD_OUT_DAY, **interpolation},
        "fate": {"truth": fates["truth_name"], **fates["scores"]},
        "fate_baselines": fates["baselines"],
        "branches": branches,
        "fate_vs_clonal_truth": fates["vs_clonal_truth"],
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    write_metrics(args.out, metrics)
    print(summary(metrics, args.out))
    return metrics


if __name__ == "__main__":
    main()
