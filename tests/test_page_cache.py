"""Asking whether a file's bytes are in the page cache, without reading them.

A real ``.h5ad`` file written by anndata (``test_read_ahead``'s, ~5 MiB), evicted with ``posix_fadvise(DONTNEED)`` and partly
read; the page cache's own answer comes from ``mincore`` over a mapping of the whole file
(``_resident_pages``), which starts no read.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import test_read_ahead
from conftest import backed_csr_readers, evict
from test_read_ahead import _resident_pages

from torch_adata import AnnDataset, _gather, _page_cache
from torch_adata._page_cache import resident

pytestmark = pytest.mark.skipif(
    _page_cache.method() is None or not hasattr(os, "posix_fadvise"),
    reason="needs Linux (cachestat or mincore, posix_fadvise)",
)
MiB = 1 << 20
rows_file = test_read_ahead.rows_file  # its module-scoped fixture: the same file


def _evict_fully(path, fd) -> np.ndarray:
    """Evict the file until ``mincore`` sees none of its pages cached and none arrives for a
    while, and return that residency: the kernel's read-ahead of an earlier read can land
    after one ``DONTNEED`` (one CI run under load found pages cached after eviction)."""
    quiet = 0
    for _ in range(100):
        evict(path)
        time.sleep(0.02)
        pages = _resident_pages(fd)
        quiet = quiet + 1 if pages.sum() == 0 else 0
        if quiet == 3:
            break
    return pages


@pytest.fixture(params=["cachestat", "mincore"])
def way(request, monkeypatch):
    """Each way of asking, where this system has it."""
    if request.param == "cachestat" and _page_cache._CACHESTAT_NR is None:
        pytest.skip("no cachestat on this architecture")
    monkeypatch.setattr(_page_cache, "_method", request.param)
    return request.param


def test_answers_for_an_evicted_then_partly_read_file(rows_file, way):
    path, _ = rows_file
    evict(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.fstat(fd).st_size > 4 * MiB
        assert not resident(fd, 2 * MiB, 4096)
        assert not resident(fd, 3 * MiB + 100, 10)
        assert len(os.pread(fd, 256 << 10, 2 * MiB)) == 256 << 10  # [2 MiB, 2.25 MiB)
        if way == "cachestat" and _page_cache.method() != "cachestat":
            pytest.skip("the kernel has no cachestat (Linux < 6.5)")
        assert resident(fd, 2 * MiB, 4096)
        assert resident(fd, 2 * MiB + 5000, 200_000)  # unaligned, many pages
        assert resident(fd, 2 * MiB, 256 << 10)
        assert not resident(fd, 2 * MiB - 4096, 8192)  # the page before the read is not cached
        assert not resident(fd, MiB, 4096)  # read-ahead goes forward only
        assert _page_cache.method() == way
    finally:
        os.close(fd)


def test_asking_makes_nothing_resident(rows_file, way):
    path, _ = rows_file
    fd = os.open(path, os.O_RDONLY)
    try:
        before = _evict_fully(path, fd)
        assert before.sum() == 0  # nothing cached: the eviction took
        offsets = range(0, os.fstat(fd).st_size, 64 << 10)
        answers = [resident(fd, offset, 4096) for offset in offsets]
        assert not any(answers)
        after = _resident_pages(fd)
        np.testing.assert_array_equal(after, before)
    finally:
        os.close(fd)


def test_the_engine_probe_reads_nothing_and_sees_a_read_batch(rows_file, way):
    """``_gather._cached`` (asked before each concurrent batch read) on a cold batch: ``False``
    and no page of the file made resident; after the batch is read: ``True``, and the rows
    equal anndata's."""
    path, dense = rows_file
    dataset = AnnDataset(path, backed=True)
    rows = np.array([3, 100, 240, 377, 501, 590])
    np.testing.assert_array_equal(dataset[rows[:1]].numpy(), dense[rows[:1]])  # opened
    (reader,) = backed_csr_readers(dataset)
    st = reader._open()
    fd, layout = st.descriptor.fd, st.layout
    starts = layout.indptr[rows]
    lengths = layout.indptr[rows + 1] - starts
    before = _evict_fully(path, fd)
    assert _gather._cached(fd, layout.layouts[0], 4, starts, lengths) is False
    np.testing.assert_array_equal(_resident_pages(fd), before)
    np.testing.assert_array_equal(dataset[rows].numpy(), dense[rows])
    assert _gather._cached(fd, layout.layouts[0], 4, starts, lengths) is True


def test_without_a_way_to_ask_the_engine_reads_without_waiting(rows_file, monkeypatch):
    """Where neither cachestat nor mincore answers, ``_cached`` falls back to a read that does
    not wait for the disk (``RWF_NOWAIT``)."""
    if not hasattr(os, "RWF_NOWAIT"):
        pytest.skip("no RWF_NOWAIT")
    monkeypatch.setattr(_page_cache, "_method", None)
    path, dense = rows_file
    dataset = AnnDataset(path, backed=True)
    rows = np.array([10, 300, 550])
    np.testing.assert_array_equal(dataset[rows].numpy(), dense[rows])
    (reader,) = backed_csr_readers(dataset)
    st = reader._open()
    starts = st.layout.indptr[rows]
    lengths = st.layout.indptr[rows + 1] - starts
    assert resident(st.descriptor.fd, 0, 4096) is None
    assert _gather._cached(st.descriptor.fd, st.layout.layouts[0], 4, starts, lengths) is True
