"""Triton, if it imports: kernels here are optional and every one has a torch reference used without it."""

from __future__ import annotations

import os

import torch

try:  # Triton is absent on CPU-only installs (CI); the torch references run there
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    HAS_TRITON = False


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether ``"auto"`` picks the Triton kernel for ``tensor``: Triton imports and the tensor is on a CUDA
    device, or ``TRITON_INTERPRET=1`` (Triton's CPU interpreter, for tests without a GPU)."""
    if not HAS_TRITON:
        return False
    return tensor.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
