"""The disk's limits on a given file: sequential read bandwidth and random-read IOPS.

Usage::

    python benchmarks/disk.py FILE                  # fio when installed, else the built-in
    python benchmarks/disk.py FILE --tool both      # both, to compare them
    python benchmarks/disk.py FILE --block-size 16384 --seconds 5

Three figures, each measured around the page cache (``O_DIRECT``), reading ``FILE`` itself:

``seq_mib_s`` / ``seq_mib_s_qd32``
    sequential read, 1 MiB requests, one in flight / 32 in flight, MiB/s (a reader that
    announces many ranges ahead, as block shuffle's read-ahead does, can pass the first);
``rand_iops_qd1`` / ``rand_iops_qd32``
    random reads of ``--block-size`` bytes (default 16 KiB, about one cell of the benchmark
    file) at aligned offsets, one request in flight / 32 in flight, reads/s.

With `fio <https://fio.readthedocs.io>`_ (``apt-get install fio``) the figures are fio's
(``--direct=1``, ``psync`` at depth 1, ``libaio`` at depth 32). Without it a small built-in
measures the same: ``O_DIRECT`` ``preadv`` into page-aligned buffers, 32 threads for depth 32
(sequential: each thread reads every 32nd request of one pass through the file). Where ``O_DIRECT`` is refused (tmpfs, some overlay file systems), both evict the
file's pages first (``posix_fadvise(DONTNEED)``) and read through the page cache; the result
says so (``"direct": false``), and random figures then grow as the cache fills.

The suite (``suite.py``) prints every cold figure as a fraction of these limits.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

SEQ_BLOCK = 2**20
ALIGN = 4096


def evict(path: str | Path) -> None:
    """Drop ``path``'s pages from the page cache (no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _open(path: str | Path) -> tuple[int, bool]:
    """Open for reading with ``O_DIRECT`` where the file system allows it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        buffer = mmap.mmap(-1, ALIGN)
        try:
            os.preadv(fd, [buffer], 0)
        finally:
            buffer.close()
        return fd, True
    except OSError:
        evict(path)
        return os.open(path, os.O_RDONLY), False


# -- built-in -----------------------------------------------------------------------------------


def _builtin_sequential(path: Path, seconds: float, depth: int = 1) -> tuple[float, bool]:
    """One pass through the file in ``SEQ_BLOCK`` requests (wrapping round), thread ``i`` of
    ``depth`` reading requests ``i, i + depth, ...``: ``depth`` requests in flight."""
    fd, direct = _open(path)
    requests = max(1, path.stat().st_size // SEQ_BLOCK)
    done = [0] * depth
    stop = threading.Event()

    def reader(i: int) -> None:
        buffer = mmap.mmap(-1, SEQ_BLOCK)
        try:
            k = i
            while not stop.is_set():
                done[i] += os.preadv(fd, [buffer], (k % requests) * SEQ_BLOCK)
                k += depth
        finally:
            buffer.close()

    elapsed = _run_threads(reader, depth, seconds, stop)
    os.close(fd)
    return sum(done) / elapsed / 2**20, direct


def _run_threads(reader, depth: int, seconds: float, stop: threading.Event) -> float:
    """Run ``reader(i)`` on ``depth`` threads for ``seconds``; the seconds they ran."""
    threads = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(depth)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def _builtin_random(path: Path, block: int, depth: int, seconds: float) -> tuple[float, bool]:
    fd, direct = _open(path)
    size = path.stat().st_size
    block = -(-block // ALIGN) * ALIGN
    slots = max(1, (size - block) // ALIGN)
    counts = [0] * depth
    stop = threading.Event()

    def reader(i: int) -> None:
        rng = np.random.default_rng(i)
        buffer = mmap.mmap(-1, block)
        try:
            while not stop.is_set():
                for offset in rng.integers(0, slots, 256).tolist():
                    os.preadv(fd, [buffer], offset * ALIGN)
                counts[i] += 256
        finally:
            buffer.close()

    elapsed = _run_threads(reader, depth, seconds, stop)
    os.close(fd)
    return sum(counts) / elapsed, direct


def builtin(path: str | Path, block_size: int = 16384, seconds: float = 5.0) -> dict:
    """The three figures with the built-in reader (no fio)."""
    path = Path(path)
    seq, direct = _builtin_sequential(path, seconds)
    seq32, _ = _builtin_sequential(path, seconds, 32)
    qd1, _ = _builtin_random(path, block_size, 1, seconds)
    qd32, _ = _builtin_random(path, block_size, 32, seconds)
    return {
        "tool": "built-in",
        "direct": direct,
        "block_size": block_size,
        "seq_mib_s": seq,
        "seq_mib_s_qd32": seq32,
        "rand_iops_qd1": qd1,
        "rand_iops_qd32": qd32,
    }


# -- fio ----------------------------------------------------------------------------------------


def _fio_job(path: Path, seconds: float, direct: bool, **job: str | int) -> dict:
    if not direct:
        evict(path)
    args = [
        "fio",
        "--name=disk",
        f"--filename={path}",
        "--readonly",
        f"--direct={int(direct)}",
        f"--runtime={seconds}",
        "--time_based",
        "--output-format=json",
        *[f"--{k}={v}" for k, v in job.items()],
    ]
    out = subprocess.run(args, capture_output=True, text=True, check=True)
    read = json.loads(out.stdout[out.stdout.index("{") :])["jobs"][0]["read"]
    return {"mib_s": read["bw_bytes"] / 2**20, "iops": read["iops"]}


def fio(path: str | Path, block_size: int = 16384, seconds: float = 5.0) -> dict:
    """The three figures with fio (``--output-format=json``)."""
    path = Path(path)
    fd, direct = _open(path)
    os.close(fd)
    seq = _fio_job(path, seconds, direct, rw="read", bs=SEQ_BLOCK, ioengine="psync")
    qd1 = _fio_job(path, seconds, direct, rw="randread", bs=block_size, ioengine="psync")
    try:
        seq32 = _fio_job(
            path, seconds, direct, rw="read", bs=SEQ_BLOCK, ioengine="libaio", iodepth=32
        )
        qd32 = _fio_job(
            path, seconds, direct, rw="randread", bs=block_size, ioengine="libaio", iodepth=32
        )
    except subprocess.CalledProcessError:  # fio built without libaio: 32 threads instead
        threads = {"ioengine": "psync", "numjobs": 32, "thread": 1, "group_reporting": 1}
        size = path.stat().st_size // 32 // SEQ_BLOCK * SEQ_BLOCK  # a 32nd of the file each
        seq32 = _fio_job(
            path,
            seconds,
            direct,
            rw="read",
            bs=SEQ_BLOCK,
            size=size,
            offset_increment=size,
            **threads,
        )
        qd32 = _fio_job(path, seconds, direct, rw="randread", bs=block_size, **threads)
    return {
        "tool": "fio",
        "direct": direct,
        "block_size": block_size,
        "seq_mib_s": seq["mib_s"],
        "seq_mib_s_qd32": seq32["mib_s"],
        "rand_iops_qd1": qd1["iops"],
        "rand_iops_qd32": qd32["iops"],
    }


def measure_disk(
    path: str | Path, block_size: int = 16384, seconds: float = 5.0, tool: str = "auto"
) -> dict:
    """Sequential MiB/s and random IOPS (depth 1 and 32) of the disk under ``path``.

    ``tool``: ``"fio"``, ``"builtin"``, or ``"auto"`` (fio when on the PATH).
    """
    if tool == "fio" or (tool == "auto" and shutil.which("fio")):
        return fio(path, block_size, seconds)
    return builtin(path, block_size, seconds)


def limits_text(limits: dict) -> str:
    return (
        f"{limits['seq_mib_s']:,.0f} MiB/s sequential"
        + (f" ({limits['seq_mib_s_qd32']:,.0f} at depth 32)" if "seq_mib_s_qd32" in limits else "")
        + f"; random {limits['block_size'] // 1024} KiB "
        f"reads {limits['rand_iops_qd1']:,.0f}/s at depth 1 and {limits['rand_iops_qd32']:,.0f}/s "
        f"at depth 32 ({limits['tool']}, {'O_DIRECT' if limits['direct'] else 'evicted, cached'})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path, help="the file to read (e.g. the benchmark .h5ad)")
    parser.add_argument("--block-size", type=int, default=16384, help="random read size")
    parser.add_argument("--seconds", type=float, default=5.0, help="per figure")
    parser.add_argument("--tool", choices=["auto", "fio", "builtin", "both"], default="auto")
    args = parser.parse_args()
    if not args.file.is_file():
        sys.exit(f"disk.py: {args.file} is not a file.")
    tools = ["fio", "builtin"] if args.tool == "both" else [args.tool]
    results = [measure_disk(args.file, args.block_size, args.seconds, t) for t in tools]
    for r in results:
        print(limits_text(r), file=sys.stderr)
    print(json.dumps(results if len(results) > 1 else results[0]))


if __name__ == "__main__":
    main()
