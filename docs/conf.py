"""Sphinx configuration of the torch_adata documentation.

Build (what CI runs; tutorials are executed, warnings are errors)::

    sphinx-build -W --keep-going -b html -q docs docs/_build/html

Offline by design: intersphinx reads the small inventories committed in ``docs/_inv/`` (see
``docs/_inv/make_inventories.py``) and never downloads. Environment switches:

``TORCH_ADATA_DOCS_EXECUTE``
    myst-nb execution mode: ``force`` (default: every tutorial runs on every build),
    ``cache`` (re-run only changed notebooks) or ``off`` (no outputs; fast drafts).
``TORCH_ADATA_DOCS_ONLINE``
    ``1`` to fall back to the projects' published inventories (needs network).
"""

from __future__ import annotations

import os
import sys
import warnings
from datetime import date
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "_ext"))

import torch_adata  # noqa: E402

# sphinx-autodoc-typehints still calls an API Sphinx 10 removes; not our warning to fix.
warnings.filterwarnings("ignore", message=".*set_application.*is deprecated")

project = "torch_adata"
author = "torch_adata developers"
copyright = f"{date.today().year}, {author}"
release = torch_adata.__version__
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx_autodoc_typehints",  # after napoleon
    "sphinx.ext.intersphinx",
    "sphinx.ext.viewcode",
    "param_check",
]

exclude_patterns = ["_build", "jupyter_execute", ".jupyter_cache", "_inv", "Thumbs.db"]
templates_path = ["_templates"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb"}  # .rst first: autosummary stubs

# -- API reference -------------------------------------------------------------------------------
autosummary_generate = True
autosummary_imported_members = False
autodoc_default_options = {"members": True, "member-order": "bysource", "show-inheritance": True}
autodoc_typehints = "description"  # types from signatures, shown with each parameter
autodoc_preserve_defaults = True
autodoc_inherit_docstrings = False  # Lightning's hook docstrings use roles of its own docs
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = True
napoleon_use_param = True
# Sections our docstrings use beyond numpydoc's standard ones.
napoleon_custom_sections = ["Batches", "Distributed training"]
typehints_document_rtype = True
typehints_use_signature = False
always_document_param_types = False

# Every cross-reference must resolve (with -W, a dangling one fails the build).
nitpicky = True

# -- intersphinx (offline) -----------------------------------------------------------------------
_DOCS = {
    "python": "https://docs.python.org/3/",
    "numpy": "https://numpy.org/doc/stable/",
    "pandas": "https://pandas.pydata.org/docs/",
    "scipy": "https://docs.scipy.org/doc/scipy/",
    "anndata": "https://anndata.readthedocs.io/en/stable/",
    "scanpy": "https://scanpy.readthedocs.io/en/stable/",
    "torch": "https://docs.pytorch.org/docs/stable/",
    "lightning": "https://lightning.ai/docs/pytorch/stable/",
    "pooch": "https://www.fatiando.org/pooch/latest/",
}
_ONLINE = os.environ.get("TORCH_ADATA_DOCS_ONLINE") == "1"
intersphinx_mapping = {
    name: (url, (str(HERE / "_inv" / f"{name}.inv"), *((None,) if _ONLINE else ())))
    for name, url in _DOCS.items()
}
intersphinx_timeout = 5

# -- notebooks (MyST markdown, executed at build time) -------------------------------------------
nb_execution_mode = os.environ.get("TORCH_ADATA_DOCS_EXECUTE", "force")
nb_execution_raise_on_error = True  # a failing cell fails the build
nb_execution_timeout = 300
nb_execution_show_tb = True
nb_merge_streams = True
myst_enable_extensions = ["colon_fence", "deflist", "dollarmath"]
myst_heading_anchors = 3


def _skip_namedtuple_fields(app, what, name, obj, skip, options):
    """Skip a NamedTuple's field aliases: the class's Attributes section documents them."""
    if (getattr(obj, "__doc__", None) or "").startswith("Alias for field number"):
        return True
    return None


def setup(app):
    app.connect("autodoc-skip-member", _skip_namedtuple_fields)


# -- HTML ----------------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"torch_adata {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]  # wide tables scroll, long output lines wrap
