"""The sequence-parallel kernels: torch references against independent formulations, and the Triton kernels
against the references in Triton's CPU interpreter when Triton is importable (on GPUs: tests/gpu/test_sp_gpu.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spmd_diff.parallel._kernels import apply_rotary_reference, lse_merge_, rope_pack
from spmd_diff.parallel.attention import math_attention

from spmd_diff.kernels._triton import HAS_TRITON

ROOT = Path(__file__).resolve().parents[2]


def test_rotary_reference_is_complex_multiplication() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 8, dtype=torch.float64, generator=gen)
    angles = torch.randn(5, 4, dtype=torch.float64, generator=gen)
    cos = angles.cos().repeat_interleave(2, -1).view(1, 5, 1, 8)
    sin = angles.sin().repeat_interleave(2, -1).view(1, 5, 1, 8)
    expected = torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (4, 2)).contiguous())
                                  * torch.polar(torch.ones_like(angles), angles).view(1, 5, 1, 4)).flatten(-2)
    torch.testing.assert_close(apply_rotary_reference(x, cos, sin), expected)


@pytest.mark.parametrize("head_sizes", [[3], [2, 1], [1, 1, 1], [2, 1, 0, 0]])
def test_rope_pack_reference_layout(head_sizes: list[int]) -> None:
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 3, 6, generator=gen) for _ in range(3))
    angles = torch.randn(4, 3, generator=gen).repeat_interleave(2, -1)
    cos, sin = angles.cos().view(1, 4, 1, 6), angles.sin().view(1, 4, 1, 6)
    packed = rope_pack(q, k, v, cos, sin, head_sizes, impl="torch")
    rotated = [apply_rotary_reference(q, cos, sin), apply_rotary_reference(k, cos, sin), v]
    start = 0
    for part, heads in zip(packed, head_sizes):
        assert part.shape == (3, 2, 4, heads, 6) and part.is_contiguous()
        for which in range(3):
            assert torch.equal(part[which], rotated[which][:, :, start:start + heads])
        start += heads
    flat = packed[0].untyped_storage().data_ptr()
    assert all(p.untyped_storage().data_ptr() == flat for p in packed), "one send buffer"


def test_lse_merge_reference_equals_attention_over_the_union() -> None:
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 3, 7, 8, dtype=torch.float64, generator=gen)
    k = torch.randn(2, 3, 11, 8, dtype=torch.float64, generator=gen)
    v = torch.randn(2, 3, 11, 8, dtype=torch.float64, generator=gen)
    whole, whole_lse = math_attention(q, k, v)
    out, lse = math_attention(q, k[:, :, :4], v[:, :, :4])
    out_b, lse_b = math_attention(q, k[:, :, 4:], v[:, :, 4:])
    lse_merge_(out, lse, out_b.transpose(1, 2).contiguous().transpose(1, 2), lse_b, impl="torch")
    torch.testing.assert_close(out, whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, whole_lse, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not HAS_TRITON, reason="Triton does not import here (CPU-only install)")
def test_triton_kernels_in_the_cpu_interpreter() -> None:
    """tests/unit/scripts/triton_interpreter_checks.py: both kernels against their references on the layouts the
    GPU path produces. A fresh process: TRITON_INTERPRET is read when the kernels are defined."""
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, str(ROOT / "tests/unit/scripts/triton_interpreter_checks.py")], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "interpreter ok" in result.stdout, \
        f"exit {result.returncode}\n{result.stdout}{result.stderr}"
