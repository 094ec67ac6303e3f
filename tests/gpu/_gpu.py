"""Helpers of the GPU tests (skipped without CUDA GPUs; run on the lent GPU machines)."""

from __future__ import annotations

import importlib.util


def num_gpus() -> int:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def has_nvshmem() -> bool:
    return importlib.util.find_spec("nvshmem") is not None
