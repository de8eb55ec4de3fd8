"""Fail the docs build when a public torch_adata callable leaves a parameter undocumented.

For every function, method and class that autodoc documents from ``torch_adata``, each
parameter of its signature (except ``self``/``cls``) must appear in the numpy ``Parameters``
section of its docstring, alone or in a comma-separated group (``drop_last, seed``), or as
``**kwargs``. A missing one is reported as a Sphinx warning, which ``-W`` turns into an error.
"""

from __future__ import annotations

import inspect
import re

from sphinx.application import Sphinx
from sphinx.util import logging

logger = logging.getLogger(__name__)

_SECTION = re.compile(
    r"^(Parameters|Other Parameters)\n-+\n(.*?)(?=^\S[^\n]*\n-+\n|\Z)", re.M | re.S
)
_ENTRY = re.compile(r"^(\*{0,2}[A-Za-z_][\w, *]*?)(?:\s*:.*)?$")


def documented_names(doc: str) -> set[str]:
    """Parameter names listed in the docstring's Parameters sections."""
    names: set[str] = set()
    for match in _SECTION.finditer(inspect.cleandoc(doc)):
        for line in match.group(2).splitlines():
            if not line or line[0].isspace():
                continue  # descriptions are indented
            entry = _ENTRY.match(line)
            if entry:
                names.update(n.strip().lstrip("*") for n in entry.group(1).split(","))
    return names


def check(app: Sphinx, what: str, name: str, obj, options, lines) -> None:
    if what not in ("function", "method", "class") or not name.startswith("torch_adata."):
        return
    if name.rsplit(".", 1)[-1].startswith("_") and not name.endswith("__init__"):
        return
    target = obj.__init__ if what == "class" else obj
    if what == "class" and target is object.__init__:
        return
    owner = getattr(target, "__module__", "") or ""
    if not owner.startswith("torch_adata"):
        return  # inherited from torch, Lightning, ...
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return
    doc = obj.__doc__ or ""
    if what == "class" and target.__doc__:
        doc += "\n" + target.__doc__
    listed = documented_names(doc)
    missing = [
        p.name
        for p in signature.parameters.values()
        if p.name not in ("self", "cls") and p.name not in listed
    ]
    if missing:
        logger.warning(
            "%s: parameter(s) %s not documented in the numpy 'Parameters' section "
            "(checked by docs/_ext/param_check.py)",
            name,
            ", ".join(missing),
            type="param_check",
        )


def setup(app: Sphinx) -> dict:
    app.connect("autodoc-process-docstring", check)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
