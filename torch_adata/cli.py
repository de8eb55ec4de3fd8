"""The ``torch-adata`` command: Lightning's ``LightningCLI`` over :class:`~torch_adata.AnnDataModule`.

Subcommands are Lightning's own: ``fit``, ``validate``, ``test`` and ``predict``. The data
module is always :class:`~torch_adata.AnnDataModule` (its arguments go under ``data:``); the model
is any ``LightningModule``, named by ``class_path`` under ``model:``. Example configs live in
``examples/configs/``::

    torch-adata fit --config examples/configs/classifier.yaml --trainer.accelerator auto
    torch-adata predict --config examples/configs/classifier.yaml --ckpt_path <checkpoint>

The example configs name installed classes (``class_path:
torch_adata.models.classifier.CellTypeClassifier``), so their checkpoints load from any Python
session. Class paths are also resolved from the current directory (it is put first on
``sys.path``, as ``python -m`` does), so a model of your own in ``mymodels.py`` is found as
``mymodels.MyModel``.

``predict`` writes the predictions back into the AnnData and saves an ``.h5ad`` when the trainer
has an :class:`AnnDataPredictionWriter` callback (the example configs add one); it logs where.
``torch-adata --version`` prints the version. The command needs ``jsonargparse`` (the ``cli``
extra); without it, it says how to install it.

``torch-adata shuffle SOURCE DESTINATION [--seed N] [--overwrite] [--chunk-mib M]`` writes a
shuffled copy of an ``.h5ad`` file (:func:`~torch_adata.write_shuffled`); it needs no
jsonargparse.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import lightning.pytorch as pl
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from .datamodule import AnnDataModule

try:  # jsonargparse (the `cli` extra) is imported here when it is installed
    from lightning.pytorch.cli import LightningCLI
except ImportError:  # installed but not importable: the command says so (_missing_jsonargparse)
    LightningCLI = object  # type: ignore[assignment,misc]


def _missing_jsonargparse() -> str | None:
    """Why the command line cannot run (jsonargparse missing or too old), or None."""
    try:
        import jsonargparse  # noqa: F401
        from lightning.pytorch.cli import _JSONARGPARSE_SIGNATURES_AVAILABLE as available
    except ImportError as err:
        reason = f"jsonargparse cannot be imported ({err})"
    else:
        if available:
            return None
        reason = str(available)
    return (
        f"torch-adata: the command line needs jsonargparse, from the `cli` extra: {reason}. "
        "Install it with `pip install 'torch-adata[cli]'` (or `pip install "
        "'jsonargparse[signatures]>=4.27'`). The Python API (AnnDataset, AnnDataModule) works "
        "without it."
    )


__all__ = [
    "AnnDataCLI",
    "AnnDataPredictionWriter",
    "check_class_path",
    "main",
    "run_cli",
    "shuffle_command",
]


class AnnDataPredictionWriter(Callback):
    """Write ``predict`` outputs into a copy of the data module's AnnData and save it as ``.h5ad``.

    Uses :meth:`AnnDataModule.write_predictions <torch_adata.AnnDataModule.write_predictions>`,
    so cells keep the AnnData's order and every obs/obsm entry of the input is kept.

    Parameters
    ----------
    output_path
        Where to save the ``.h5ad`` (parent directories are created); default
        ``<trainer.default_root_dir>/predictions.h5ad``.
    key
        Where the outputs go, as ``key`` of
        :meth:`~torch_adata.AnnDataModule.write_predictions`: a name for a tensor output (the
        obsm key of a 2-D output, the obs column of a 1-D one), a list of names for a tuple,
        ``None`` (entries under their own names) or ``{output name: key}`` for a dict.
    decode
        ``{written key: obs column of the labels}``, as ``labels`` of
        :meth:`~torch_adata.AnnDataModule.write_predictions`: label codes (or per-class scores)
        become a categorical obs column of label names (e.g.
        ``{"predicted": "Cell type annotation"}``).
    per_source
        For a collection of sources: save one ``.h5ad`` per source instead, each source's own
        AnnData with its cells' predictions (``per_source=True`` of
        :meth:`~torch_adata.AnnDataModule.write_predictions`), named after the source key
        (``.h5ad`` added when it lacks it), in the folder ``output_path`` (default
        ``<trainer.default_root_dir>/predictions/``). A source file is never overwritten: a
        folder that holds them is refused.

    Notes
    -----
    For a data module that reads a backed ``.h5ad``, the file is loaded into memory once to
    write the copy. For a collection of sources, the file holds every cell in the collection's
    order with the sources' ``obs`` (and the source column), the predictions and no ``X`` (see
    :meth:`~torch_adata.AnnDataModule.write_predictions`). Run ``predict`` on one device: the predictions of all batches must be in this process.
    It is a plain ``Callback`` that reads the predict loop's outputs at the end of the epoch,
    not a ``BasePredictionWriter``: it needs no batch indices, so Lightning has none to infer
    (and no "Couldn't infer the batch indices" warning to give).
    """

    def __init__(
        self,
        output_path: str | os.PathLike | None = None,
        key: str | Mapping[str, str] | None = None,
        decode: Mapping[str, str] | None = None,
        per_source: bool = False,
    ):
        super().__init__()
        self.output_path = None if output_path is None else Path(output_path)
        self.per_source = per_source
        self.key = key
        self.decode = dict(decode or {})
        self.written_path: Path | None = None  # set once predictions are saved

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the epoch's predictions (Lightning calls this at the end of ``predict``).

        Parameters
        ----------
        trainer, pl_module
            The running trainer and model.
        """
        self.write_on_epoch_end(trainer, pl_module, trainer.predict_loop.predictions, [])

    def write_on_epoch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        predictions: Sequence[Any],
        batch_indices: Sequence[Any],
    ) -> None:
        """Write ``predictions`` into a copy of the data module's AnnData and save it.

        Parameters
        ----------
        trainer, pl_module
            The running trainer and model.
        predictions
            The outputs of every predict batch, in loader order.
        batch_indices
            Unused (rows come from the data module's predict loader).
        """
        datamodule = trainer.datamodule
        if not isinstance(datamodule, AnnDataModule):
            raise TypeError(
                "AnnDataPredictionWriter needs an AnnDataModule as the trainer's datamodule; "
                f"got {type(datamodule).__name__}. Pass datamodule= to trainer.predict."
            )
        if trainer.world_size > 1:
            raise RuntimeError(
                "AnnDataPredictionWriter collects all predictions in one process: run predict "
                "with --trainer.devices 1."
            )
        if len(predictions) == 0:
            raise ValueError(
                "No predictions reached the writer: call trainer.predict with "
                "return_predictions=True (the default on one device)."
            )
        if self.key is None and not isinstance(predictions[0], Mapping):
            raise ValueError(
                "The model's predict_step returns a tensor (or a tuple): give the writer a key "
                '(e.g. key: "X_model", or a list of names for a tuple) to name the output.'
            )
        if self.per_source:
            self._write_per_source(trainer, datamodule, predictions)
            return
        target = None
        if datamodule.collection is None and datamodule.adata is None:
            target = ad.read_h5ad(datamodule.source)  # a backed file: write into a copy
        adata = datamodule.write_predictions(
            predictions, key=self.key, labels=self.decode or None, adata=target
        )
        path = self.output_path or Path(trainer.default_root_dir) / "predictions.h5ad"
        path.parent.mkdir(parents=True, exist_ok=True)
        adata.write_h5ad(path)
        self.written_path = path
        rank_zero_info(f"torch-adata: predictions of {adata.n_obs} cells written to {path}")

    def _write_per_source(self, trainer, datamodule: AnnDataModule, predictions) -> None:
        """One ``.h5ad`` per source of the collection, in the folder ``output_path``."""
        collection = datamodule.collection
        if collection is None:
            raise ValueError(
                "AnnDataPredictionWriter(per_source=True) writes one file per source of a "
                "collection, and this data module reads one AnnData: drop per_source."
            )
        folder = self.output_path or Path(trainer.default_root_dir) / "predictions"
        names = [key if key.endswith(".h5ad") else f"{key}.h5ad" for key in collection.keys]
        sources = {Path(p).resolve() for p in collection.paths if p is not None}
        clash = [n for n in names if (folder / n).resolve() in sources]
        if clash:
            raise ValueError(
                f"AnnDataPredictionWriter(per_source=True) would overwrite the source files "
                f"{clash[:5]} in '{folder}': give output_path another folder."
            )
        written = datamodule.write_predictions(
            predictions, key=self.key, labels=self.decode or None, per_source=True
        )
        folder.mkdir(parents=True, exist_ok=True)
        for name, adata in zip(names, written.values(), strict=True):
            adata.write_h5ad(folder / name)
        self.written_path = folder
        rank_zero_info(
            f"torch-adata: predictions of {collection.n_obs} cells written to {len(names)} "
            f"files in {folder}"
        )


