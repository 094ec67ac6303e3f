"""The one way to import a module of ``spmd_diff.kernels`` (the top-level ``kernels/`` folder), installed or not.

Installed (``pip install -e .``), ``kernels/`` is the package ``spmd_diff.kernels``. In a bare source checkout (a GPU
machine running the repository as copied) it is not importable under that name, so it is loaded from the
checkout and registered as ``spmd_diff.kernels``. No torch, no CUDA: importing a kernel module is the caller's
choice, made when the kernel is first needed.
"""

from __future__ import annotations

import importlib
import importlib.util
import pathlib
import sys
from types import ModuleType


def register_kernels_package() -> None:
    """Make ``spmd_diff.kernels`` importable (a no-op when installed or already registered)."""
    if "spmd_diff.kernels" in sys.modules:
        return
    try:
        importlib.import_module("spmd_diff.kernels")
    except ImportError:
        root = pathlib.Path(__file__).resolve().parents[2] / "kernels"
        spec = importlib.util.spec_from_file_location("spmd_diff.kernels", root / "__init__.py",
                                                      submodule_search_locations=[str(root)])
        if spec is None or spec.loader is None:
            raise
        module = importlib.util.module_from_spec(spec)
        sys.modules["spmd_diff.kernels"] = module
        spec.loader.exec_module(module)


def load_kernel_module(name: str) -> ModuleType:
    """``spmd_diff.kernels.<name>``; from the checkout's ``kernels/`` when the package is not installed."""
    register_kernels_package()
    return importlib.import_module(f"spmd_diff.kernels.{name}")
