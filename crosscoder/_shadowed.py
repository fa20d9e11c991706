"""Imports that a checkout's own folders would shadow.

The published layout keeps ``kernels/`` and ``eval/`` at the repository's root, installed as ``crosscoder.kernels``
and ``crosscoder.eval``. Run from that root, Python puts it first on ``sys.path``, so a top-level ``import kernels``
(transformers ≥ 5.25 imports the Hugging Face ``kernels`` distribution it depends on) would find the checkout's
folder instead of the installed package.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path


def import_past_checkout(name: str, init_file: str) -> bool:
    """Import the top-level package ``name`` from ``sys.path`` without the checkout that holds ``init_file`` (this
    folder's ``__init__.py``) and put it in ``sys.modules`` in place of the folder's module, so that the import
    statement gets it. Returns whether one was found: when none is installed the folder's module stays, empty (no
    ``__version__``: transformers' availability check reads it as not installed, as it read the folder before)."""
    checkout = Path(init_file).resolve().parent.parent
    elsewhere = [entry for entry in sys.path if Path(entry or os.getcwd()).resolve() != checkout]
    spec = importlib.machinery.PathFinder.find_spec(name, elsewhere)
    if spec is None or spec.loader is None:
        return False
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return True