class AnnDataCLI(LightningCLI):
    """``LightningCLI`` with :class:`~torch_adata.AnnDataModule` as the data module.

    The model is any ``LightningModule``, named by ``class_path`` under ``model:``; the data
    module's arguments go under ``data:``. The config written next to the logs is overwritten
    on reruns instead of aborting them, the default seed is 0 and the program is called
    ``torch-adata``.

    Parameters
    ----------
    args
        The arguments, as on the command line (``["fit", "--config", "c.yaml"]``); ``None``
        reads ``sys.argv[1:]``.
    **kwargs
        Passed on to ``LightningCLI``; they replace the defaults above (``model_class``,
        ``subclass_mode_model``, ``datamodule_class``, ``save_config_kwargs``,
        ``seed_everything_default``, ``parser_kwargs``).
    """

    def __init__(self, args: Sequence[str] | None = None, **kwargs: Any):
        missing = _missing_jsonargparse()
        if missing is not None:
            raise ModuleNotFoundError(missing)
        kwargs.setdefault("model_class", pl.LightningModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("datamodule_class", AnnDataModule)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("parser_kwargs", {"prog": "torch-adata"})
        super().__init__(args=None if args is None else list(args), **kwargs)


def _config_paths(args: Sequence[str]) -> list[str]:
    """The files given with ``--config``/``-c`` (``--config x`` and ``--config=x`` forms)."""
    paths = []
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            paths.append(args[i + 1])
        elif arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
    return paths


def _model_class_paths(args: Sequence[str], configs: Sequence[str]) -> list[str]:
    """Model class paths given in the configs' ``model:`` and by ``--model``/``--model.class_path``."""
    found = []
    for path in configs:
        model = (yaml.safe_load(Path(path).read_text()) or {}).get("model")
        if isinstance(model, Mapping) and isinstance(model.get("class_path"), str):
            found.append(model["class_path"])
        elif isinstance(model, str):
            found.append(model)
    for i, arg in enumerate(args):
        name, _, value = arg.partition("=")
        if name in ("--model", "--model.class_path"):
            value = value or (args[i + 1] if i + 1 < len(args) else "")
            if value and not value.startswith(("{", "-")) and not value.endswith((".yaml", ".yml")):
                found.append(value)
    return [path for path in found if "." in path]  # bare class names are jsonargparse's


def check_class_path(class_path: str) -> type:
    """Import a model class path and check that it names a ``LightningModule``.

    Parameters
    ----------
    class_path
        ``package.module.Class``, as in a config's ``model: class_path:``.

    Returns
    -------
    type
        The class.

    Raises
    ------
    SystemExit
        The module does not import (the message names where modules are looked up and the
        fix), or the class is missing or not a ``LightningModule`` (the message lists the
        ``LightningModule`` classes the module defines).
    """
    module_name, _, class_name = class_path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise SystemExit(
            f"torch-adata: cannot import module {module_name!r} of model class_path "
            f"{class_path!r} ({err}). Modules are looked up in the installed packages and in "
            f"the current directory ({os.getcwd()}): run from the directory that holds it "
            "(e.g. the folder of your model's module) or install it."
        ) from err
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, pl.LightningModule)):
        classes = sorted(
            name
            for name, value in vars(module).items()
            if isinstance(value, type)
            and issubclass(value, pl.LightningModule)
            and value.__module__ == module.__name__
        )
        what = "does not exist" if cls is None else "is not a LightningModule"
        raise SystemExit(
            f"torch-adata: {class_name!r} in module {module_name!r} {what}. "
            f"LightningModules defined there: {classes or 'none'}."
        )
    return cls


