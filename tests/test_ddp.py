"""A real 2-process DDP run on CPU (gloo): every train cell once per epoch, equal batch counts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import torch_adata

SCRIPT = Path(__file__).parent / "scripts" / "ddp_train.py"


def _env_importing_this_torch_adata() -> dict[str, str]:
    """The environment with PYTHONPATH leading to the torch_adata this test imported.

    The script (and the rank Lightning re-launches from it) would otherwise import whichever
    copy the virtualenv points to, not the checkout under test.
    """
    checkout = str(Path(torch_adata.__file__).resolve().parents[1])
    inherited = os.environ.get("PYTHONPATH")
    path = os.pathsep.join([checkout, inherited]) if inherited else checkout
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ddp_two_ranks_see_every_train_cell_exactly_once(tmp_path):
    env = _env_importing_this_torch_adata()
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    train_rows = json.loads((tmp_path / "train_rows.json").read_text())
    assert {r["world"] for r in ranks} == {2}
    assert {r["backend"] for r in ranks} == {"gloo"}
    # Both ranks ran the torch_adata under test, not another installed copy.
    assert {r["torch_adata"] for r in ranks} == {str(Path(torch_adata.__file__).resolve())}
    # Lightning kept our sampler instead of injecting its DistributedSampler.
    assert {r["sampler"] for r in ranks} == {"UniformBatchSampler"}
    orders = []
    for epoch in (0, 1):
        per_rank = [[b["rows"] for b in r["seen"] if b["epoch"] == epoch] for r in ranks]
        assert len(per_rank[0]) == len(per_rank[1]) > 0, "ranks got different batch counts"
        rows = [row for batches in per_rank for batch in batches for row in batch]
        assert sorted(rows) == sorted(train_rows), "a train cell was missed or repeated"
        assert max(len(b) for batches in per_rank for b in batches) <= 16
        # batch_size is the batch size: only each rank's last batch may be shorter
        assert all(len(b) == 16 for batches in per_rank for b in batches[:-1])
        orders.append(per_rank[0])
    assert orders[0] != orders[1], "set_epoch did not reshuffle"
