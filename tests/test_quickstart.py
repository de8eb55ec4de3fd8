"""The README's main job (examples/quickstart.py) trains, beats the majority class, writes outputs."""

import importlib.util
import json
from pathlib import Path

import anndata as ad
import numpy as np

SCRIPT = Path(__file__).parents[1] / "examples" / "quickstart.py"


def test_quickstart_trains_and_writes_predictions(tmp_path):
    spec = importlib.util.spec_from_file_location("quickstart", SCRIPT)
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)
    metrics = quickstart.main(
        ["--out", str(tmp_path), "--n-cells", "2000", "--max-epochs", "3", "--accelerator", "cpu"]
    )
    # measured at 2000 cells / 3 epochs, seed 0: see metrics.json; the margin is generous
    assert metrics["test_accuracy"] > metrics["majority_class_accuracy"] + 0.15
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    adata = ad.read_h5ad(tmp_path / "predictions.h5ad")
    probs = adata.obsm["class_probabilities"]
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    agree = adata.obs["predicted"].astype(str) == adata.obs["Cell type annotation"].astype(str)
    assert agree.mean() > metrics["majority_class_accuracy"]
