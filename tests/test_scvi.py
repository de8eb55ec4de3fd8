"""scvi-tools models trained through SCVIDataModule (the optional ``scvi`` extra).

Tests that train need scvi-tools and skip without it; CI installs the extra and runs this file
(.ci/run). The import and missing-extra tests run everywhere.
"""

import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from torch_adata import Split
from torch_adata._source import FieldKeyError
from torch_adata.scvi import SCVIDataModule

try:
    import scvi
except ImportError:
    scvi = None

needs_scvi = pytest.mark.skipif(scvi is None, reason="scvi-tools is not installed (extra: scvi)")
TRAIN = {"max_epochs": 2, "accelerator": "cpu", "check_val_every_n_epoch": 1}
TRAIN_QUIET = {"enable_progress_bar": False, "enable_model_summary": False}


@pytest.fixture
def adata():
    """Counts in layers['counts'] (log values in X), batches, labels, covariates."""
    rng = np.random.default_rng(0)
    n, g = 240, 30
    types = rng.choice(["T", "B", "NK"], n)
    means = rng.gamma(2.0, 1.0, (3, g))
    counts = rng.poisson(means[pd.Categorical(types, ["T", "B", "NK"]).codes]).astype(np.float32)
    a = ad.AnnData(sp.csr_matrix(np.log1p(counts)))
    a.layers["counts"] = sp.csr_matrix(counts)
    a.obs_names = [f"c{i}" for i in range(n)]
    a.var_names = [f"g{j}" for j in range(g)]
    a.obs["sample"] = pd.Categorical(rng.choice(["s2", "s1", "s3"], n), ["s2", "s1", "s3"])
    a.obs["cell_type"] = np.where(rng.random(n) < 0.3, "Unknown", types)
    a.obs["donor"] = rng.choice([7, 3], n)  # integers: codes as scvi gives them
    a.obs["percent_mito"] = rng.random(n).astype(np.float32)
    a.obs["treated"] = rng.random(n) < 0.5
    return a


