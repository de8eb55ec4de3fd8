"""LARRY loader, download layer and preprocessing, against a real local HTTP server.

The server (127.0.0.1, random port) serves miniature files in LARRY's exact formats under
``/ok/``; ``/e404/`` and ``/e500/`` answer with those statuses, ``/cut/`` announces the full
length but closes the connection halfway, and ``/slow/`` waits before answering. Nothing here
touches the internet.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import socket
import threading
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from torch_adata.datasets import BASE_URL, DownloadError, larry, larry_filenames
from torch_adata.datasets._fetch import cache_dir, fetch
from torch_adata.datasets._larry import _urls

N_CELLS, N_GENES, N_CLONES = 30, 12, 5
TIMEOUT = 3.0
METADATA_COLUMNS = [
    "Library",
    "Cell barcode",
    "Time point",
    "Starting population",
    "Cell type annotation",
    "Well",
    "SPRING-x",
    "SPRING-y",
]
PREFIX = {
    "in_vitro": "stateFate_inVitro_",
    "in_vivo": "stateFate_inVivo_",
    "cytokine_perturbation": "stateFate_cytokinePerturbation_",
}


# --------------------------------------------------------------------------- miniature data


def _gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def _mtx(matrix: sp.spmatrix) -> bytes:
    buffer = io.BytesIO()
    scipy.io.mmwrite(buffer, sp.coo_matrix(matrix))
    return _gz(buffer.getvalue())


def _tsv(frame: pd.DataFrame) -> bytes:
    return _gz(frame.to_csv(sep="\t", index=False).encode())


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Miniature:
    """Truth and file bytes for one miniature LARRY experiment."""

    def __init__(self, experiment: str = "in_vitro", seed: int = 0, clones_transposed=False):
        rng = np.random.default_rng(seed)
        self.experiment = experiment
        counts = sp.random(N_CELLS, N_GENES, density=0.4, random_state=seed, format="csr")
        self.counts = (counts * 37.5).astype(np.float64)  # normalised counts: floats
        self.genes = [f"Gene{i}" for i in range(N_GENES)]
        membership = np.zeros((N_CELLS, N_CLONES))
        has_clone = rng.random(N_CELLS) < 0.7  # not every cell has a clone
        membership[np.flatnonzero(has_clone), rng.integers(0, N_CLONES, has_clone.sum())] = 1
        self.clones = sp.csr_matrix(membership)
        days = rng.choice([2, 4, 6], N_CELLS)
        self.metadata = pd.DataFrame(
            {
                "Library": [f"d{d}_{rng.integers(1, 3)}" for d in days],
                "Cell barcode": [f"ACGT-{i:04d}" for i in range(N_CELLS)],
                "Time point": days,
                "Starting population": rng.choice(["Lin-Kit+Sca1+", "Lin-Kit+Sca1-"], N_CELLS),
                "Cell type annotation": rng.choice(["undiff", "Neutrophil", "Monocyte"], N_CELLS),
                "Well": np.where(days == 2, 0, rng.integers(1, 3, N_CELLS)),
                "SPRING-x": rng.normal(size=N_CELLS),
                "SPRING-y": rng.normal(size=N_CELLS),
            },
            columns=METADATA_COLUMNS,
        )
        self.pseudotime_cells = np.array([1, 4, 7, 20])
        self.pseudotime_values = np.array([0.1, 0.25, 0.5, 0.9])
        self.trajectory_cells = np.array([0, 1, 4, 7, 11, 20, 29])
        clone_file = self.clones.T if clones_transposed else self.clones
        prefix = PREFIX[experiment]
        self.files = {
            prefix + "normed_counts.mtx.gz": _mtx(self.counts),
            prefix + "gene_names.txt.gz": _gz(("\n".join(self.genes) + "\n").encode()),
            prefix + "clone_matrix.mtx.gz": _mtx(clone_file),
            prefix + "metadata.txt.gz": _tsv(self.metadata),
        }
        if experiment == "in_vitro":
            pseudotime = pd.DataFrame(
                {"Cell index": self.pseudotime_cells, "pseudotime": self.pseudotime_values}
            )
            trajectory = pd.DataFrame({"Cell index": self.trajectory_cells})
            self.files[prefix + "neutrophil_pseudotime.txt.gz"] = _tsv(pseudotime)
            self.files[prefix + "neutrophil_monocyte_trajectory.txt.gz"] = _tsv(trajectory)

    def hashes(self) -> dict[str, str]:
        return {name: sha256(data) for name, data in self.files.items()}


# --------------------------------------------------------------------------- HTTP server


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        server = self.server
        server.requests.append(self.path)
        _, mode, name = [*self.path.split("/", 2), "", ""][:3]
        body = server.files.get(name)
        if mode == "slow":
            time.sleep(1.5)
            mode = "ok"
        if mode == "e500":
            self.send_error(500, "Internal Server Error")
        elif mode == "e404" or body is None:
            self.send_error(404, "Not Found")
        elif mode == "cut":
            # Promise the whole file, send half of it, hang up.
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
        else:
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def log_message(self, format, *args) -> None:  # keep test output clean
        pass


class FileServer:
    def __init__(self) -> None:
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.files = {}
        self.httpd.requests = []
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def files(self) -> dict[str, bytes]:
        return self.httpd.files

    @property
    def requests(self) -> list[str]:
        return self.httpd.requests

    def url(self, mode: str = "ok") -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{mode}/"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    srv = FileServer()
    yield srv
    srv.close()


@pytest.fixture
def mini(server) -> Miniature:
    data = Miniature()
    server.files.update(data.files)
    return data


def _load(server, cache, data: Miniature, **kwargs) -> ad.AnnData:
    options = {
        "cache_dir": cache,
        "base_url": server.url("ok"),
        "mirrors": [],
        "hashes": data.hashes(),
        "progress": False,
        "timeout": TIMEOUT,
    }
    options.update(kwargs)
    return larry(data.experiment, **options)


def _leftovers(folder: Path) -> list[str]:
    """Temporary or partial files anywhere under ``folder``."""
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and (p.name.startswith((".", "tmp")) or "partial" in p.name)
    )


# --------------------------------------------------------------------------- success


@pytest.mark.parametrize("clones_transposed", [False, True])
def test_in_vitro_builds_anndata(server, tmp_path, clones_transposed):
    data = Miniature(clones_transposed=clones_transposed)
    server.files.update(data.files)
    adata = _load(server, tmp_path, data)

    assert adata.shape == (N_CELLS, N_GENES)
    assert sp.isspmatrix_csr(adata.X) or isinstance(adata.X, sp.csr_array)
    assert adata.X.dtype == np.float32
    np.testing.assert_allclose(adata.X.toarray(), data.counts.toarray(), rtol=1e-6)
    assert list(adata.var_names) == data.genes
    assert list(adata.obs_names) == [str(i) for i in range(N_CELLS)]

    assert list(adata.obs.columns) == [
        *METADATA_COLUMNS,
        "neutrophil_pseudotime",
        "neutrophil_monocyte_trajectory",
    ]
    for column in ["Library", "Cell barcode", "Starting population", "Cell type annotation"]:
        assert isinstance(adata.obs[column].dtype, pd.CategoricalDtype), column
    assert pd.api.types.is_numeric_dtype(adata.obs["Time point"])
    np.testing.assert_array_equal(adata.obs["Time point"], data.metadata["Time point"])
    np.testing.assert_array_equal(
        adata.obs["Cell type annotation"].astype(str), data.metadata["Cell type annotation"]
    )
    np.testing.assert_allclose(adata.obs["SPRING-x"], data.metadata["SPRING-x"])

    pseudotime = adata.obs["neutrophil_pseudotime"].to_numpy()
    np.testing.assert_allclose(pseudotime[data.pseudotime_cells], data.pseudotime_values)
    off = np.setdiff1d(np.arange(N_CELLS), data.pseudotime_cells)
    assert np.isnan(pseudotime[off]).all()
    trajectory = adata.obs["neutrophil_monocyte_trajectory"]
    assert trajectory.dtype == bool
    assert set(np.flatnonzero(trajectory)) == set(data.trajectory_cells)

    clones = adata.obsm["X_clone"]
    assert sp.issparse(clones) and clones.format == "csr" and clones.dtype == np.float32
    assert clones.shape == (N_CELLS, N_CLONES)
    np.testing.assert_array_equal(clones.toarray(), data.clones.toarray())

    assert (tmp_path / "larry_in_vitro.h5ad").is_file()
    assert _leftovers(tmp_path) == []
    assert len(server.requests) == len(larry_filenames("in_vitro")) == 6


def test_in_vivo_without_digests_is_validated_by_parsing(server, tmp_path):
    data = Miniature("in_vivo")
    server.files.update(data.files)
    adata = _load(server, tmp_path, data, hashes=None)
    assert adata.shape == (N_CELLS, N_GENES)
    assert list(adata.obs.columns) == METADATA_COLUMNS
    assert adata.uns["larry"]["experiment"] == "in_vivo"
    assert (tmp_path / "larry_in_vivo.h5ad").is_file()
    assert len(server.requests) == 4


def test_second_call_reads_the_cache_without_network(server, tmp_path, mini):
    first = _load(server, tmp_path, mini)
    n_requests = len(server.requests)
    second = _load(server, tmp_path, mini)
    assert len(server.requests) == n_requests
    np.testing.assert_array_equal(second.X.toarray(), first.X.toarray())
    pd.testing.assert_frame_equal(second.obs, first.obs)
    np.testing.assert_array_equal(second.obsm["X_clone"].toarray(), mini.clones.toarray())
    # Served from the h5ad alone: even the raw downloads are not needed any more.
    for raw in (tmp_path / "larry").iterdir():
        raw.unlink()
    third = _load(server, tmp_path, mini, base_url="http://127.0.0.1:9/never/")
    assert third.shape == first.shape
    assert len(server.requests) == n_requests


def test_force_downloads_again_and_rebuilds(server, tmp_path, mini):
    _load(server, tmp_path, mini)
    n_requests = len(server.requests)
    changed = mini.metadata.copy()
    changed["Library"] = "relabelled"
    name = PREFIX["in_vitro"] + "metadata.txt.gz"
    server.files[name] = _tsv(changed)
    hashes = {**mini.hashes(), name: sha256(server.files[name])}

    cached = _load(server, tmp_path, mini, hashes=hashes)
    assert len(server.requests) == n_requests  # no force: the cached h5ad wins
    assert set(cached.obs["Library"]) != {"relabelled"}

    rebuilt = _load(server, tmp_path, mini, hashes=hashes, force=True)
    assert len(server.requests) == n_requests + 6
    assert set(rebuilt.obs["Library"]) == {"relabelled"}
    assert _leftovers(tmp_path) == []


# --------------------------------------------------------------------------- failures


def test_hash_mismatch_names_both_digests_and_keeps_nothing(server, tmp_path, mini):
    name = PREFIX["in_vitro"] + "metadata.txt.gz"
    wrong = "0" * 64
    with pytest.raises(DownloadError) as info:
        _load(server, tmp_path, mini, hashes={**mini.hashes(), name: wrong})
    message = str(info.value)
    assert name in message
    assert wrong in message
    assert sha256(mini.files[name]) in message
    assert "hash mismatch" in message
    assert "hashes=" in message
    assert not (tmp_path / "larry" / name).exists()
    assert not (tmp_path / "larry_in_vitro.h5ad").exists()
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize(("mode", "status"), [("e404", "404"), ("e500", "500")])
def test_http_errors_name_url_and_status(server, tmp_path, mini, mode, status):
    with pytest.raises(DownloadError) as info:
        _load(server, tmp_path, mini, base_url=server.url(mode))
    message = str(info.value)
    first = PREFIX["in_vitro"] + "metadata.txt.gz"
    assert f"{server.url(mode)}{first}" in message
    assert f"HTTP {status}" in message
    assert "base_url=" in message and "mirrors=" in message
    assert info.value.filename == first
    assert not (tmp_path / "larry_in_vitro.h5ad").exists()
    assert _leftovers(tmp_path) == []


def test_every_failed_url_is_reported(server, tmp_path, mini):
    mirrors = [server.url("e500"), server.url("cut")]
    with pytest.raises(DownloadError) as info:
        _load(server, tmp_path, mini, base_url=server.url("e404"), mirrors=mirrors)
    failures = info.value.failures
    assert [url.rsplit("/", 2)[1] for url, _ in failures] == ["e404", "e500", "cut"]
    assert "HTTP 404" in failures[0][1]
    assert "HTTP 500" in failures[1][1]
    assert "cut" in failures[2][1]


def test_falls_back_to_mirror(server, tmp_path, mini):
    adata = _load(
        server,
        tmp_path,
        mini,
        base_url=server.url("e500"),
        mirrors=[server.url("e404"), server.url("ok") + "{filename}"],
    )
    assert adata.shape == (N_CELLS, N_GENES)
    modes = [path.split("/")[1] for path in server.requests]
    assert modes.count("e500") == modes.count("e404") == modes.count("ok") == 6


def test_connection_cut_leaves_no_partial_file(server, tmp_path, mini):
    with pytest.raises(DownloadError, match="cut mid-transfer"):
        _load(server, tmp_path, mini, base_url=server.url("cut"))
    assert not any((tmp_path / "larry").glob("stateFate*"))
    assert _leftovers(tmp_path) == []
    # The same files complete from a mirror afterwards.
    adata = _load(server, tmp_path, mini, base_url=server.url("cut"), mirrors=[server.url()])
    assert adata.shape == (N_CELLS, N_GENES)


def test_unresponsive_and_unreachable_hosts_fail_fast(server, tmp_path, mini):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}/"
    start = time.perf_counter()
    with pytest.raises(DownloadError) as info:
        _load(server, tmp_path, mini, base_url=closed, mirrors=[server.url("slow")], timeout=0.3)
    assert time.perf_counter() - start < 5
    reasons = [reason for _, reason in info.value.failures]
    assert "connection failed" in reasons[0]
    assert "timed out" in reasons[1]


@pytest.mark.parametrize(
    ("part", "fragment"),
    [
        ("metadata", "counts.mtx.gz has 30 rows but stateFate_inVitro_metadata.txt.gz has 29"),
        ("genes", "has 12 columns but stateFate_inVitro_gene_names.txt.gz lists 11 genes"),
        ("clones", "stateFate_inVitro_clone_matrix.mtx.gz (29, 5) equals the 30 cells"),
    ],
)
def test_inconsistent_shapes_are_reported_and_nothing_is_written(
    server, tmp_path, mini, part, fragment
):
    prefix = PREFIX["in_vitro"]
    if part == "metadata":
        server.files[prefix + "metadata.txt.gz"] = _tsv(mini.metadata.iloc[:-1])
    elif part == "genes":
        server.files[prefix + "gene_names.txt.gz"] = _gz("\n".join(mini.genes[:-1]).encode())
    else:
        server.files[prefix + "clone_matrix.mtx.gz"] = _mtx(mini.clones[:-1])
    hashes = {name: sha256(body) for name, body in server.files.items()}
    with pytest.raises(ValueError) as info:
        _load(server, tmp_path, mini, hashes=hashes)
    message = str(info.value)
    assert fragment in message
    assert "Shapes:" in message and f"{prefix}normed_counts.mtx.gz: 30 x 12" in message
    assert not (tmp_path / "larry_in_vitro.h5ad").exists()
    assert _leftovers(tmp_path) == []


def test_unverified_file_that_does_not_parse_is_dropped(server, tmp_path, mini):
    name = PREFIX["in_vitro"] + "normed_counts.mtx.gz"
    server.files[name] = mini.files[name][:-10]  # truncated gzip, and no digest to catch it
    hashes = {k: v for k, v in mini.hashes().items() if k != name}
    with pytest.raises(ValueError, match="Could not parse") as info:
        _load(server, tmp_path, mini, hashes={**hashes, name: None})
    assert "deleted" in str(info.value)
    assert not (tmp_path / "larry" / name).exists()
    assert not (tmp_path / "larry_in_vitro.h5ad").exists()


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="Unknown LARRY experiment"):
        larry("in_silico", cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"unknown file 'typo\.gz'"):
        larry(cache_dir=tmp_path, hashes={"typo.gz": "0" * 64})


def test_known_digests_apply_by_default(server, tmp_path, mini):
    # The miniature metadata is not the real file, so the published digest rejects it.
    with pytest.raises(DownloadError) as info:
        _load(server, tmp_path, mini, hashes=None)
    assert "c88e02cc512205e7033e28bf512f5d0dd43b98ba547fdd4a196b4bd9b62d7c07" in str(info.value)


def test_default_urls_need_no_network():
    name = "stateFate_inVivo_metadata.txt.gz"
    assert _urls(name, "in_vivo", None, None) == [
        BASE_URL + name,
        f"https://ftp.ncbi.nlm.nih.gov/geo/samples/GSM4185nnn/GSM4185643/suppl/GSM4185643_{name}",
    ]
    extra = "stateFate_inVitro_neutrophil_pseudotime.txt.gz"
    assert _urls(extra, "in_vitro", None, None) == [BASE_URL + extra]  # not on GEO
    assert _urls(extra, "in_vitro", "http://h/x", ["http://m/", "http://t/{filename}.v2"]) == [
        "http://h/x/" + extra,
        "http://m/" + extra,
        f"http://t/{extra}.v2",
    ]
    assert larry_filenames("cytokine_perturbation") == [
        f"stateFate_cytokinePerturbation_{part}"
        for part in (
            "metadata.txt.gz",
            "gene_names.txt.gz",
            "clone_matrix.mtx.gz",
            "normed_counts.mtx.gz",
        )
    ]


# --------------------------------------------------------------------------- cache folder


def test_cache_dir_argument_env_and_default(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_ADATA_CACHE", str(tmp_path / "from_env"))
    assert cache_dir(tmp_path / "explicit") == tmp_path / "explicit"
    assert cache_dir() == tmp_path / "from_env"
    monkeypatch.delenv("TORCH_ADATA_CACHE")
    assert cache_dir().name == "torch_adata"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir("~/data") == tmp_path / "data"


def test_larry_uses_env_cache(server, tmp_path, mini, monkeypatch):
    monkeypatch.setenv("TORCH_ADATA_CACHE", str(tmp_path / "env_cache"))
    _load(server, None, mini)
    assert (tmp_path / "env_cache" / "larry_in_vitro.h5ad").is_file()
    assert (tmp_path / "env_cache" / "larry" / "stateFate_inVitro_metadata.txt.gz").is_file()


def test_fetch_force_keeps_old_copy_when_download_fails(server, tmp_path):
    server.files["a.txt"] = b"version 1"
    path = fetch("a.txt", [server.url() + "a.txt"], sha256(b"version 1"), tmp_path, False)
    assert path.read_bytes() == b"version 1"
    with pytest.raises(DownloadError):
        fetch("a.txt", [server.url("e500") + "a.txt"], None, tmp_path, False, force=True)
    assert path.read_bytes() == b"version 1"
    server.files["a.txt"] = b"version 2"
    fetch("a.txt", [server.url() + "a.txt"], None, tmp_path, False, force=True)
    assert path.read_bytes() == b"version 2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_fetch_progress_bar(server, tmp_path, capsys):
    server.files["b.bin"] = bytes(range(256)) * 64
    fetch("b.bin", [server.url() + "b.bin"], None, tmp_path, True, timeout=TIMEOUT)
    assert (tmp_path / "b.bin").stat().st_size == 256 * 64
    assert "16.4k" in capsys.readouterr().err  # tqdm's bar on stderr


# --------------------------------------------------------------------------- preprocess


def _normalised(n_obs=120, n_vars=80, seed=0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    counts = rng.poisson(rng.gamma(0.5, 4.0, size=n_vars), size=(n_obs, n_vars)).astype(float)
    counts[:, 0] += 1  # no empty cell
    scaled = counts / counts.sum(1, keepdims=True) * 1000
    adata = ad.AnnData(X=sp.csr_matrix(scaled, dtype=np.float32))
    adata.obs["Time point"] = rng.choice([2, 4, 6], n_obs)
    return adata


def test_preprocess_shapes_and_no_mutation():
    pytest.importorskip("scanpy")
    from torch_adata.datasets import preprocess

    adata = _normalised()
    before = adata.copy()
    out = preprocess(adata, n_top_genes=30, n_pcs=10)
    assert out is not adata
    assert out.shape == adata.shape
    assert out.obsm["X_pca"].shape == (120, 10) and out.obsm["X_pca"].dtype == np.float32
    assert out.varm["PCs"].shape == (80, 10)
    hvg = out.var["highly_variable"].to_numpy()
    assert hvg.sum() == 30
    assert np.all(out.varm["PCs"][~hvg] == 0)
    assert "log1p" in out.uns and out.uns["pca"]["params"]["log1p_applied"]
    variance_ratio = out.uns["pca"]["variance_ratio"]
    assert np.all(np.diff(variance_ratio) <= 1e-6)

    # The input is untouched.
    assert (adata.X != before.X).nnz == 0
    assert list(adata.obs.columns) == ["Time point"]
    assert list(adata.var.columns) == [] and dict(adata.uns) == {}
    assert list(adata.obsm) == [] and list(adata.varm) == []


def test_preprocess_options():
    pytest.importorskip("scanpy")
    from torch_adata.datasets import preprocess

    adata = _normalised()
    logged = preprocess(adata, n_top_genes=500, n_pcs=5, scale=False, key_added="X_small")
    assert logged.var["highly_variable"].all()  # fewer genes than n_top_genes: all kept
    assert logged.obsm["X_small"].shape == (120, 5)
    assert "X_small_PCs" in logged.varm and "X_small" in logged.uns
    again = preprocess(logged, n_top_genes=20, n_pcs=5)  # already log: no second log1p
    assert (again.X != logged.X).nnz == 0
    assert not again.uns["pca"]["params"]["log1p_applied"]

    same = preprocess(adata, n_top_genes=20, n_pcs=5, copy=False)
    assert same is adata and "X_pca" in adata.obsm
    with pytest.raises(ValueError, match="n_pcs=200"):
        preprocess(_normalised(), n_pcs=200)


def test_preprocess_without_scanpy(monkeypatch):
    from torch_adata.datasets import preprocess

    monkeypatch.setitem(__import__("sys").modules, "scanpy", None)
    with pytest.raises(ImportError, match=r"pip install torch-adata\[examples\]"):
        preprocess(_normalised())
