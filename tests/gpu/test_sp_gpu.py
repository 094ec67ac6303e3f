"""Sequence parallelism on GPUs (skipped without CUDA): the Triton kernels against their torch references, the
local attention kernels against plain math, and S = 2, 4 denoising against one GPU over NCCL (bf16: relative
error of the final latents < 1e-2; tests/gpu/sp_gpu_worker.py under torchrun).

    python3 -m pytest -q tests/gpu/test_sp_gpu.py     # on nvidia-h200-x4
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).parent / "sp_gpu_worker.py"


@pytest.fixture(scope="module")
def kernels():
    from spmd_diff.parallel import _kernels  # registers spmd_diff.kernels in a bare checkout
    from spmd_diff.kernels import _triton, lse_merge, rope_pack

    if not _triton.HAS_TRITON:
        pytest.skip("Triton does not import here")
    return rope_pack, lse_merge, _kernels


@pytest.mark.parametrize("shape, head_sizes", [((1, 8190, 12, 128), [3, 3, 3, 3]), ((2, 777, 12, 128), [4, 4, 2, 2]),
                                               ((1, 4263, 40, 128), [10, 10, 10, 10]), ((1, 100, 2, 12), [1, 1])])
def test_rope_pack_triton_matches_reference(kernels, shape, head_sizes) -> None:
    rope_pack, _, _ = kernels
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(shape, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(3))
    seq, dim = shape[1], shape[3]
    angles = torch.rand(seq, dim // 2, device="cuda", dtype=torch.float64, generator=gen).repeat_interleave(2, -1) * 50
    cos, sin = angles.cos().view(1, seq, 1, dim), angles.sin().view(1, seq, 1, dim)  # float64, as diffusers' rope
    ref = rope_pack.rope_pack_reference(q, k, v, cos, sin, head_sizes)
    fast = rope_pack.rope_pack_triton(q, k, v, cos, sin, head_sizes)
    for a, b in zip(ref, fast):
        assert a.shape == b.shape and a.dtype == b.dtype == torch.bfloat16
        diff = (a.float() - b.float()).abs()
        assert float(diff.max()) <= 2 ** -6 * max(1.0, float(a.float().abs().max()))  # one bf16 rounding step
        assert float((diff > 0).float().mean()) < 0.02, "differences must be rare rounding ties"
        assert torch.equal(a[2], b[2]), "v is copied, not rotated"


def test_lse_merge_triton_matches_reference(kernels) -> None:
    _, lse_merge, _ = kernels
    gen = torch.Generator(device="cuda").manual_seed(1)
    acc = torch.randn(1, 12, 5000, 128, device="cuda", generator=gen)
    lse = torch.randn(1, 12, 5000, device="cuda", generator=gen) * 5
    blk = torch.randn(1, 5000, 12, 128, device="cuda", generator=gen).to(torch.bfloat16).transpose(1, 2)
    blk_lse = (torch.randn(1, 5000, 12, device="cuda", generator=gen) * 5).transpose(1, 2)
    a, la, b, lb = acc.clone(), lse.clone(), acc.clone(), lse.clone()
    lse_merge.lse_merge_reference(a, la, blk, blk_lse)
    lse_merge.lse_merge_triton(b, lb, blk, blk_lse)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "flash", "cudnn", "efficient"])
def test_local_attention_backends_match_math(backend: str) -> None:
    from spmd_diff.parallel.attention import LocalAttention, math_attention

    gen = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(3, 1, 1500, 3, 128, device="cuda", generator=gen).to(torch.bfloat16)  # Ulysses' layout
    q, k, v = (x[i].transpose(1, 2) for i in range(3))
    ref_out, ref_lse = math_attention(q, k, v)
    local = LocalAttention(backend)
    try:
        out = local(q, k, v)
        out_lse, lse = local.with_lse(q, k, v)
    except RuntimeError as error:
        pytest.skip(f"{backend} unavailable here: {error}")
    for got in (out, out_lse):
        assert float((got.float() - ref_out.float()).norm() / ref_out.float().norm()) < 1e-2
    torch.testing.assert_close(lse.float(), ref_lse.float(), rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 or 4 GPUs")
def test_sp_denoise_matches_one_gpu() -> None:
    gpus = 4 if torch.cuda.device_count() >= 4 else 2
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={gpus}", str(WORKER)], cwd=ROOT, capture_output=True, text=True,
                            timeout=480)
    print(result.stdout)
    assert result.returncode == 0 and "WORKER DONE failures=0" in result.stdout, \
        result.stdout[-6000:] + result.stderr[-6000:]
    results = re.findall(r"^RESULT (\S+) S=(\d) (\S+) rel_err=(\S+) ok$", result.stdout, flags=re.M)
    expected = (3 * 2 * 2 + 5 * 2) if gpus == 4 else 3 * 2  # pairs: 3 layouts x 2 cases x 2 pairs; S=4: 5 x 2
    assert len(results) == expected, result.stdout
