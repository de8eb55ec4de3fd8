"""Trajectory: flow matching on optimal-transport pairs of cells between days.

Run::

    python examples/trajectory.py --out outputs/trajectory

(``--help`` lists the options). The model, its helpers and this script's steps live in the
installed :mod:`torch_adata.models.trajectory`, so a checkpoint or a command-line config names the
model as ``torch_adata.models.trajectory.DriftModel`` from anywhere; read that module for the code.
"""

from torch_adata.models.trajectory import main

if __name__ == "__main__":
    main()
