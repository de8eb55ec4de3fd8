"""Count VAE: a negative-binomial VAE on raw counts, its latent space then a UMAP.

Run::

    python examples/embedding.py --out outputs/embedding

(``--help`` lists the options). The model, its helpers and this script's steps live in the
installed :mod:`torch_adata.models.embedding`, so a checkpoint or a command-line config names the
model as ``torch_adata.models.embedding.CountVAE`` from anywhere; read that module for the code.
"""

from torch_adata.models.embedding import main

if __name__ == "__main__":
    main()