def test_importing_torch_adata_never_imports_scvi():
    code = "import sys, torch_adata, torch_adata.scvi; print('scvi' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_missing_extra_names_the_install_command(adata):
    code = (
        "import sys; sys.modules['scvi'] = None\n"  # what Python does for a missing package
        "import anndata, numpy\n"
        "from torch_adata.scvi import SCVIDataModule\n"
        "SCVIDataModule(anndata.AnnData(numpy.ones((3, 2))))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode != 0
    assert "ImportError: SCVIDataModule needs scvi-tools (>=1.4,<1.5)" in done.stderr
    assert "pip install 'torch-adata[scvi]'" in done.stderr


@needs_scvi
def test_unsupported_version_is_refused(adata, monkeypatch):
    monkeypatch.setattr(scvi, "__version__", "1.2.3")
    with pytest.raises(ImportError, match=r">=1.4,<1.5; found 1.2.3.*torch-adata\[scvi\]"):
        SCVIDataModule(adata, batch_key="sample")


def _scvi_own(adata, n_latent=10, **setup):
    """scvi's own route on a copy: setup_anndata (its registry and codes), then the model."""
    own = adata.copy()
    scvi.model.SCVI.setup_anndata(own, **setup)
    return own, scvi.model.SCVI(own, n_latent=n_latent)


@needs_scvi
def test_batches_hold_scvi_own_codes_and_anndata_rows(adata):
    setup = {
        "layer": "counts",
        "batch_key": "sample",
        "categorical_covariate_keys": ["donor", "treated"],
        "continuous_covariate_keys": ["percent_mito"],
    }
    dm = SCVIDataModule(adata, **setup, batch_size=50, loader={"shuffle": False})
    own, model = _scvi_own(adata, **setup)
    ours, theirs = dm.registry["field_registries"], model.registry["field_registries"]
    assert dict(ours["X"]["data_registry"]) == dict(theirs["X"]["data_registry"])
    for field in ("batch", "extra_categorical_covs", "extra_continuous_covs"):
        assert ours[field]["summary_stats"] == theirs[field]["summary_stats"]
    assert list(ours["extra_categorical_covs"]["state_registry"]["n_cats_per_key"]) == [2, 2]
    np.testing.assert_array_equal(
        ours["batch"]["state_registry"]["categorical_mapping"],
        theirs["batch"]["state_registry"]["categorical_mapping"],
    )
    assert dm.n_batch == 3 and dm.n_vars == 30 and dm.n_obs == 240 and dm.n_labels == 1
    expected = next(iter(model._make_data_loader(own, indices=np.arange(50), batch_size=50)))
    batch = dm.on_before_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert list(batch)[:5] == [
        "X",
        "batch",
        "labels",
        "extra_categorical_covs",
        "extra_continuous_covs",
    ]
    np.testing.assert_array_equal(batch["X"].numpy(), adata.layers["counts"][:50].toarray())
    for key in ("X", "batch", "labels", "extra_categorical_covs", "extra_continuous_covs"):
        np.testing.assert_array_equal(batch[key].numpy(), np.asarray(expected[key]), err_msg=key)


@needs_scvi
@pytest.mark.parametrize("backed", [False, True])
def test_scvi_trains_and_writes_its_latent_back(adata, tmp_path, backed):
    source = adata
    if backed:
        source = tmp_path / "cells.h5ad"
        adata.write_h5ad(source)
    dm = SCVIDataModule(
        source,
        layer="counts",
        batch_key="sample",
        continuous_covariate_keys=["percent_mito"],
        split=Split(val_size=0.2),
        batch_size=64,
        backed=backed,
    )
    scvi.settings.seed = 0
    model = scvi.model.SCVI(registry=dm.registry, n_latent=4)
    model.train(datamodule=dm, **TRAIN, **TRAIN_QUIET)
    history = model.history
    assert len(history["elbo_train"]) == 2 and len(history["elbo_validation"]) == 2
    assert np.isfinite(history["elbo_validation"].to_numpy(dtype=float)).all()
    np.testing.assert_array_equal(model.validation_indices, dm.splits["val"])
    adata.obsm["X_scVI"] = model.get_latent_representation(dataloader=dm.inference_dataloader())

    own, baseline = _scvi_own(
        adata,
        n_latent=4,
        layer="counts",
        batch_key="sample",
        continuous_covariate_keys=["percent_mito"],
    )
    baseline.train(max_epochs=1, batch_size=64, **TRAIN_QUIET, accelerator="cpu")
    assert adata.obsm["X_scVI"].shape == baseline.get_latent_representation(own).shape
    assert np.isfinite(adata.obsm["X_scVI"]).all()
    # Row i is cell i: its latent is the model's encoding of that cell alone.
    one = {k: v[[7]] for k, v in next(iter(dm.inference_dataloader())).items() if v is not None}
    with torch.no_grad():
        qz = model.module.inference(**model.module._get_inference_input(one))["qz"]
    np.testing.assert_allclose(adata.obsm["X_scVI"][7], qz.loc[0].numpy(), rtol=1e-5, atol=1e-6)


@needs_scvi
def test_scanvi_learns_from_labelled_cells_only(adata):
    dm = SCVIDataModule(
        adata,
        layer="counts",
        batch_key="sample",
        labels_key="cell_type",
        unlabeled_category="Unknown",
        model_name="SCANVI",
        split=Split(val_size=0.2),
        batch_size=64,
        sparse=True,
    )
    mapping = dm.registry["field_registries"]["labels"]["state_registry"]["categorical_mapping"]
    assert list(mapping) == ["B", "NK", "T", "Unknown"]  # as scvi: the unlabeled one last
    model = scvi.model.SCANVI(registry=dm.registry, datamodule=dm, n_latent=4)
    assert model.n_labels == 3
    model.train(datamodule=dm, **TRAIN, **TRAIN_QUIET)
    assert np.isfinite(model.history["train_classification_loss"].to_numpy(dtype=float)).all()
    predicted = model.predict(dataloader=dm.inference_dataloader())
    assert len(predicted) == adata.n_obs and set(predicted) <= {"B", "NK", "T"}


@needs_scvi
@pytest.mark.parametrize(
    ("option", "role"),
    [({"batch_key": "batch"}, "batch_key='batch'"), ({"labels_key": "celltype"}, "labels_key")],
)
def test_a_wrong_key_names_the_column_and_its_role(adata, option, role):
    dm = SCVIDataModule(adata, **option)
    with pytest.raises(FieldKeyError, match=rf"(?s)'{next(iter(option.values()))}'.*{role}"):
        dm.registry  # noqa: B018 (the property reads the data)


@needs_scvi
def test_a_float_batch_key_is_refused_with_the_fix(adata):
    dm = SCVIDataModule(adata, batch_key="percent_mito")
    with pytest.raises(TypeError, match=r"'percent_mito'.*not categories.*astype\('category'\)"):
        dm.registry  # noqa: B018


@needs_scvi
def test_scanvi_needs_labels():
    with pytest.raises(ValueError, match="pass labels_key="):
        SCVIDataModule(ad.AnnData(np.ones((3, 2))), model_name="SCANVI")


@needs_scvi
def test_worker_processes_serve_the_same_batches(adata):
    """Two DataLoader workers: scvi trains on what in-process loading gives, batch for batch."""
    options = {"layer": "counts", "batch_key": "donor", "batch_size": 64, "seed": 3}
    alone = SCVIDataModule(adata, **options)
    workers = SCVIDataModule(adata, **options, num_workers=2)
    for one, other in zip(alone.train_dataloader(), workers.train_dataloader(), strict=True):
        one, other = (
            alone.on_before_batch_transfer(one, 0),
            workers.on_before_batch_transfer(other, 0),
        )
        for key in ("X", "batch", "labels"):
            torch.testing.assert_close(one[key], other[key])
    model = scvi.model.SCVI(registry=workers.registry, n_latent=4)
    model.train(datamodule=workers, max_epochs=1, accelerator="cpu", **TRAIN_QUIET)
    assert np.isfinite(model.history["elbo_train"].to_numpy(dtype=float)).all()


@needs_scvi
@pytest.mark.parametrize("backed", [True, False])
def test_a_collection_of_files_trains_each_file_a_batch(adata, tmp_path, backed):
    """A folder of 3 files (one per sample, one with its genes in another order)."""
    folder = tmp_path / "atlas"
    folder.mkdir()
    parts = {}
    for name in ("s2", "s1", "s3"):
        part = adata[adata.obs["sample"] == name].copy()
        if name == "s3":
            part = part[:, part.var_names[::-1]].copy()  # genes are matched by name
        part.write_h5ad(folder / f"{name}.h5ad")
        parts[name] = part
    dm = SCVIDataModule(
        folder, layer="counts", split=Split(val_size=0.2), batch_size=64, backed=backed
    )
    registry = dm.registry
    assert registry["setup_args"]["batch_key"] == "source"
    mapping = registry["field_registries"]["batch"]["state_registry"]["categorical_mapping"]
    assert list(mapping) == ["s1.h5ad", "s2.h5ad", "s3.h5ad"]  # the folder's files, sorted
    assert (dm.n_obs, dm.n_vars, dm.n_batch) == (240, 30, 3)
    assert list(dm.dataset.var_names) == list(adata.var_names)

    batches = list(dm.inference_dataloader())
    counts = np.concatenate([b["X"].numpy() for b in batches])
    codes = np.concatenate([b["batch"].numpy()[:, 0] for b in batches])
    order = ("s1", "s2", "s3")  # cells file after file
    expected = np.concatenate(
        [parts[n][:, adata.var_names].layers["counts"].toarray() for n in order]
    )
    np.testing.assert_array_equal(counts, expected)
    np.testing.assert_array_equal(codes, np.repeat([0, 1, 2], [parts[n].n_obs for n in order]))

    scvi.settings.seed = 0
    model = scvi.model.SCVI(registry=registry, n_latent=4)
    model.train(datamodule=dm, **TRAIN, **TRAIN_QUIET)
    assert np.isfinite(model.history["elbo_validation"].to_numpy(dtype=float)).all()
    latent = model.get_latent_representation(dataloader=dm.inference_dataloader())
    assert latent.shape == (240, 4) and np.isfinite(latent).all()


@needs_scvi
def test_a_collection_keeps_a_batch_key_given(adata, tmp_path):
    paths = []
    for name in ("s1", "s2"):
        paths.append(tmp_path / f"{name}.h5ad")
        adata[adata.obs["sample"] == name].copy().write_h5ad(paths[-1])
    dm = SCVIDataModule(paths, layer="counts", batch_key="donor", backed=True)
    assert dm.registry["setup_args"]["batch_key"] == "donor"
    assert list(dm.batch_labels) == [3, 7]
