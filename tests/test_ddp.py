"""Real DDP runs on CPU (gloo): 2 processes on one node, and 2 "nodes" of one process each.

Every train cell is seen once per epoch across ranks, and every rank gets as many batches."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

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


# -- several nodes ------------------------------------------------------------------------------

NODES_SCRIPT = Path(__file__).parent / "scripts" / "ddp_nodes.py"
# What a cluster launcher sets; cleared so the two "nodes" below see only what they are given.
_LAUNCHER_VARS = ("LOCAL_RANK", "RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_nodes(out: Path, source, *flags: str, timeout: float = 240) -> list[dict]:
    """Start ``ddp_nodes.py`` as node 0 and node 1 of a 2-node DDP run on this machine (one
    process each, gloo, rendezvous at 127.0.0.1) and return each node's record."""
    env = _env_importing_this_torch_adata()
    for name in list(env):
        if name in _LAUNCHER_VARS or name.startswith("SLURM_"):
            del env[name]
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2")
    command = [sys.executable, str(NODES_SCRIPT), str(out), json.dumps(source), *flags]
    logs = [out / f"node{rank}.log" for rank in (0, 1)]
    procs = []
    for rank, log in enumerate(logs):
        with open(log, "w") as stream:
            procs.append(
                subprocess.Popen(
                    command,
                    env={**env, "NODE_RANK": str(rank)},
                    stdout=stream,
                    stderr=subprocess.STDOUT,
                )
            )
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for proc in procs:  # one node failing leaves the other waiting at the rendezvous
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, log in zip(procs, logs, strict=True):
        assert proc.returncode == 0, log.read_text()[-4000:]
    return [json.loads((out / f"node{rank}.json").read_text()) for rank in (0, 1)]


def assert_partition_per_epoch(nodes: list[dict], epochs=(0, 1)) -> list[list[list[int]]]:
    """Every train cell seen exactly once per epoch across the nodes, equal batch counts;
    returns per epoch the batches of each node."""
    assert nodes[0]["train_rows"] == nodes[1]["train_rows"], "the nodes drew different splits"
    train = nodes[0]["train_rows"]
    per_epoch = []
    for epoch in epochs:
        batches = [[b["rows"] for b in node["seen"] if b["epoch"] == epoch] for node in nodes]
        assert len(batches[0]) == len(batches[1]) > 0, "the nodes got different batch counts"
        seen = [row for node in batches for batch in node for row in batch]
        assert len(seen) == len(set(seen)), "a train cell was seen twice in one epoch"
        assert sorted(seen) == sorted(train), "a train cell was missed"
        per_epoch.append(batches)
    return per_epoch


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_nodes_see_every_train_cell_exactly_once(tmp_path):
    path = tmp_path / "cells.h5ad"
    n = 203  # odd on purpose: not a multiple of world size x batch size
    rng = np.random.default_rng(0)
    ad.AnnData(
        sp.random(n, 20, density=0.3, format="csr", dtype=np.float32, random_state=0),
        obs=pd.DataFrame({"label": rng.integers(0, 3, n)}, index=[f"c{i}" for i in range(n)]),
    ).write_h5ad(path)
    nodes = run_two_nodes(tmp_path, str(path), "--backed")
    assert [node["node_rank"] for node in nodes] == [0, 1]
    assert [node["global_rank"] for node in nodes] == [0, 1]
    assert {node["local_rank"] for node in nodes} == {0}
    assert {node["world"] for node in nodes} == {2}
    assert {node["num_nodes"] for node in nodes} == {2}
    assert {node["backend"] for node in nodes} == {"gloo"}
    assert {node["torch_adata"] for node in nodes} == {str(Path(torch_adata.__file__).resolve())}
    assert {node["sampler"] for node in nodes} == {"UniformBatchSampler"}
    epochs = assert_partition_per_epoch(nodes)
    assert epochs[0][0] != epochs[1][0], "set_epoch did not reshuffle"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_nodes_share_a_collection_of_files_exactly_once_with_block_shuffle(tmp_path):
    """The recipe of docs/distributed.md: both nodes read the same folder of files."""
    folder = tmp_path / "atlas"
    folder.mkdir()
    sizes = [70, 41, 92]  # no file a multiple of the block size
    for k, n in enumerate(sizes):
        ad.AnnData(
            sp.random(n, 20, density=0.3, format="csr", dtype=np.float32, random_state=k),
            obs=pd.DataFrame(index=[f"f{k}_c{i}" for i in range(n)]),
        ).write_h5ad(folder / f"sample{k}.h5ad")
    nodes = run_two_nodes(tmp_path, str(folder), "--backed", "--sampler", "block")
    assert {node["sampler"] for node in nodes} == {"BlockShuffleSampler"}
    assert {node["n_obs"] for node in nodes} == {sum(sizes)}
    assert nodes[0]["sources"] == [f"sample{k}.h5ad" for k in range(3)]
    assert all(len(files) == 1 for node in nodes for files in node["block_files"])
    assert_partition_per_epoch(nodes)
