"""Dataset registry: names, paths and the errors for neither. No network is used."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

import torch_adata as ta
from torch_adata.datasets import _registry
from torch_adata.datasets._registry import available_datasets, load_dataset, register_dataset


@pytest.fixture
def clean_registry(monkeypatch):
    """Let a test register names without leaking them into other tests."""
    monkeypatch.setattr(_registry, "_REGISTRY", dict(_registry._REGISTRY))


def _small(n_obs=7, n_vars=5) -> ad.AnnData:
    rng = np.random.default_rng(0)
    adata = ad.AnnData(X=sp.random(n_obs, n_vars, density=0.5, format="csr", random_state=rng))
    adata.obs["Time point"] = rng.choice([2, 4, 6], n_obs)
    return adata


def test_builtin_names():
    names = available_datasets()
    assert {"larry", "simulated"} <= set(names)
    assert names == sorted(names)


def test_register_and_load_by_name(clean_registry):
    calls = []

    def loader(**kwargs):
        calls.append(kwargs)
        return _small(n_obs=kwargs.get("n_obs", 7))

    register_dataset("toy", loader)
    assert "toy" in available_datasets()
    assert load_dataset("toy", n_obs=3).n_obs == 3
    load_dataset("toy", backed=None)  # the default is not forwarded
    load_dataset("toy", backed="r")
    assert calls == [{"n_obs": 3}, {}, {"backed": "r"}]

    register_dataset("toy", loader)  # same loader again: fine
    with pytest.raises(ValueError, match=r"already registered.*overwrite=True"):
        register_dataset("toy", lambda **kw: _small())
    register_dataset("toy", lambda **kw: _small(n_obs=2), overwrite=True)
    assert load_dataset("toy").n_obs == 2


@pytest.mark.parametrize("name", ["", " padded ", "data/set", "toy.h5ad"])
def test_invalid_names(clean_registry, name):
    with pytest.raises(ValueError, match="name"):
        register_dataset(name, lambda **kw: _small())


def test_loader_must_be_callable(clean_registry):
    with pytest.raises(TypeError, match="callable"):
        register_dataset("toy", "not a function")


def test_load_path(tmp_path):
    path = tmp_path / "cells.h5ad"
    original = _small()
    original.write_h5ad(path)

    for source in (path, str(path)):
        adata = load_dataset(source)
        assert not adata.isbacked
        np.testing.assert_array_equal(adata.X.toarray(), original.X.toarray())
    backed = load_dataset(path, backed="r")
    try:
        assert backed.isbacked and backed.shape == original.shape
    finally:
        backed.file.close()


def test_path_with_other_options_is_rejected(tmp_path):
    path = tmp_path / "cells.h5ad"
    _small().write_h5ad(path)
    with pytest.raises(TypeError, match=r"Only 'backed'.*experiment"):
        load_dataset(path, experiment="in_vivo")


def test_unknown_name_lists_names_and_the_path_rule():
    with pytest.raises(ValueError) as info:
        load_dataset("larrry")
    message = str(info.value)
    assert "'larrry'" in message
    assert "larry, simulated" in message
    assert "existing file ending in '.h5ad'" in message


def test_missing_or_wrong_path(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_dataset(tmp_path / "missing.h5ad")
    assert "missing.h5ad" in str(info.value) and "larry" in str(info.value)

    other = tmp_path / "cells.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match=r"ending in '\.h5ad'"):
        load_dataset(other)
    with pytest.raises(TypeError, match="name or a path"):
        load_dataset(42)


def test_larry_by_name_from_the_cache(tmp_path):
    # A prebuilt cache file is all the loader needs: no download happens.
    built = _small()
    built.write_h5ad(tmp_path / "larry_in_vivo.h5ad")
    unreachable = "http://127.0.0.1:9/nothing-here/"

    adata = load_dataset(
        "larry", experiment="in_vivo", cache_dir=tmp_path, base_url=unreachable, mirrors=[]
    )
    assert adata.shape == built.shape and not adata.isbacked

    backed = load_dataset(
        "larry",
        experiment="in_vivo",
        cache_dir=tmp_path,
        base_url=unreachable,
        mirrors=[],
        backed="r",
    )
    try:
        assert backed.isbacked and backed.shape == built.shape
    finally:
        backed.file.close()
    with pytest.raises(TypeError, match="unexpected"):
        load_dataset("larry", cache_dir=tmp_path, backed="r", colour="red")


def test_corrupt_cache_file_says_how_to_rebuild(tmp_path):
    (tmp_path / "larry_in_vitro.h5ad").write_bytes(b"not an hdf5 file")
    with pytest.raises(OSError, match="force=True"):
        load_dataset("larry", cache_dir=tmp_path)


def test_simulated_by_name():
    adata = load_dataset("simulated", n_cells=60, n_genes=20, seed=1)
    assert adata.shape == (60, 20)
    with pytest.raises(ValueError, match="write_h5ad"):
        load_dataset("simulated", backed="r")


def test_every_public_name_is_reachable_from_torch_adata_datasets():
    # The loaders once shared their names with their modules, so the module's other public
    # names (ta.datasets.larry.larry_filenames) were hidden behind the function.
    for name in ta.datasets.__all__:
        assert getattr(ta.datasets, name) is not None, name
    for function in ("larry", "simulated", "preprocess"):
        assert callable(getattr(ta.datasets, function)), function
    assert ta.datasets.larry_filenames("in_vivo")[0].startswith("stateFate_inVivo_")
    assert ta.datasets.BASE_URL.startswith("https://")
    assert "{filename}" in ta.datasets.GEO_MIRROR
    assert all(len(digest) == 64 for digest in ta.datasets.KNOWN_HASHES.values())
    assert issubclass(ta.datasets.DownloadError, RuntimeError)
    assert set(ta.datasets.__all__) >= {
        "BASE_URL",
        "DownloadError",
        "GEO_MIRROR",
        "KNOWN_HASHES",
        "larry_filenames",
    }


def test_api_reference_shows_the_current_larry_hosts():
    # docs/api.md states the hosts by hand (autodoc cannot read the comments of re-exported
    # constants): it must not drift from the code.
    from pathlib import Path

    api = (Path(__file__).parents[1] / "docs" / "api.md").read_text()
    assert f'"{ta.datasets.BASE_URL}"' in api
    assert f'"{ta.datasets.GEO_MIRROR}"' in api
