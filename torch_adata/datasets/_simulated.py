"""An offline, lineage-traced time course with exact ground-truth fates (a stand-in for LARRY).

:func:`simulated` builds, in a few seconds and without any download, an AnnData with the schema of
the LARRY in vitro dataset (Weinreb et al., Science 2020): three sampling days, clones, a
``Cell type annotation`` with an ``undiff`` state and two fates, wells, libraries and a 2-D layout,
plus what LARRY cannot give: each early cell's true fate probability.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = ["simulated"]

TIME_POINTS: tuple[int, int, int] = (2, 4, 6)
"""The sampling days, as in LARRY's in vitro experiment."""

CELL_TYPES: tuple[str, str, str] = ("undiff", "Neutrophil", "Monocyte")
"""The categories of ``obs["Cell type annotation"]``, in this order."""

POPULATIONS: tuple[str, str] = ("Lin-Kit+Sca1+", "Lin-Kit+Sca1-")
"""The categories of ``obs["Starting population"]``."""

_POPULATION_TAGS = ("LSK", "LK")  # short names used in the library names
_POPULATION_SHIFT = 0.25  # LSK founders start this far behind on the clock, LK this far ahead
_NUISANCE_RELAXATION = 0.1  # v_k = -0.1 * x_k for the latent dimensions k >= 2
_DAY2_SAMPLED_FRACTION = 0.5  # founders are sized so about half the day-2 cells are sampled
_LATER_SAMPLED_FRACTION = 0.9  # ... and at most this fraction of the later pools
_MAX_POOL_FACTOR = 4  # the living population is thinned at random above 4 * n_cells
_SPRING_SCALE = 100.0
_SPRING_NOISE = 5.0
_COUNTS_PER_GENE = 0.5  # default mean_counts / n_genes
_LIBRARY_SIZE_SD = 0.3  # sd of log library size across cells
_CHUNK_ROWS = 2048  # rows of the expression matrix drawn at a time (bounds memory)
_ORACLE_CHUNK = 4096  # day-2 cells integrated at a time by the oracle


