"""A small download layer on top of :mod:`pooch`.

Every download goes through :func:`pooch.retrieve`, which streams the file to a temporary
name in the destination folder, checks its SHA-256 digest, and only then moves it to its
final name. A failed, cut or mismatching download therefore never leaves anything under the
final name. This module adds what pooch leaves to the caller: trying mirrors in order, one
error that lists every URL tried and why it failed, forced re-downloads that keep the old copy
until the new one is complete, and the cache-folder convention of torch_adata.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pooch

__all__ = ["CACHE_ENV", "DownloadError", "cache_dir", "fetch"]

#: Environment variable that overrides the default cache folder.
CACHE_ENV = "TORCH_ADATA_CACHE"

#: Default network timeout in seconds (connect, and each wait between received bytes).
DEFAULT_TIMEOUT = 60.0

_CHUNK_SIZE = 1 << 20  # stream in 1 MiB pieces: pooch's 1 KiB default is slow for GB files


class DownloadError(RuntimeError):
    """A file could not be downloaded from any of its URLs.

    Attributes
    ----------
    filename
        Name of the file under the cache folder.
    failures
        One ``(url, reason)`` pair per URL tried, in order.
    """

    def __init__(self, filename: str, failures: Sequence[tuple[str, str]], cache: pathlib.Path):
        self.filename = filename
        self.failures = list(failures)
        lines = [f"Could not download {filename!r}; tried {len(self.failures)} URL(s):"]
        lines += [f"  - {url}\n      {reason}" for url, reason in self.failures]
        lines += [
            "How to fix:",
            "  - check the network connection (a proxy or firewall may block the host);",
            "  - point to another copy with base_url=... or mirrors=[...];",
            "  - if a re-hosted copy is known to differ byte-wise (re-compressed), pass its "
            "digest with hashes={" + repr(filename) + ": '<sha256>'};",
            f"  - delete the cache entry {cache / filename} (if present) and retry.",
        ]
        super().__init__("\n".join(lines))


def cache_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """Resolve the folder where torch_adata keeps downloads and built datasets.

    Parameters
    ----------
    path
        An explicit folder. Takes precedence over everything else.

    Returns
    -------
    pathlib.Path
        ``path`` if given, else the value of the ``TORCH_ADATA_CACHE`` environment variable
        if set and non-empty, else ``pooch.os_cache("torch_adata")`` (for example
        ``~/.cache/torch_adata`` on Linux). ``~`` is expanded; the folder is not created.
    """
    if path is not None:
        chosen = Path(path)
    elif os.environ.get(CACHE_ENV):
        chosen = Path(os.environ[CACHE_ENV])
    else:
        chosen = Path(pooch.os_cache("torch_adata"))
    return chosen.expanduser()


def fetch(
    filename: str,
    urls: Sequence[str],
    known_hash: str | None,
    cache: str | os.PathLike[str],
    progress: bool = True,
    *,
    force: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
) -> Path:
    """Download ``filename`` into ``cache`` from the first URL that works.

    Parameters
    ----------
    filename
        Name of the file in ``cache``.
    urls
        Full URLs to try in order: the primary host first, then mirrors.
    known_hash
        Expected SHA-256 digest (hex, optionally prefixed ``"sha256:"``; other pooch
        algorithms such as ``"md5:..."`` also work). ``None`` skips the check: the caller must
        then validate the content itself (for example by parsing it).
    cache
        Destination folder; created if missing.
    progress
        Show a tqdm progress bar and pooch's log lines while downloading.
    force
        Download again even if a valid copy is cached. The cached copy is replaced only once
        the new download is complete and verified.
    timeout
        Seconds to wait for a connection and between received bytes (not for the whole file).

    Returns
    -------
    pathlib.Path
        Path of the verified file, ``cache / filename``.

    Raises
    ------
    DownloadError
        If no URL yielded a complete file with the expected digest. The message lists every
        URL with its failure (HTTP status, connection error, or expected and actual digests).
    """
    cache = Path(cache)
    target = cache / filename
    if not urls:
        raise ValueError(f"No URL given for {filename!r}.")
    if not force and target.exists() and pooch.hashes.hash_matches(str(target), known_hash):
        return target

    cache.mkdir(parents=True, exist_ok=True)
    failures: list[tuple[str, str]] = []
    last_exc: BaseException | None = None
    with _quiet_pooch(not progress):
        for url in urls:
            try:
                _download_one(url, filename, known_hash, cache, progress, force, timeout)
            except Exception as exc:
                failures.append((url, _describe(exc, known_hash)))
                last_exc = exc
            else:
                return target
    raise DownloadError(filename, failures, cache) from last_exc


def _download_one(
    url: str,
    filename: str,
    known_hash: str | None,
    cache: Path,
    progress: bool,
    force: bool,
    timeout: float,
) -> None:
    downloader = _downloader(url, progress, timeout)
    if not force:
        # pooch writes to a temporary file in ``cache`` and moves it to ``filename`` only
        # after the digest matches; on any error the temporary file is removed.
        pooch.retrieve(url, known_hash, fname=filename, path=cache, downloader=downloader)
        return
    # A forced download goes to a private staging folder in the same file system, so the
    # cached copy survives a failed attempt and is swapped atomically on success.
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=cache))
    try:
        pooch.retrieve(url, known_hash, fname=filename, path=staging, downloader=downloader)
        os.replace(staging / filename, cache / filename)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _downloader(url: str, progress: bool, timeout: float):
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in ("http", "https"):
        return pooch.HTTPDownloader(progressbar=progress, chunk_size=_CHUNK_SIZE, timeout=timeout)
    if scheme == "ftp":
        return pooch.FTPDownloader(progressbar=progress, chunk_size=_CHUNK_SIZE, timeout=timeout)
    raise ValueError(f"unsupported URL scheme {scheme!r} (use http, https or ftp)")


_HASH_RE = re.compile(r"expected (\S+) but got (\S+?)\.?(?:\s|$)")


def _describe(exc: BaseException, known_hash: str | None) -> str:
    """One line explaining why a download attempt failed."""
    import requests  # pooch depends on requests; imported lazily as pooch does

    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        response = exc.response
        return f"HTTP {response.status_code} {response.reason or ''}".rstrip()
    if isinstance(exc, requests.Timeout):
        return f"timed out (no data for the timeout period): {exc}"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return f"connection cut mid-transfer, download incomplete: {exc}"
    if isinstance(exc, requests.ConnectionError):
        return f"connection failed: {exc}"
    if isinstance(exc, ValueError) and "hash" in str(exc).lower() and known_hash is not None:
        match = _HASH_RE.search(str(exc))
        if match:
            return (
                f"hash mismatch: expected {match.group(1)}, got {match.group(2)} "
                "(the download was deleted)"
            )
        return f"hash mismatch (the download was deleted): {exc}"
    return f"{type(exc).__name__}: {exc}"


@contextlib.contextmanager
def _quiet_pooch(quiet: bool) -> Iterator[None]:
    """Silence pooch's informational log lines while ``quiet`` is true."""
    if not quiet:
        yield
        return
    logger = pooch.get_logger()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
