"""Whether a byte range of an open file is in the page cache, asked without reading it.

Linux 6.5 and later answer with the ``cachestat`` system call (how many pages of a range are
cached; no read, no read-ahead). Older kernels answer with ``mincore`` over a small read-only
mapping of the range (mapping a file reads nothing until a page is touched, and this module
touches none). Where neither is available (other systems, a sandbox that refuses both),
:func:`resident` returns ``None`` and the caller decides another way.

A probe that reads (``preadv`` with ``RWF_NOWAIT``) would also answer, but reading a page that
is not cached starts the kernel's read-ahead of the pages after it: probing a cold batch then
reads data it never uses, and makes the answer for the next probe wrong.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import platform
import sys

# cachestat's number in the unified system call table (the same on these architectures)
_CACHESTAT_NR = {"x86_64": 451, "aarch64": 451, "arm64": 451, "riscv64": 451}.get(
    platform.machine()
)
_PAGE = mmap.PAGESIZE


class _Range(ctypes.Structure):  # struct cachestat_range
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):  # struct cachestat
    _fields_ = [
        ("nr_cache", ctypes.c_uint64),
        ("nr_dirty", ctypes.c_uint64),
        ("nr_writeback", ctypes.c_uint64),
        ("nr_evicted", ctypes.c_uint64),
        ("nr_recently_evicted", ctypes.c_uint64),
    ]


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    libc.syscall.restype = ctypes.c_long
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return libc


_LIBC = _libc()
# the method that answered last: "cachestat", then "mincore", then None (none works here)
_method: str | None = "cachestat" if _CACHESTAT_NR else "mincore"
if _LIBC is None:
    _method = None


def _pages(offset: int, length: int) -> tuple[int, int]:
    """The page-aligned start and the number of pages covering ``[offset, offset + length)``."""
    first = offset - offset % _PAGE
    return first, -(-(offset + length - first) // _PAGE)


def _by_cachestat(fd: int, offset: int, length: int) -> bool | None:
    first, pages = _pages(offset, length)
    rng, stat = _Range(first, pages * _PAGE), _Stat()
    if _LIBC.syscall(_CACHESTAT_NR, fd, ctypes.byref(rng), ctypes.byref(stat), 0) == 0:
        return stat.nr_cache >= pages
    if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP):
        return None  # not on this kernel, refused by a sandbox, or not for this file system
    raise OSError(ctypes.get_errno(), f"cachestat: {os.strerror(ctypes.get_errno())}")


def _by_mincore(fd: int, offset: int, length: int) -> bool | None:
    first, pages = _pages(offset, length)
    size = pages * _PAGE
    address = _LIBC.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, first)
    if address in (None, ctypes.c_void_p(-1).value):
        return None
    try:
        vec = (ctypes.c_ubyte * pages)()
        if _LIBC.mincore(address, size, vec) != 0:
            return None
        return all(v & 1 for v in vec)
    finally:
        _LIBC.munmap(address, size)


def resident(fd: int, offset: int, length: int) -> bool | None:
    """Whether every page of bytes ``[offset, offset + length)`` of ``fd`` is in the page cache.

    Parameters
    ----------
    fd
        A file descriptor open for reading.
    offset, length
        The byte range (``length > 0``; a range past the end of the file counts as not cached).

    Returns
    -------
    ``True`` or ``False``; ``None`` where the system cannot tell without reading.
    """
    global _method
    while _method is not None:
        answer = (_by_cachestat if _method == "cachestat" else _by_mincore)(fd, offset, length)
        if answer is not None:
            return answer
        _method = "mincore" if _method == "cachestat" else None  # ask the next way from now on
    return None


def method() -> str | None:
    """How :func:`resident` asks here: ``"cachestat"``, ``"mincore"`` or ``None``."""
    return _method
