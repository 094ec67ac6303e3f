"""The fused kernels sequence parallelism uses, from ``spmd_diff.kernels`` (through
``spmd_diff.comm.kernel_loader``)."""

from __future__ import annotations

from spmd_diff.comm.kernel_loader import load_kernel_module

lse_merge_ = load_kernel_module("lse_merge").lse_merge_
_rope = load_kernel_module("rope_pack")
apply_rotary_reference, rope_pack = _rope.apply_rotary_reference, _rope.rope_pack

__all__ = ["apply_rotary_reference", "lse_merge_", "rope_pack"]
