"""Plot a suite result: cells/s vs batch size, and peak memory vs dataset size.

Usage::

    python benchmarks/plot.py benchmarks/results/suite_full.json   # writes suite_full.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

STYLE = {
    "AnnDataset|memory": ("AnnDataset, in memory", "C0", "-"),
    "AnnDataset|backed": ("AnnDataset, backed", "C1", "-"),
    "batched|memory": ("X[idx].toarray(), in memory", "C0", "--"),
    "anndata-backed|backed": ("anndata backed adata[idx].X", "C1", "--"),
    "per-cell|memory": ("per-cell __getitem__, in memory", "C2", ":"),
}


def plot_suite(suite: dict, path: str | Path) -> Path:
    """Write the two-panel figure of ``suite`` (the dict ``suite.py`` saves) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, memory) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, result in suite["results"].items():
        if not key.startswith("sweep|") or "points" not in result:
            continue
        label, color, line = STYLE[key.split("|", 1)[1]]
        points = result["points"]
        speed.plot(
            [p["batch_size"] for p in points],
            [p["cells_per_s"] for p in points],
            line,
            color=color,
            marker="o",
            label=label,
        )
    speed.set(
        xscale="log",
        yscale="log",
        xlabel="batch size (cells)",
        ylabel="cells / s (median)",
        title=f"{int(suite['args']['cells']):,} cells, warm page cache, 0 workers",
    )
    speed.set_xticks(
        [64, 128, 256, 512, 1024, 2048], labels=["64", "128", "256", "512", "1k", "2k"]
    )
    speed.grid(True, which="both", alpha=0.3)
    speed.legend(fontsize=7, loc="best")

    sizes = sorted(suite["sizes"].items(), key=lambda kv: int(kv[0]))
    for field, mode, label, color, line in (
        ("peak_rss_mib", "backed", "backed, peak RSS", "C1", "-"),
        ("peak_anon_mib", "backed", "backed, peak anonymous memory", "C1", "--"),
        ("peak_rss_mib", "memory", "in memory, peak RSS", "C0", "-"),
    ):
        xs = [int(c) for c, row in sizes if field in row.get(mode, {})]
        ys = [row[mode][field] for c, row in sizes if field in row.get(mode, {})]
        memory.plot(xs, ys, line, color=color, marker="o", label=label)
    xs = [int(c) for c, _ in sizes]
    memory.plot(xs, [row["file_mib"] for _, row in sizes], ":", color="gray", label="file size")
    empty = suite["results"].get("empty", {})
    if empty.get("peak_rss_mib"):
        memory.axhline(empty["peak_rss_mib"], color="k", lw=0.8, label="empty process, RSS")
    if empty.get("anon_mib"):
        memory.axhline(empty["anon_mib"], color="k", lw=0.8, ls="--", label="empty process, anon")
    memory.set(
        xscale="log",
        yscale="log",
        xlabel="cells in the file",
        ylabel="MiB",
        title="memory vs dataset size (AnnDataset, uniform)",
    )
    memory.grid(True, which="both", alpha=0.3)
    memory.legend(fontsize=8)
    fig.suptitle(f"torch_adata benchmark suite, {suite['when']}, commit {suite['commit']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result", type=Path, help="a suite_*.json file")
    parser.add_argument("--out", type=Path, help="PNG path (default: next to the JSON)")
    args = parser.parse_args()
    out = plot_suite(
        json.loads(args.result.read_text()), args.out or args.result.with_suffix(".png")
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
