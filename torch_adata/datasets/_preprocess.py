"""The standard preprocessing of trajectory papers, as an explicit step.

Loaders in :mod:`torch_adata.datasets` return the data as published; call :func:`preprocess`
yourself when a model wants the usual PCA input (as PRESCIENT and scDiffEq use for LARRY).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

__all__ = ["preprocess"]

# A matrix whose largest value is at most this, and which is not integer-valued, is taken to be
# log-transformed already (log1p of normalised counts rarely exceeds ~12).
_LOG_MAX = 20.0


def preprocess(
    adata: AnnData,
    *,
    n_top_genes: int = 2000,
    n_pcs: int = 50,
    scale: bool = True,
    log1p: bool = True,
    key_added: str = "X_pca",
    copy: bool = True,
) -> AnnData:
    """Log-transform, select variable genes, standardise and project onto principal components.

    Steps (with scanpy):

    1. ``log1p`` of ``X`` unless it already looks log-transformed (``uns["log1p"]`` is set, or
       ``X`` is non-integer with maximum <= 20). Pass ``log1p=False`` to skip it outright.
       Unless ``log1p=False``, ``X`` must be non-negative (counts or log-normalised data, not
       scaled data): otherwise a ``ValueError`` names the layers or ``.raw`` that are.
    2. The ``n_top_genes`` most variable genes (``scanpy.pp.highly_variable_genes``, flavour
       ``"seurat"``), flagged in ``var["highly_variable"]``. All genes are kept in ``X``.
    3. On those genes only: standard scaling to zero mean and unit variance per gene (if
       ``scale``), then PCA to ``n_pcs`` components (ARPACK, fixed seed). The scaled matrix is
       temporary, so ``X`` stays sparse.

    This reproduces the common recipe except for its removal of cell-cycle-correlated genes,
    which needs a gene list and is left to the user (subset ``adata`` before calling).

    Parameters
    ----------
    adata
        In-memory AnnData with normalised (or log-normalised) expression in ``X``.
    n_top_genes
        Number of highly variable genes; all genes are used if there are fewer.
    n_pcs
        Number of principal components; must be smaller than both the number of cells and the
        number of selected genes.
    scale
        Standardise each selected gene before PCA.
    log1p
        Apply ``log1p`` when the data do not look log-transformed already.
    key_added
        ``obsm`` key of the embedding. Loadings go to ``varm["PCs"]`` and variance to
        ``uns["pca"]`` for the default key, else to ``varm[key_added + "_PCs"]`` and
        ``uns[key_added]``.
    copy
        Work on a copy and leave ``adata`` untouched (default). If false, ``adata`` is
        modified in place (``X`` may be log-transformed) and returned.

    Returns
    -------
    anndata.AnnData
        The processed AnnData, with ``obsm[key_added]`` of shape ``(n_obs, n_pcs)``, float32.

    Raises
    ------
    ImportError
        If scanpy is not installed (``pip install torch-adata[examples]``).
    ValueError
        For backed AnnData, an impossible ``n_pcs``, or negative/NaN values in ``X`` with
        ``log1p=True``.
    """
    try:
        import scanpy as sc
    except ImportError as exc:
        raise ImportError("preprocess() needs scanpy: pip install torch-adata[examples]") from exc

    if adata.isbacked:
        raise ValueError(
            "preprocess() needs the data in memory: load with backed=None or call "
            "adata.to_memory() first."
        )
    if copy:
        adata = adata.copy()

    if log1p:
        from .._counts import check_counts

        try:
            check_counts(
                adata.X,
                integer=False,
                name="adata.X",
                needed_by="preprocess() (log1p, variable genes)",
                source=adata,
                current="adata.X",
            )
        except ValueError as err:
            raise ValueError(
                f"{err} For AnnData from .raw: `preprocess(adata.raw.to_adata())`. If X is "
                "transformed on purpose, pass log1p=False (in AnnDataModule: "
                "preprocess={..., 'log1p': False})."
            ) from None
    applied_log1p = log1p and not _looks_log_transformed(adata)
    if applied_log1p:
        sc.pp.log1p(adata)

    n_genes = min(n_top_genes, adata.n_vars)
    if n_genes < adata.n_vars:
        sc.pp.highly_variable_genes(adata, n_top_genes=n_genes, flavor="seurat")
        selected = adata.var["highly_variable"].to_numpy(dtype=bool)
    else:
        selected = np.ones(adata.n_vars, dtype=bool)
        adata.var["highly_variable"] = selected

    n_selected = int(selected.sum())
    if not 0 < n_pcs < min(adata.n_obs, n_selected):
        raise ValueError(
            f"n_pcs={n_pcs} must be positive and smaller than both the number of cells "
            f"({adata.n_obs}) and of selected genes ({n_selected})."
        )

    sub = AnnData(X=adata.X[:, selected])
    if scale:
        dense = sub.X.toarray() if sp.issparse(sub.X) else np.asarray(sub.X)
        sub.X = dense.astype(np.float32, copy=False)
        sc.pp.scale(sub, zero_center=True, max_value=None)
    sc.pp.pca(sub, n_comps=n_pcs, svd_solver="arpack", random_state=0)

    default = key_added == "X_pca"
    loadings = np.zeros((adata.n_vars, n_pcs), dtype=np.float32)
    loadings[selected] = sub.varm["PCs"]
    adata.obsm[key_added] = np.asarray(sub.obsm["X_pca"], dtype=np.float32)
    adata.varm["PCs" if default else f"{key_added}_PCs"] = loadings
    adata.uns["pca" if default else key_added] = {
        "variance": np.asarray(sub.uns["pca"]["variance"]),
        "variance_ratio": np.asarray(sub.uns["pca"]["variance_ratio"]),
        "params": {
            "n_top_genes": n_genes,
            "n_pcs": n_pcs,
            "scale": scale,
            "log1p_applied": applied_log1p,
        },
    }
    return adata


def _looks_log_transformed(adata: AnnData) -> bool:
    if "log1p" in adata.uns:
        return True
    values = adata.X.data if sp.issparse(adata.X) else np.asarray(adata.X)
    if values.size == 0:
        return False
    sample = values.ravel()[:100_000]  # enough to tell counts from logs, cheap on big data
    is_integer = bool(np.all(np.equal(np.mod(sample, 1), 0)))
    return not is_integer and float(values.max()) <= _LOG_MAX
