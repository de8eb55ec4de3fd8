"""Write the offline intersphinx inventories in this folder (``<project>.inv``).

The docs build runs without network access, so ``conf.py`` points intersphinx at these small
inventories instead of downloading each project's ``objects.inv``. Each one lists the objects
our pages and docstrings link to, with the page and anchor of that object in the project's
published documentation (the same target names the project's own inventory uses).

Every listed name is imported from the installed package before it is written, so a renamed or
removed object fails here instead of becoming a dead link. Run it after adding a target::

    python docs/_inv/make_inventories.py

then commit the changed ``.inv`` files.
"""

from __future__ import annotations

import importlib
import zlib
from pathlib import Path

HERE = Path(__file__).parent

# project -> (version shown in the inventory header, {target name: (role, page#anchor)}).
# "$" at the end of a location stands for the target name (Sphinx's inventory shorthand).
INVENTORIES: dict[str, tuple[str, dict[str, tuple[str, str]]]] = {
    "python": (
        "3",
        {
            "collections.abc.Callable": ("class", "library/collections.abc.html#$"),
            "collections.abc.Iterator": ("class", "library/collections.abc.html#$"),
            "collections.abc.Mapping": ("class", "library/collections.abc.html#$"),
            "collections.abc.Sequence": ("class", "library/collections.abc.html#$"),
            "typing.Any": ("data", "library/typing.html#$"),
            "typing.Literal": ("data", "library/typing.html#$"),
            "typing.NamedTuple": ("class", "library/typing.html#$"),
            "typing.Optional": ("data", "library/typing.html#$"),
            "Ellipsis": ("data", "library/constants.html#$"),
            "os.PathLike": ("class", "library/os.html#$"),
            "pathlib.Path": ("class", "library/pathlib.html#$"),
            "int": ("class", "library/functions.html#$"),
            "float": ("class", "library/functions.html#$"),
            "bool": ("class", "library/functions.html#$"),
            "str": ("class", "library/stdtypes.html#$"),
            "dict": ("class", "library/stdtypes.html#$"),
            "list": ("class", "library/stdtypes.html#$"),
            "tuple": ("class", "library/stdtypes.html#$"),
            "None": ("data", "library/constants.html#$"),
            "ValueError": ("exception", "library/exceptions.html#$"),
            "TypeError": ("exception", "library/exceptions.html#$"),
            "KeyError": ("exception", "library/exceptions.html#$"),
            "IndexError": ("exception", "library/exceptions.html#$"),
            "ImportError": ("exception", "library/exceptions.html#$"),
            "FileNotFoundError": ("exception", "library/exceptions.html#$"),
            "RuntimeError": ("exception", "library/exceptions.html#$"),
        },
    ),
    "numpy": (
        "stable",
        {
            "numpy.ndarray": ("class", "reference/generated/numpy.ndarray.html#$"),
            "numpy.dtype": ("class", "reference/generated/numpy.dtype.html#$"),
            "numpy.random.Generator": ("class", "reference/random/generator.html#$"),
        },
    ),
    "pandas": (
        "stable",
        {
            "pandas.DataFrame": ("class", "reference/api/pandas.DataFrame.html#$"),
            # the class's runtime path, which type hints render
            "pandas.core.frame.DataFrame": (
                "class",
                "reference/api/pandas.DataFrame.html#pandas.DataFrame",
            ),
            "pandas.Series": ("class", "reference/api/pandas.Series.html#$"),
            "pandas.Index": ("class", "reference/api/pandas.Index.html#$"),
            "pandas.core.indexes.base.Index": (
                "class",
                "reference/api/pandas.Index.html#pandas.Index",
            ),
            "pandas.Categorical": ("class", "reference/api/pandas.Categorical.html#$"),
        },
    ),
    "scipy": (
        "stable",
        {
            "scipy.sparse.csr_matrix": (
                "class",
                "reference/generated/scipy.sparse.csr_matrix.html#$",
            ),
            "scipy.sparse.csr_array": (
                "class",
                "reference/generated/scipy.sparse.csr_array.html#$",
            ),
        },
    ),
    "anndata": (
        "0.12",
        {
            "anndata.AnnData": ("class", "generated/anndata.AnnData.html#$"),
            # the class's runtime path, which type hints render
            "anndata._core.anndata.AnnData": (
                "class",
                "generated/anndata.AnnData.html#anndata.AnnData",
            ),
            "anndata.io.read_h5ad": ("function", "generated/anndata.io.read_h5ad.html#$"),
            # anndata re-exports read_h5ad at the top level; its docs page is the io one
            "anndata.read_h5ad": (
                "function",
                "generated/anndata.io.read_h5ad.html#anndata.io.read_h5ad",
            ),
            "anndata.settings": ("data", "generated/anndata.settings.html#$"),
        },
    ),
    "scanpy": (
        "stable",
        {
            f"scanpy.{name}": ("function", f"generated/scanpy.{name}.html#$")
            for name in (
                "pp.log1p",
                "pp.highly_variable_genes",
                "pp.scale",
                "pp.pca",
                "pp.neighbors",
                "tl.umap",
                "pl.umap",
                "pl.embedding",
            )
        },
    ),
    "torch": (
        "stable",
        {
            "torch.Tensor": ("class", "tensors.html#$"),
            "torch.dtype": ("class", "tensor_attributes.html#$"),
            "torch.device": ("class", "tensor_attributes.html#$"),
            "torch.Generator": ("class", "generated/torch.Generator.html#$"),
            "torch.sparse_csr_tensor": ("function", "generated/torch.sparse_csr_tensor.html#$"),
            "torch.utils.data.DataLoader": ("class", "data.html#$"),
            "torch.utils.data.Dataset": ("class", "data.html#$"),
            "torch.Tensor.to": ("method", "generated/torch.Tensor.to.html#$"),
            # runtime paths of the classes, which type hints render
            "torch.utils.data.dataloader.DataLoader": (
                "class",
                "data.html#torch.utils.data.DataLoader",
            ),
            "torch.utils.data.dataset.Dataset": ("class", "data.html#torch.utils.data.Dataset"),
            "torch.utils.data.Subset": ("class", "data.html#$"),
            "torch.utils.data.dataset.Subset": ("class", "data.html#torch.utils.data.Subset"),
            "torch.utils.data.BatchSampler": ("class", "data.html#$"),
            "torch.utils.data.distributed.DistributedSampler": ("class", "data.html#$"),
            # the same class under its public alias
            "torch.utils.data.DistributedSampler": (
                "class",
                "data.html#torch.utils.data.distributed.DistributedSampler",
            ),
        },
    ),
    "lightning": (
        "stable",
        {
            "lightning.pytorch.core.LightningDataModule": (
                "class",
                "api/lightning.pytorch.core.LightningDataModule.html#$",
            ),
            "lightning.pytorch.LightningDataModule": (
                "class",
                "api/lightning.pytorch.core.LightningDataModule.html"
                "#lightning.pytorch.core.LightningDataModule",
            ),
            "lightning.pytorch.core.datamodule.LightningDataModule": (
                "class",
                "api/lightning.pytorch.core.LightningDataModule.html"
                "#lightning.pytorch.core.LightningDataModule",
            ),
            "lightning.pytorch.core.LightningModule": (
                "class",
                "api/lightning.pytorch.core.LightningModule.html#$",
            ),
            "lightning.pytorch.callbacks.callback.Callback": (
                "class",
                "api/lightning.pytorch.callbacks.Callback.html"
                "#lightning.pytorch.callbacks.Callback",
            ),
            "lightning.pytorch.core.module.LightningModule": (
                "class",
                "api/lightning.pytorch.core.LightningModule.html"
                "#lightning.pytorch.core.LightningModule",
            ),
            "lightning.pytorch.LightningModule": (
                "class",
                "api/lightning.pytorch.core.LightningModule.html"
                "#lightning.pytorch.core.LightningModule",
            ),
            "lightning.pytorch.trainer.trainer.Trainer": (
                "class",
                "api/lightning.pytorch.trainer.trainer.Trainer.html#$",
            ),
            "lightning.pytorch.Trainer": (
                "class",
                "api/lightning.pytorch.trainer.trainer.Trainer.html"
                "#lightning.pytorch.trainer.trainer.Trainer",
            ),
            "lightning.pytorch.cli.LightningCLI": (
                "class",
                "api/lightning.pytorch.cli.LightningCLI.html#$",
            ),
            "lightning.pytorch.callbacks.prediction_writer.BasePredictionWriter": (
                "class",
                "api/lightning.pytorch.callbacks.BasePredictionWriter.html"
                "#lightning.pytorch.callbacks.BasePredictionWriter",
            ),
            "lightning.pytorch.callbacks.ModelCheckpoint": (
                "class",
                "api/lightning.pytorch.callbacks.ModelCheckpoint.html#$",
            ),
        },
    ),
    "pooch": (
        "latest",
        {
            "pooch.retrieve": ("function", "api/generated/pooch.retrieve.html#$"),
            "pooch.os_cache": ("function", "api/generated/pooch.os_cache.html#$"),
        },
    ),
}

BUILTINS = {"int", "float", "bool", "str", "dict", "list", "tuple", "None", "Ellipsis"}


def resolve(name: str) -> object:
    """Import the object called ``name`` (raises if it does not exist)."""
    if name in BUILTINS or name.endswith("Error"):
        return eval(name)  # a builtin
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            obj = getattr(obj, attribute)
        return obj
    raise ImportError(name)


def write(project: str, version: str, targets: dict[str, tuple[str, str]]) -> Path:
    """Write ``<project>.inv`` in Sphinx's inventory format (version 2)."""
    for name in targets:
        resolve(name)
    header = (
        "# Sphinx inventory version 2\n"
        f"# Project: {project}\n"
        f"# Version: {version}\n"
        "# The remainder of this file is compressed using zlib.\n"
    )
    lines = [
        f"{name} py:{role} 1 {location} -\n" for name, (role, location) in sorted(targets.items())
    ]
    path = HERE / f"{project}.inv"
    path.write_bytes(header.encode() + zlib.compress("".join(lines).encode(), 9))
    return path


if __name__ == "__main__":
    for project, (version, targets) in INVENTORIES.items():
        print(write(project, version, targets), len(targets), "targets")
