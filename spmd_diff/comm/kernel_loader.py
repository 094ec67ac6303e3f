"""The one way to import a module of ``spmd_diff.kernels`` (Triton and CUDA kernels, each with a torch reference):
when the kernel is first needed, not at start-up. No torch, no CUDA here: importing a kernel module is the caller's
choice.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def load_kernel_module(name: str) -> ModuleType:
    """``spmd_diff.kernels.<name>``."""
    return importlib.import_module(f"spmd_diff.kernels.{name}")