def run_cli(args: Sequence[str] | None = None) -> AnnDataCLI:
    """Run the ``torch-adata`` command and return the finished :class:`AnnDataCLI`.

    The current directory goes first on ``sys.path``, so model class paths may name modules in
    it (``mymodels.MyModel`` for a ``mymodels.py`` there). A missing config
    file or a model class path that does not import stops the command (``SystemExit``) with a
    message that says what is wrong and how to fix it, before anything runs.

    Parameters
    ----------
    args
        The arguments, as on the command line (``["fit", "--config", "c.yaml"]``); ``None``
        reads ``sys.argv[1:]``.

    Returns
    -------
    AnnDataCLI
        The finished command, with its ``trainer``, ``model`` and ``datamodule``.
    """
    argv = sys.argv[1:] if args is None else list(args)
    missing = _missing_jsonargparse()
    if missing is not None:
        raise SystemExit(missing)
    for path in _config_paths(argv):
        if not Path(path).is_file():
            raise SystemExit(
                f"torch-adata: config file {path!r} not found (looked in {os.getcwd()}). "
                "Give a path to a YAML file, e.g. --config examples/configs/classifier.yaml, "
                "relative to the directory you run from."
            )
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    for class_path in _model_class_paths(argv, _config_paths(argv)):
        check_class_path(class_path)
    return AnnDataCLI(args=args)