def simulated(
    n_cells: int = 10_000,
    n_genes: int = 2_000,
    n_latent: int = 10,
    seed: int = 0,
    *,
    n_founders: int | None = None,
    day_proportions: Sequence[float] = (0.22, 0.37, 0.41),
    division_interval: float = 1.0,
    clone_detection: float = 0.85,
    speed: float = 0.8,
    branch_day: float = 2.3,
    diffusion: float = 0.001,
    dt: float = 0.01,
    clock_spread: float = 0.5,
    founder_spread: float = 0.6,
    fate_margin: float = 0.3,
    n_oracle: int = 256,
    mean_counts: float | None = None,
    dispersion: float = 0.2,
) -> ad.AnnData:
    """Simulate a lineage-traced differentiation time course shaped like LARRY (in vitro).

    Founder cells (one per clone) start on day 0 and follow a pitchfork stochastic differential
    equation (SDE) in a latent space; they divide at fixed intervals, daughters inherit the state and
    the clone, and on days 2, 4 and 6 a random subset of the living cells is sampled (and removed,
    as in the experiment). Gene expression counts are drawn from gene programs driven by each
    sampled cell's latent state. Because the dynamics are known, every day-2 cell's probability of
    becoming a neutrophil is known too (``fate_bias_oracle``), which makes fate prediction on this
    dataset exactly scorable.

    Parameters
    ----------
    n_cells
        Number of sampled cells (rows), split over the days by ``day_proportions``. At least 10.
    n_genes
        Number of genes (columns).
    n_latent
        Dimension of the latent space, at least 2: ``x0`` is the clock, ``x1`` the fate axis and
        ``x2, ...`` heritable nuisance programs (clone-specific expression that does not affect
        fate).
    seed
        Seed (a non-negative integer). The output is a deterministic function of all arguments.
        Independent random streams drive the clock and fate axis, the nuisance dimensions, the
        metadata, the gene programs and the counts, so for a fixed seed changing ``n_genes``
        leaves the cells, clones and latent states unchanged, and changing ``n_latent`` leaves
        ``x0``, ``x1``, the annotations and the fates unchanged.
    n_founders
        Number of founder cells (clones before barcode dropout). ``None`` picks the smallest number
        for which about half of the cells living on day 2, and at most 90% of those living on a
        later day, are sampled; this gives most clones cells on day 2 and on a later day.
    day_proportions
        Relative numbers of cells sampled on days 2, 4 and 6 (normalised to sum to 1). The default
        is LARRY's in vitro split (28,249 / 48,498 / 54,140 cells).
    division_interval
        Days between divisions. All cells divide at days ``(k + 1/2) * division_interval``,
        ``k = 0, 1, ...``, so divisions never coincide with a sampling day at the default. Above
        ``4 * n_cells`` living cells, a uniformly random subset of that size is kept (cells lost at
        passaging); this is independent of state, so it does not bias fates.
    clone_detection
        Probability that a sampled cell's lineage barcode is detected. Undetected cells have
        ``clone_id = -1`` (15% of the cells by default).
    speed
        SDE time per day: the clock ``x0`` advances by ``speed`` per day.
    branch_day
        Day on which the mean clock crosses the branch point ``x0 = 0`` (between days 2 and 4 by
        default, so day-2 cells are undifferentiated but already biased).
    diffusion
        Diffusion coefficient ``D`` of every latent dimension (see Notes for the convention).
    dt
        Euler--Maruyama step in SDE time units.
    clock_spread
        Standard deviation of the founders' initial clock ``x0`` (clones progress at different
        stages), added to a shift of ``-/+ 0.25`` for ``Lin-Kit+Sca1+`` / ``Lin-Kit+Sca1-`` founders
        (Sca1+ progenitors start less mature).
    founder_spread
        Standard deviation of the founders' initial ``x1`` and nuisance dimensions. The ``x1``
        spread is the heritable part of fate: larger values make clones more fate-biased.
    fate_margin
        A cell past the branch (``x0 > 0``) is a ``Neutrophil`` if ``x1 > fate_margin``, a
        ``Monocyte`` if ``x1 < -fate_margin``, and ``undiff`` otherwise.
    n_oracle
        Monte Carlo paths per day-2 cell for ``fate_bias_oracle``.
    mean_counts
        Mean number of counts (UMIs) per cell; library sizes are log-normal around it. ``None``
        uses ``0.5 * n_genes`` (1,000 at the default), which keeps about 14% of the entries
        non-zero whatever ``n_genes``.
    dispersion
        Negative binomial dispersion of the counts (variance ``mu + dispersion * mu**2``);
        0 gives Poisson counts.

    Returns
    -------
    anndata.AnnData
        ``n_cells x n_genes``, rows ordered by time point (random order within a day).

        ``X``
            ``scipy.sparse.csr_matrix`` float32: counts normalised per cell (L1) and scaled so
            every row sums to ``uns["simulation"]["target_sum"]``, the mean total count (LARRY's
            ``normed_counts`` are normalised the same way).
        ``layers["counts"]``
            The raw integer counts, CSR float32, same sparsity as ``X`` (about 5-20% non-zero at
            the defaults).
        ``obs`` (LARRY's column names, verbatim)
            - ``Library`` (categorical str): ``d{day}_{population}_{replicate}`` on day 2 and
              ``d{day}_{population}_{well}`` later, ``population`` being ``LSK`` or ``LK``
              (e.g. ``d2_LSK_1``, ``d6_LK_2``).
            - ``Cell barcode`` (str): a unique random 16-nt barcode.
            - ``Time point`` (int64): 2, 4 or 6.
            - ``Starting population`` (categorical): ``Lin-Kit+Sca1+`` or ``Lin-Kit+Sca1-``, per
              clone.
            - ``Cell type annotation`` (categorical, categories ``undiff``, ``Neutrophil``,
              ``Monocyte``): from the latent state at sampling (see ``fate_margin``).
            - ``Well`` (int64): 0 for every day-2 cell; 1 or 2 for later cells, drawn per clone, so
              all of a clone's day-4/6 cells share a well (hold out a well to hold out clones).
            - ``SPRING-x``, ``SPRING-y`` (float64): ``100 * (x0, x1)`` plus Gaussian noise of sd 5,
              a 2-D view of the latent state.
            - ``clone_id`` (int64): the detected clone, ``0 .. n_clones - 1`` (column of
              ``obsm["X_clone"]``), or -1 for cells whose barcode was not detected.
            - ``fate_bias_oracle`` (float64): for every day-2 cell, the probability, by Monte Carlo
              from the same SDE started at its latent state, that it is a ``Neutrophil`` on day 6
              among ``Neutrophil`` and ``Monocyte`` outcomes. NaN for day-4/6 cells.
            - ``clone_fate_bias`` (float64): for every cell of a detected clone with ``Neutrophil``
              or ``Monocyte`` cells on days 4/6, ``Neu / (Neu + Mo)`` over those later cells
              (LARRY's fate-benchmark target for day-2 cells). NaN otherwise.
        ``obs_names``
            ``"0", "1", ...``.
        ``var_names``
            ``Gene0001, Gene0002, ...``; ``var["program"]`` (categorical) names the gene program
            each gene follows: ``neutrophil``, ``monocyte``, ``progenitor`` (down with the clock),
            ``maturation`` (up with the clock), ``nuisance`` or ``housekeeping``.
        ``obsm``
            - ``X_clone``: CSR float32 binary ``n_cells x n_clones``, one 1 per cell with a
              detected clone (column ``clone_id``), all-zero rows for the others.
            - ``X_latent``: float32 ``n_cells x n_latent``, the latent state at sampling.
            - ``X_spring``: float32 ``n_cells x 2``, ``SPRING-x`` and ``SPRING-y``.
        ``uns["simulation"]``
            Every parameter used (``n_founders`` resolved), the derived ``target_sum``,
            ``n_clones``, ``cells_per_time_point`` and ``noise_convention``, all plain
            h5ad-writable values.

    Raises
    ------
    ValueError
        If an argument is out of range (the message names it and says what to pass), or if
        ``n_founders`` and ``division_interval`` leave too few living cells to sample a day.

    Notes
    -----
    Latent dynamics (LineageOT's single-bifurcation flow): the drift is ``v0 = 1`` (``x0`` is a
    clock), ``v1 = -x1**3 + x0 * x1`` (for ``x0 > 0`` the branches ``x1 = +sqrt(x0)``,
    neutrophil, and ``x1 = -sqrt(x0)``, monocyte, are stable) and ``v_k = -0.1 * x_k`` for
    ``k >= 2`` (slow relaxation of clone-specific nuisance programs). The Euler--Maruyama update
    is ``x <- x + dt * v(x) + sqrt(2 * D * dt) * xi`` with ``xi`` standard normal per cell and per
    dimension, i.e. ``dx = v dt + sqrt(2 D) dW`` (``D = diffusion``), with ``dt = 0.01`` and
    ``D = 0.001`` by default. Day ``t`` is SDE time ``speed * t``; a founder starts at
    ``x0 = -speed * branch_day`` (plus its spread), so the mean clock reaches the branch on
    ``branch_day``.

    The oracle integrates ``(x0, x1)`` (the other dimensions do not affect them) from each day-2
    cell's sampled state to day 6 with the same step, diffusion and annotation rule. All day-2
    cells share the same ``n_oracle`` noise paths (common random numbers), so the oracle is a
    smooth function of the state and differences between cells are not blurred by independent
    Monte Carlo noise; its standard error is at most ``0.5 / sqrt(n_oracle)``. A cell whose
    paths all end ``undiff`` (rare) gets the fraction of paths ending with ``x1 > 0``.

    Expression: gene ``g`` in cell ``c`` has rate ``L_c * softmax_g(b_g + W_g . phi(x_c))`` where
    ``phi`` holds ``tanh(x0)``, ``softplus(3 x1) / 3``, ``softplus(-3 x1) / 3`` and the nuisance
    dimensions, ``W`` is a sparse random loading matrix (one program per gene), ``b_g`` a random
    baseline and ``L_c`` a log-normal library size with mean ``mean_counts``. Counts are negative
    binomial (a gamma-Poisson mixture). PCA of the log-normalised data separates the cell types.

    Examples
    --------
    >>> adata = simulated(n_cells=2_000, n_genes=500, seed=1)
    >>> adata.obs["Time point"].value_counts().sort_index().tolist()
    [440, 740, 820]
    >>> early = adata.obs["Time point"] == 2
    >>> bool(adata.obs.loc[early, "fate_bias_oracle"].notna().all())
    True
    """
    params = _validated(
        n_cells=n_cells,
        n_genes=n_genes,
        n_latent=n_latent,
        seed=seed,
        n_founders=n_founders,
        day_proportions=day_proportions,
        division_interval=division_interval,
        clone_detection=clone_detection,
        speed=speed,
        branch_day=branch_day,
        diffusion=diffusion,
        dt=dt,
        clock_spread=clock_spread,
        founder_spread=founder_spread,
        fate_margin=fate_margin,
        n_oracle=n_oracle,
        mean_counts=mean_counts,
        dispersion=dispersion,
    )
    n_cells, n_genes, n_latent = params["n_cells"], params["n_genes"], params["n_latent"]
    streams = np.random.SeedSequence(params["seed"]).spawn(6)
    rng_fate, rng_nuisance, rng_meta, rng_oracle, rng_programs, rng_counts = (
        np.random.default_rng(s) for s in streams
    )

    per_day = _cells_per_day(n_cells, params["day_proportions"])
    schedule = _Schedule(params)
    founders = params["n_founders"]
    if founders is None:
        founders = schedule.default_founders(per_day)
    schedule.check_feasible(founders, per_day)
    params["n_founders"] = founders

    population, x0, x1, nuisance = _founders(params, founders, rng_fate, rng_nuisance)
    day, latent, founder = _run_lineages(
        params, schedule, per_day, x0, x1, nuisance, rng_fate, rng_nuisance
    )
    # Annotate the float32 state that is stored, so obsm["X_latent"] reproduces the labels exactly.
    stored = latent.astype(np.float32)
    cell_type = _annotate(stored[:, 0], stored[:, 1], params["fate_margin"])

    oracle = np.full(n_cells, np.nan)
    early = day == TIME_POINTS[0]
    oracle[early] = _fate_oracle(
        latent[early, 0], latent[early, 1], params, schedule.steps_between_days, rng_oracle
    )
    obs, x_clone, spring = _cell_metadata(
        day, founder, population, latent, cell_type, oracle, params, rng_meta
    )

    loadings, baseline, programs = _gene_programs(n_genes, n_latent, rng_programs)
    counts = _draw_counts(latent, loadings, baseline, params, rng_counts)
    normed, target_sum = _normalise_totals(counts)
    return ad.AnnData(
        X=normed,
        obs=obs,
        var=_gene_table(programs, n_genes),
        layers={"counts": counts},
        obsm={
            "X_clone": x_clone,
            "X_latent": stored,
            "X_spring": spring.astype(np.float32),
        },
        uns={"simulation": _provenance(params, per_day, x_clone.shape[1], target_sum)},
    )


