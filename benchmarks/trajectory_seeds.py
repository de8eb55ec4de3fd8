"""The trajectory model and its baselines on several seeds, in PCA 50 and in the latent space.

Runs ``examples/trajectory.py`` (``torch_adata.models.trajectory.main``) once per seed and
embedding, each in a fresh process, then writes every run's ``metrics.json`` into one JSON
that ``docs/tutorials/examples.md`` and ``docs/larry.md`` read (``--json``, default
``docs/_static/trajectory_seeds.json``)::

    python benchmarks/trajectory_seeds.py --out benchmarks/results/trajectory
    python benchmarks/trajectory_seeds.py --out DIR --collect   # only gather finished runs

Other arguments after ``--`` go to every run (e.g. ``-- --n-cells 50000``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parents[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/trajectory")
    parser.add_argument("--json", type=Path, default=REPO / "docs/_static/trajectory_seeds.json")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--embeddings", nargs="+", default=["pca", "latent"])
    parser.add_argument("--collect", action="store_true", help="gather finished runs only")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    runs = []
    for embedding in args.embeddings:
        for seed in args.seeds:
            out = args.out / f"{embedding}{seed}"
            if not args.collect:
                command = [sys.executable, str(REPO / "examples/trajectory.py"), "--out", str(out)]
                command += ["--embedding", embedding, "--seed", str(seed), *extra]
                subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            runs.append(json.loads((out / "metrics.json").read_text()))
    args.json.write_text(json.dumps(runs, indent=1) + "\n")
    print(f"{len(runs)} runs in {args.json}")


if __name__ == "__main__":
    main()
