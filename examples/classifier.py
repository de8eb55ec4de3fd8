"""Cell-type classifier: an MLP from expression to the cell type.

Run::

    python examples/classifier.py --out outputs/classifier

(``--help`` lists the options). The model, its helpers and this script's steps live in the
installed :mod:`torch_adata.models.classifier`, so a checkpoint or a command-line config names the
model as ``torch_adata.models.classifier.CellTypeClassifier`` from anywhere; read that module for the code.
"""

from torch_adata.models.classifier import main

if __name__ == "__main__":
    main()
