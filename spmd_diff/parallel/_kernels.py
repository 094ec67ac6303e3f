"""The fused kernels this package uses, from ``spmd_diff.kernels`` (the top-level ``kernels/`` folder).

Installed (``pip install -e .``), ``kernels/`` is the package ``spmd_diff.kernels``. In a bare source checkout (a GPU
machine running the repository as copied) it is not importable under that name, so it is loaded from the
checkout and registered as ``spmd_diff.kernels``.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

try:
    import spmd_diff.kernels  # noqa: F401 - installed: nothing to do
except ImportError:  # source checkout without install
    _root = pathlib.Path(__file__).resolve().parents[2] / "kernels"
    _spec = importlib.util.spec_from_file_location("spmd_diff.kernels", _root / "__init__.py",
                                                   submodule_search_locations=[str(_root)])
    assert _spec is not None and _spec.loader is not None, _root
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["spmd_diff.kernels"] = _module
    _spec.loader.exec_module(_module)

from spmd_diff.kernels.lse_merge import lse_merge_  # noqa: E402
from spmd_diff.kernels.rope_pack import apply_rotary_reference, rope_pack  # noqa: E402

__all__ = ["apply_rotary_reference", "lse_merge_", "rope_pack"]
