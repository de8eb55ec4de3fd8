"""The example models, installed so that a checkpoint or a command-line config names them
from anywhere (``torch_adata.models.classifier.CellTypeClassifier``).

Each module holds one ``LightningModule``, its helpers, and the ``run``/``main`` its script in
``examples/`` calls: :mod:`~torch_adata.models.classifier` (``CellTypeClassifier``),
:mod:`~torch_adata.models.embedding` (``CountVAE``) and :mod:`~torch_adata.models.trajectory`
(``DriftModel``). They need the ``examples`` extra (``pip install 'torch-adata[examples]'``).

This is the top layer: nothing else in torch_adata imports it, and ``import torch_adata`` does
not (``torch_adata.models`` is imported on first use).
"""