# --------------------------------------------------------------------------- assembly


def _founders(
    params: dict,
    founders: int,
    rng_fate: np.random.Generator,
    rng_nuisance: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each founder's starting population (it shifts the clock) and initial latent state."""
    population = rng_fate.integers(0, 2, size=founders)
    x0 = (
        -params["speed"] * params["branch_day"]
        + np.where(population == 0, -_POPULATION_SHIFT, _POPULATION_SHIFT)
        + params["clock_spread"] * rng_fate.standard_normal(founders)
    )
    x1 = params["founder_spread"] * rng_fate.standard_normal(founders)
    n_nuisance = params["n_latent"] - 2
    nuisance = params["founder_spread"] * rng_nuisance.standard_normal((founders, n_nuisance))
    return population, x0, x1, nuisance


def _cell_metadata(
    day: np.ndarray,
    founder: np.ndarray,
    population: np.ndarray,
    latent: np.ndarray,
    cell_type: np.ndarray,
    oracle: np.ndarray,
    params: dict,
    rng: np.random.Generator,
) -> tuple[pd.DataFrame, sp.csr_matrix, np.ndarray]:
    """obs (wells per founder, barcode detection, clones, libraries, barcodes, the 2-D layout,
    fates), the cells' clone matrix and the 2-D layout."""
    n_cells = day.size
    early = day == TIME_POINTS[0]
    founder_well = rng.integers(1, 3, size=population.size)
    well = np.where(early, 0, founder_well[founder]).astype(np.int64)
    detected = rng.random(n_cells) < params["clone_detection"]
    clone_founders, clone_of_detected = np.unique(founder[detected], return_inverse=True)
    clone_id = np.full(n_cells, -1, dtype=np.int64)
    clone_id[detected] = clone_of_detected
    n_clones = int(clone_founders.size)
    replicate = np.where(early, rng.integers(1, 3, size=n_cells), well)
    pop_of_cell = population[founder]
    tags = np.asarray(_POPULATION_TAGS)[pop_of_cell]
    library = np.char.add(
        np.char.add(np.char.add("d", day.astype(str)), np.char.add("_", tags)),
        np.char.add("_", replicate.astype(str)),
    )
    barcodes = _unique_barcodes(n_cells, rng)
    spring = _SPRING_SCALE * latent[:, :2] + _SPRING_NOISE * rng.standard_normal((n_cells, 2))
    obs = pd.DataFrame(
        {
            "Library": pd.Categorical(library),
            "Cell barcode": barcodes,
            "Time point": day.astype(np.int64),
            "Starting population": pd.Categorical.from_codes(pop_of_cell, categories=POPULATIONS),
            "Cell type annotation": pd.Categorical.from_codes(cell_type, categories=CELL_TYPES),
            "Well": well,
            "SPRING-x": spring[:, 0],
            "SPRING-y": spring[:, 1],
            "clone_id": clone_id,
            "fate_bias_oracle": oracle,
            "clone_fate_bias": _clone_fate_bias(clone_id, day, cell_type, n_clones),
        },
        index=pd.Index([str(i) for i in range(n_cells)]),
    )
    rows = np.flatnonzero(detected)
    x_clone = sp.csr_matrix(
        (np.ones(rows.size, dtype=np.float32), (rows, clone_id[rows])),
        shape=(n_cells, n_clones),
    )
    return obs, x_clone, spring


def _normalise_totals(counts: sp.csr_matrix) -> tuple[sp.csr_matrix, float]:
    """Counts scaled so every row sums to the mean total count (float32), and that mean."""
    totals = np.asarray(counts.sum(axis=1, dtype=np.float64)).ravel()
    target_sum = float(totals.mean())
    normed = counts.copy()
    normed.data = (
        normed.data.astype(np.float64) * np.repeat(target_sum / totals, np.diff(normed.indptr))
    ).astype(np.float32)
    return normed, target_sum


def _gene_table(programs: np.ndarray, n_genes: int) -> pd.DataFrame:
    """var: ``Gene0001, ...`` and the program each gene follows."""
    width = max(4, len(str(n_genes)))
    return pd.DataFrame(
        {"program": pd.Categorical(programs, categories=_PROGRAMS)},
        index=pd.Index([f"Gene{i:0{width}d}" for i in range(1, n_genes + 1)]),
    )


def _provenance(params: dict, per_day: np.ndarray, n_clones: int, target_sum: float) -> dict:
    """``uns["simulation"]``: every parameter and derived quantity, as h5ad-writable values."""
    simulation = dict(params)
    simulation["day_proportions"] = [float(p) for p in params["day_proportions"]]
    simulation.update(
        time_points=list(TIME_POINTS),
        cells_per_time_point=[int(k) for k in per_day],
        n_clones=n_clones,
        target_sum=target_sum,
        noise_convention="x <- x + dt * v(x) + sqrt(2 * diffusion * dt) * N(0, 1)",
        drift="v0 = 1; v1 = -x1**3 + x0 * x1; v_k = -0.1 * x_k for k >= 2",
        nuisance_relaxation=_NUISANCE_RELAXATION,
        population_shift=_POPULATION_SHIFT,
        neutrophil_sign="x1 > 0",
    )
    return simulation


# --------------------------------------------------------------------------- argument checks


def _validated(**kwargs) -> dict:
    out = dict(kwargs)
    out["n_cells"] = _integer("n_cells", kwargs["n_cells"], minimum=10, example="n_cells=2000")
    out["n_genes"] = _integer("n_genes", kwargs["n_genes"], minimum=1, example="n_genes=2000")
    out["n_latent"] = _integer("n_latent", kwargs["n_latent"], minimum=2, example="n_latent=10")
    out["seed"] = _integer("seed", kwargs["seed"], minimum=0, example="seed=0")
    if kwargs["n_founders"] is not None:
        out["n_founders"] = _integer(
            "n_founders", kwargs["n_founders"], minimum=1, example="n_founders=None (automatic)"
        )
    out["n_oracle"] = _integer("n_oracle", kwargs["n_oracle"], minimum=1, example="n_oracle=256")

    proportions = kwargs["day_proportions"]
    try:
        values = [float(p) for p in proportions]
    except (TypeError, ValueError):
        values = []
    if len(values) != len(TIME_POINTS) or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(
            f"day_proportions must be three positive numbers (days 2, 4, 6), got {proportions!r}; "
            "pass e.g. day_proportions=(0.22, 0.37, 0.41)."
        )
    total = sum(values)
    out["day_proportions"] = tuple(v / total for v in values)

    positive = {
        "division_interval": "division_interval=1.0",
        "speed": "speed=0.8",
        "dt": "dt=0.01",
    }
    if kwargs["mean_counts"] is None:
        out["mean_counts"] = _COUNTS_PER_GENE * out["n_genes"]
    else:
        positive["mean_counts"] = "mean_counts=1000 (or None for 0.5 * n_genes)"
    for name, example in positive.items():
        out[name] = _real(name, kwargs[name], example, low=0.0, low_open=True)
    for name, example in {
        "diffusion": "diffusion=0.001",
        "clock_spread": "clock_spread=0.5",
        "founder_spread": "founder_spread=0.6",
        "fate_margin": "fate_margin=0.3",
        "dispersion": "dispersion=0.2 (or 0 for Poisson counts)",
    }.items():
        out[name] = _real(name, kwargs[name], example, low=0.0)
    out["clone_detection"] = _real(
        "clone_detection",
        kwargs["clone_detection"],
        "clone_detection=0.85",
        low=0.0,
        low_open=True,
        high=1.0,
    )
    out["branch_day"] = _real(
        "branch_day",
        kwargs["branch_day"],
        "branch_day=2.3",
        low=0.0,
        low_open=True,
        high=float(TIME_POINTS[-1]),
        high_open=True,
    )
    if out["dt"] > 0.1:
        raise ValueError(
            f"dt must be at most 0.1 (SDE time units) for a stable Euler-Maruyama step, got "
            f"{out['dt']!r}; pass e.g. dt=0.01."
        )
    if out["speed"] * TIME_POINTS[-1] / out["dt"] > 1_000_000:
        raise ValueError(
            f"speed / dt = {out['speed'] / out['dt']:.3g} steps per day is too many; "
            "raise dt or lower speed (defaults: speed=0.8, dt=0.01)."
        )
    return out


def _integer(name: str, value, *, minimum: int, example: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(
            f"{name} must be an integer >= {minimum}, got {value!r}; pass e.g. {example}."
        )
    return int(value)


def _real(
    name: str,
    value,
    example: str,
    *,
    low: float,
    low_open: bool = False,
    high: float | None = None,
    high_open: bool = False,
) -> float:
    ok = (
        not isinstance(value, bool)
        and isinstance(value, numbers.Real)
        and math.isfinite(float(value))
        and (float(value) > low if low_open else float(value) >= low)
        and (high is None or (float(value) < high if high_open else float(value) <= high))
    )
    if not ok:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        bounds = f"{lo}{low:g}, {'inf' if high is None else f'{high:g}'}{hi}"
        raise ValueError(
            f"{name} must be a finite number in {bounds}, got {value!r}; pass e.g. {example}."
        )
    return float(value)


# --------------------------------------------------------------------------- lineages


def _cells_per_day(n_cells: int, proportions: Sequence[float]) -> np.ndarray:
    """Cells sampled per day: rounded proportions, the last day takes the remainder, each >= 1."""
    counts = [max(1, round(p * n_cells)) for p in proportions[:-1]]
    counts.append(n_cells - sum(counts))
    if counts[-1] < 1:
        raise ValueError(
            f"day_proportions {tuple(proportions)} leave no cells for day {TIME_POINTS[-1]} with "
            f"n_cells={n_cells}; raise n_cells or give the last day a larger proportion."
        )
    return np.asarray(counts, dtype=np.int64)


class _Schedule:
    """Step indices of the sampling days and of the divisions, and the founder arithmetic."""

    def __init__(self, params: dict):
        steps_per_day = params["speed"] / params["dt"]
        self.sample_steps = [round(d * steps_per_day) for d in TIME_POINTS]
        interval = params["division_interval"]
        times = np.arange(0.5 * interval, TIME_POINTS[-1], interval)
        self.division_steps = sorted({round(t * steps_per_day) for t in times} - {0})
        self.n_steps = self.sample_steps[-1]
        self.steps_between_days = self.sample_steps[-1] - self.sample_steps[0]
        self.max_pool = _MAX_POOL_FACTOR * params["n_cells"]
        # Divisions strictly before each sampling step, and between consecutive ones.
        before = [sum(s < d for s in self.division_steps) for d in self.sample_steps]
        self.growth = [2 ** before[0]] + [2 ** (b - a) for a, b in itertools.pairwise(before)]

    def pools(self, founders: int, per_day: np.ndarray) -> list[int]:
        """Living cells just before each sampling day (with the passaging cap)."""
        pools, living = [], founders
        for grow, take in zip(self.growth, per_day, strict=True):
            living = living * grow
            if grow > 1:
                living = min(living, max(self.max_pool, int(take)))
            pools.append(living)
            living -= int(take)
        return pools

    def default_founders(self, per_day: np.ndarray) -> int:
        g2 = self.growth[0]
        founders = max(1, math.ceil(per_day[0] / (_DAY2_SAMPLED_FRACTION * g2)))
        # Grow it until every later day can be sampled at <= 90% of its pool.
        while True:
            pools = self.pools(founders, per_day)
            if all(
                take <= _LATER_SAMPLED_FRACTION * pool
                for take, pool in zip(per_day, pools, strict=True)
            ):
                return founders
            founders = max(founders + 1, math.ceil(founders * 1.05))

    def check_feasible(self, founders: int, per_day: np.ndarray) -> None:
        for day, take, pool in zip(
            TIME_POINTS, per_day, self.pools(founders, per_day), strict=True
        ):
            if pool < take:
                raise ValueError(
                    f"Only {pool} living cells on day {day} to sample {int(take)} from with "
                    f"n_founders={founders}: raise n_founders (or pass n_founders=None), or "
                    "lower division_interval."
                )


def _run_lineages(
    params: dict,
    schedule: _Schedule,
    per_day: np.ndarray,
    x0: np.ndarray,
    x1: np.ndarray,
    nuisance: np.ndarray,
    rng_fate: np.random.Generator,
    rng_nuisance: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Euler-Maruyama over all living cells at once, with divisions and sampling days."""
    dt, scale = params["dt"], math.sqrt(2.0 * params["diffusion"] * params["dt"])
    relax = 1.0 - _NUISANCE_RELAXATION * dt
    founder = np.arange(x0.size, dtype=np.int64)
    samples = {
        step: (d, int(k))
        for step, d, k in zip(schedule.sample_steps, TIME_POINTS, per_day, strict=True)
    }
    divisions = set(schedule.division_steps)
    out_day, out_latent, out_founder = [], [], []
    for step in range(1, schedule.n_steps + 1):
        n = x0.size
        noise = rng_fate.standard_normal((2, n))
        x1 = x1 + dt * (x1 * (x0 - x1 * x1)) + scale * noise[1]
        x0 = x0 + dt + scale * noise[0]
        if nuisance.shape[1]:
            nuisance = relax * nuisance + scale * rng_nuisance.standard_normal(nuisance.shape)
        if step in samples:
            d, take = samples[step]
            picked = rng_fate.choice(n, size=take, replace=False)
            out_day.append(np.full(take, d, dtype=np.int64))
            out_latent.append(np.column_stack([x0[picked], x1[picked], nuisance[picked]]))
            out_founder.append(founder[picked])
            keep = np.ones(n, dtype=bool)
            keep[picked] = False
            x0, x1, nuisance, founder = x0[keep], x1[keep], nuisance[keep], founder[keep]
        if step in divisions:
            x0, x1 = np.repeat(x0, 2), np.repeat(x1, 2)
            nuisance, founder = np.repeat(nuisance, 2, axis=0), np.repeat(founder, 2)
            if x0.size > schedule.max_pool:  # passaging: keep a uniformly random subset
                kept = np.sort(rng_fate.choice(x0.size, size=schedule.max_pool, replace=False))
                x0, x1, nuisance, founder = x0[kept], x1[kept], nuisance[kept], founder[kept]
    return np.concatenate(out_day), np.concatenate(out_latent), np.concatenate(out_founder)


def _annotate(x0: np.ndarray, x1: np.ndarray, margin: float) -> np.ndarray:
    """Category codes into CELL_TYPES: 0 undiff, 1 Neutrophil (x1 > margin), 2 Monocyte."""
    past = x0 > 0
    codes = np.zeros(x0.shape, dtype=np.int8)
    codes[past & (x1 > margin)] = 1
    codes[past & (x1 < -margin)] = 2
    return codes


def _fate_oracle(
    x0: np.ndarray,
    x1: np.ndarray,
    params: dict,
    n_steps: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """P(Neutrophil | Neutrophil or Monocyte on day 6) from each (x0, x1), by Monte Carlo."""
    dt, scale = params["dt"], math.sqrt(2.0 * params["diffusion"] * params["dt"])
    n_paths, margin = params["n_oracle"], params["fate_margin"]
    noise = scale * rng.standard_normal((n_steps, 2, n_paths))
    clock_path = np.cumsum(dt + noise[:, 0, :], axis=0)  # x0(t) - x0(0), shared by all cells
    result = np.empty(x0.size)
    for start in range(0, x0.size, _ORACLE_CHUNK):
        stop = min(start + _ORACLE_CHUNK, x0.size)
        c0 = x0[start:stop, None]
        a1 = np.repeat(x1[start:stop, None], n_paths, axis=1)
        clock = np.empty_like(a1)
        drift = np.empty_like(a1)
        for step in range(n_steps):
            previous = clock_path[step - 1] if step else 0.0
            np.add(c0, previous, out=clock)  # x0 before this step
            np.multiply(a1, a1, out=drift)
            np.subtract(clock, drift, out=drift)
            drift *= a1
            drift *= dt
            a1 += drift
            a1 += noise[step, 1]
        final = _annotate(c0 + clock_path[-1], a1, margin)
        neu = (final == 1).sum(axis=1)
        committed = neu + (final == 2).sum(axis=1)
        fallback = (a1 > 0).mean(axis=1)
        result[start:stop] = np.where(committed > 0, neu / np.maximum(committed, 1), fallback)
    return result


def _clone_fate_bias(
    clone_id: np.ndarray, day: np.ndarray, cell_type: np.ndarray, n_clones: int
) -> np.ndarray:
    """Neu / (Neu + Mo) over each detected clone's day-4/6 cells, broadcast to its cells."""
    later = (clone_id >= 0) & (day > TIME_POINTS[0])
    neu = np.bincount(clone_id[later], weights=cell_type[later] == 1, minlength=n_clones)
    mono = np.bincount(clone_id[later], weights=cell_type[later] == 2, minlength=n_clones)
    committed = neu + mono
    per_clone = np.full(n_clones, np.nan)
    np.divide(neu, committed, out=per_clone, where=committed > 0)
    bias = np.full(clone_id.size, np.nan)
    has = clone_id >= 0
    bias[has] = per_clone[clone_id[has]]
    return bias


def _unique_barcodes(n: int, rng: np.random.Generator) -> np.ndarray:
    """n distinct random 16-nt barcodes (object array of str)."""
    codes = rng.integers(0, 4**16, size=n, dtype=np.int64)
    while True:
        _, first = np.unique(codes, return_index=True)
        if first.size == n:
            break
        duplicate = np.ones(n, dtype=bool)
        duplicate[first] = False
        codes[duplicate] = rng.integers(0, 4**16, size=int(duplicate.sum()), dtype=np.int64)
    shifts = 2 * np.arange(15, -1, -1, dtype=np.int64)
    digits = (codes[:, None] >> shifts) & 3
    letters = np.frombuffer(b"ACGT", dtype=np.uint8)[digits]
    return np.ascontiguousarray(letters).view("S16").ravel().astype(str).astype(object)


# --------------------------------------------------------------------------- expression

_PROGRAMS = ("neutrophil", "monocyte", "progenitor", "maturation", "nuisance", "housekeeping")
_PROGRAM_WEIGHTS = (0.07, 0.07, 0.08, 0.08, 0.30, 0.40)


def _features(latent: np.ndarray) -> np.ndarray:
    """phi(x): tanh(x0), softplus(3 x1)/3, softplus(-3 x1)/3, x2, x3, ..."""
    x0, x1 = latent[:, 0], latent[:, 1]
    return np.column_stack(
        [
            np.tanh(x0),
            np.logaddexp(0.0, 3.0 * x1) / 3.0,
            np.logaddexp(0.0, -3.0 * x1) / 3.0,
            latent[:, 2:],
        ]
    )


def _gene_programs(
    n_genes: int, n_latent: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Loadings (n_genes x n_features), baselines and the program name of every gene."""
    weights = np.asarray(_PROGRAM_WEIGHTS)
    if n_latent == 2:  # no nuisance dimensions
        weights = np.where(np.asarray(_PROGRAMS) == "nuisance", 0.0, weights)
    program = rng.choice(len(_PROGRAMS), size=n_genes, p=weights / weights.sum())
    loadings = np.zeros((n_genes, 3 + n_latent - 2))
    strength = rng.uniform(0.0, 1.0, size=n_genes)
    loadings[program == 0, 1] = 1.5 + 1.5 * strength[program == 0]
    loadings[program == 1, 2] = 1.5 + 1.5 * strength[program == 1]
    loadings[program == 2, 0] = -(1.0 + strength[program == 2])
    loadings[program == 3, 0] = 1.0 + strength[program == 3]
    nuis = np.flatnonzero(program == 4)
    if nuis.size:
        dims = rng.integers(0, n_latent - 2, size=nuis.size)
        signs = rng.choice([-1.0, 1.0], size=nuis.size)
        loadings[nuis, 3 + dims] = signs * (0.5 + strength[nuis])
    baseline = rng.normal(0.0, 2.0, size=n_genes)
    return loadings, baseline, np.asarray(_PROGRAMS)[program]


def _draw_counts(
    latent: np.ndarray,
    loadings: np.ndarray,
    baseline: np.ndarray,
    params: dict,
    rng: np.random.Generator,
) -> sp.csr_matrix:
    """Negative binomial counts, CSR float32, drawn a chunk of rows at a time."""
    n_cells = latent.shape[0]
    sd = _LIBRARY_SIZE_SD
    library = params["mean_counts"] * np.exp(sd * rng.standard_normal(n_cells) - sd * sd / 2)
    features = _features(latent.astype(np.float64))
    dispersion = params["dispersion"]
    blocks = []
    for start in range(0, n_cells, _CHUNK_ROWS):
        stop = min(start + _CHUNK_ROWS, n_cells)
        eta = features[start:stop] @ loadings.T + baseline
        eta -= eta.max(axis=1, keepdims=True)
        rate = np.exp(eta)
        rate *= (library[start:stop] / rate.sum(axis=1))[:, None]
        if dispersion > 0:
            rate *= rng.gamma(1.0 / dispersion, dispersion, size=rate.shape)
        block = rng.poisson(rate)
        empty = np.flatnonzero(block.sum(axis=1) == 0)
        if empty.size:  # every cell keeps at least one count, so it can be normalised
            block[empty, np.argmax(eta[empty], axis=1)] = 1
        blocks.append(sp.csr_matrix(block.astype(np.float32)))
    counts = sp.vstack(blocks, format="csr")
    counts.sort_indices()
    return counts