def shuffle_command(args: Sequence[str]) -> None:
    """``torch-adata shuffle``: write a shuffled copy of an ``.h5ad`` (:func:`~torch_adata.write_shuffled`).

    Parameters
    ----------
    args
        The arguments after ``shuffle``: ``SOURCE DESTINATION [--seed N] [--overwrite]
        [--chunk-mib M] [--compression gzip|lzf] [--no-index]``.
    """
    import argparse

    from .shuffle import write_shuffled

    parser = argparse.ArgumentParser(
        prog="torch-adata shuffle",
        description="Write the cells of an .h5ad file in a seeded random order (streaming, "
        "atomic), for block-shuffle training on data larger than memory.",
    )
    parser.add_argument("source", help="the .h5ad file to shuffle (never modified)")
    parser.add_argument("destination", help="where to write the shuffled copy")
    parser.add_argument("--seed", type=int, default=0, help="seed of the permutation (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    parser.add_argument(
        "--chunk-mib", type=float, default=64, help="matrix data per step in MiB (default 64)"
    )
    parser.add_argument("--compression", choices=["gzip", "lzf"], help="compress the copy")
    parser.add_argument("--no-index", action="store_true", help="do not record obs['source_index']")
    ns = parser.parse_args(list(args))
    try:
        perm = write_shuffled(
            ns.source,
            ns.destination,
            seed=ns.seed,
            overwrite=ns.overwrite,
            chunk_mib=ns.chunk_mib,
            index_key=None if ns.no_index else "source_index",
            compression=ns.compression,
        )
    except (ValueError, OSError) as err:  # clear messages: no traceback on the command line
        raise SystemExit(f"torch-adata shuffle: {err}") from err
    print(f"torch-adata shuffle: {len(perm):,} cells written to {ns.destination} (seed {ns.seed})")


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``torch-adata`` console script: :func:`run_cli`, returning nothing.

    ``torch-adata --version`` prints the version of torch_adata and exits.

    Parameters
    ----------
    args
        As for :func:`run_cli`.
    """
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] in (["--version"], ["-V"]):
        from . import __version__

        print(f"torch-adata {__version__}")
        return
    if argv[:1] == ["shuffle"]:  # before LightningCLI: needs no jsonargparse
        shuffle_command(argv[1:])
        return
    run_cli(args)


if __name__ == "__main__":
    main()
