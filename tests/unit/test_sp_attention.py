"""Sequence-parallel attention (Ulysses, ring, torus) and the parallelized Wan transformer, on threads (CPU).

Ranks are threads exchanging through an in-process stand-in of the collectives' ``Group`` API
(``tests/unit/_sp_threads.py``), so these tests check the math and the plumbing, not MPI.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest
import torch
import torch.nn.functional as F

from spmd_diff.errors import UserError
from spmd_diff.parallel._kernels import apply_rotary_reference
from spmd_diff.parallel.attention import LocalAttention, math_attention
from spmd_diff.parallel.seq_comm import GroupSeqComm, offsets, split_sizes
from spmd_diff.parallel.group_denoise import SPDenoiser, build_attention
from spmd_diff.parallel.hooks import parallelize_transformer
from spmd_diff.parallel.layout import SPLayout, head_balance, resolve_layout
from tests.unit._sp_threads import ThreadGroup, run_ranks


pytestmark = pytest.mark.usefixtures("one_thread")


class IntoGroup(ThreadGroup):
    """The stand-in with the collectives' hot path, ``all_to_all_into`` (preallocated receive buffers)."""

    def all_to_all_into(self, send, out):
        received = self.all_to_all(send)
        for buffer, tensor in zip(out, received):
            assert buffer.dtype == tensor.dtype and buffer.shape == tensor.shape, (buffer.shape, tensor.shape)
            buffer.copy_(tensor)
        return out


def _comm(rank: int, world, size: int, into: bool = False) -> GroupSeqComm:
    coll = world.collectives(rank)
    cls = IntoGroup if into else ThreadGroup
    make = lambda ranks: cls(coll, ranks)  # noqa: E731
    return GroupSeqComm(make(list(range(size))), make)


def _shard(x: torch.Tensor, sizes: list[int], rank: int, dim: int = 1) -> torch.Tensor:
    return x.narrow(dim, offsets(sizes)[rank], sizes[rank])


# ---- pure helpers -----------------------------------------------------------------------------------------------


def test_split_sizes_and_offsets() -> None:
    assert split_sizes(10, 4) == [3, 3, 2, 2]
    assert split_sizes(3, 4) == [1, 1, 1, 0]
    assert split_sizes(12, 8) == [2, 2, 2, 2, 1, 1, 1, 1]
    assert offsets([3, 3, 2, 2]) == [0, 3, 6, 8]
    with pytest.raises(ValueError):
        split_sizes(4, 0)


@pytest.mark.parametrize("requested, degree, heads, shape, expected", [
    ("auto", 4, 12, None, ("ulysses", 1, 4)),
    ("auto", 8, 12, None, ("torus", 2, 4)),       # Wan2.1-1.3B on 8 ranks of a node: 3 heads each
    ("auto", 4, 12, (2, 2), ("torus", 2, 2)),     # across 2 nodes: Ulysses inside, exchange across
    ("auto", 8, 12, (2, 4), ("torus", 2, 4)),
    ("auto", 4, 2, None, ("torus", 2, 2)),        # the demo model's 2 heads
    ("auto", 3, 2, None, ("ring", 3, 1)),
    ("auto", 4, 40, None, ("ulysses", 1, 4)),     # Wan2.1-14B
    ("ulysses", 8, 12, None, ("ulysses", 1, 8)),  # as asked: uneven heads
    ("ring", 4, 12, (2, 2), ("ring", 4, 1)),
    ("torus", 4, 12, (2, 2), ("torus", 2, 2)),
    ("torus", 4, 12, (1, 4), ("ulysses", 1, 4)),  # a "torus" inside one node is plain Ulysses
    ("ulysses", 1, 12, None, ("none", 1, 1)),
])
def test_resolve_layout(requested, degree, heads, shape, expected) -> None:
    layout = resolve_layout(requested, degree, heads, shape)
    assert (layout.name, layout.outer, layout.inner) == expected
    assert layout.degree == degree


def test_resolve_layout_rejects_bad_requests() -> None:
    with pytest.raises(UserError, match="one of"):
        resolve_layout("mesh", 4, 12)
    with pytest.raises(UserError, match="virtual topology"):
        resolve_layout("torus", 4, 12)
    with pytest.raises(UserError, match="does not match"):
        resolve_layout("auto", 4, 12, (2, 4))
    assert head_balance(12, 8) == 0.75 and head_balance(12, 4) == 1.0


# ---- attention level, float64, against plain attention ---------------------------------------------------------


LAYOUT_CASES = [
    SPLayout("ulysses", 1, 2), SPLayout("ulysses", 1, 3), SPLayout("ulysses", 1, 4),
    SPLayout("ring", 2, 1), SPLayout("ring", 3, 1), SPLayout("ring", 4, 1),
    SPLayout("torus", 2, 2), SPLayout("torus", 2, 2, num_chunks=3), SPLayout("torus", 2, 3), SPLayout("torus", 3, 2),
]


def _reference(q, k, v, cos, sin) -> torch.Tensor:
    q, k = apply_rotary_reference(q, cos, sin), apply_rotary_reference(k, cos, sin)
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _run_layout(layout: SPLayout, q, k, v, cos, sin, into: bool = False) -> list[torch.Tensor]:
    num_tokens = q.shape[1]
    sizes = split_sizes(num_tokens, layout.degree)

    def rank_fn(rank, world):
        attention = build_attention(_comm(rank, world, layout.degree, into), layout)
        rotary = (_shard(cos, sizes, rank), _shard(sin, sizes, rank))
        return attention(_shard(q, sizes, rank), _shard(k, sizes, rank), _shard(v, sizes, rank), sizes, rotary)

    return run_ranks(layout.degree, rank_fn)


def _inputs(batch: int, num_tokens: int, heads: int, head_dim: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, num_tokens, heads, head_dim, dtype=torch.float64, generator=gen) for _ in range(3))
    angles = torch.randn(num_tokens, head_dim // 2, dtype=torch.float64, generator=gen).repeat_interleave(2, -1)
    return q, k, v, angles.cos().view(1, num_tokens, 1, head_dim), angles.sin().view(1, num_tokens, 1, head_dim)


@pytest.mark.parametrize("layout", LAYOUT_CASES, ids=lambda layout: f"{layout.name}-{layout.outer}x{layout.inner}"
                         f"-c{layout.num_chunks}")
@pytest.mark.parametrize("num_tokens, heads", [(13, 3), (24, 4), (5, 5)])
def test_attention_equals_plain_attention_float64(layout: SPLayout, num_tokens: int, heads: int) -> None:
    """Uneven shards (13 or 5 tokens over 2..6 ranks, one rank with none when 5 < 6) and head counts that do not
    divide the Ulysses degree (3 or 5 heads over 2, 3 or 4; ranks with no heads at all)."""
    q, k, v, cos, sin = _inputs(2, num_tokens, heads, 8)
    reference = _reference(q, k, v, cos, sin)
    outputs = _run_layout(layout, q, k, v, cos, sin, into=layout.degree % 2 == 0)
    sizes = split_sizes(num_tokens, layout.degree)
    for rank, out in enumerate(outputs):
        assert out.shape == (2, sizes[rank], heads, 8) and out.dtype == torch.float64
    torch.testing.assert_close(torch.cat(outputs, dim=1), reference, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("degree, heads, head_chunks", [(2, 5, 2), (2, 4, 4), (3, 6, 3), (4, 3, 2)])
def test_ulysses_head_pipelining_equals_plain_attention(degree: int, heads: int, head_chunks: int) -> None:
    """Head groups per rank (5 heads over 2: 3 and 2, cut into 2 groups each; 3 heads over 4: a rank with none,
    so no pipelining) give the same result as one exchange."""
    q, k, v, cos, sin = _inputs(1, 14, heads, 8, seed=4)
    reference = _reference(q, k, v, cos, sin)
    sizes = split_sizes(14, degree)

    def rank_fn(rank, world):
        attention = build_attention(_comm(rank, world, degree), SPLayout("ulysses", 1, degree),
                                    head_chunks=head_chunks)
        rotary = (_shard(cos, sizes, rank), _shard(sin, sizes, rank))
        return attention(_shard(q, sizes, rank), _shard(k, sizes, rank), _shard(v, sizes, rank), sizes, rotary)

    torch.testing.assert_close(torch.cat(run_ranks(degree, rank_fn), dim=1), reference, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("requested", ["ulysses", "auto", "ring"])
def test_wan_1_3b_heads_on_8_ranks(requested: str) -> None:
    """Wan2.1-1.3B's 12 heads over 8 ranks: Ulysses as asked (2 heads on four ranks, 1 on the others), "auto" (a
    2 x 4 torus, 3 heads each) and ring; 37 tokens (uneven)."""
    layout = resolve_layout(requested, 8, 12)
    assert (layout.name, layout.outer, layout.inner) == {"ulysses": ("ulysses", 1, 8), "auto": ("torus", 2, 4),
                                                         "ring": ("ring", 8, 1)}[requested]
    q, k, v, cos, sin = _inputs(1, 37, 12, 8, seed=6)
    outputs = _run_layout(layout, q, k, v, cos, sin)
    torch.testing.assert_close(torch.cat(outputs, dim=1), _reference(q, k, v, cos, sin), rtol=1e-12, atol=1e-12)


def test_attention_float32_and_bfloat16_stay_close() -> None:
    q, k, v, cos, sin = _inputs(1, 40, 4, 16, seed=3)
    reference = _reference(q, k, v, cos, sin)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        args = [x.to(dtype) for x in (q, k, v)] + [cos.float(), sin.float()]
        for layout in (SPLayout("ulysses", 1, 4), SPLayout("ring", 4, 1), SPLayout("torus", 2, 2)):
            out = torch.cat(_run_layout(layout, *args), dim=1)
            assert out.dtype == dtype
            torch.testing.assert_close(out.double(), reference, rtol=tol, atol=tol)


def test_local_attention_with_lse_matches_math() -> None:
    q, k, v, _, _ = _inputs(2, 9, 3, 8, seed=5)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    out, lse = LocalAttention().with_lse(q, k, v)
    ref_out, ref_lse = math_attention(q, k, v)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(LocalAttention("math")(q, k, v), ref_out)


def test_mismatched_shard_is_rejected() -> None:
    q, k, v, cos, sin = _inputs(1, 8, 2, 4)

    def rank_fn(rank, world):
        attention = build_attention(_comm(rank, world, 2), SPLayout("ring", 2, 1))
        return attention(q[:, :4], k[:, :4], v[:, :4], [3, 5])

    with pytest.raises(ValueError, match="holds 4 tokens"):
        run_ranks(2, rank_fn, timeout_s=20)


# ---- the whole transformer ---------------------------------------------------------------------------------------


def _demo_transformer(dtype: torch.dtype):
    from diffusers import WanTransformer3DModel

    from spmd_diff.models.demo import TRANSFORMER_CONFIG

    torch.manual_seed(2)
    return WanTransformer3DModel(**TRANSFORMER_CONFIG).to(dtype).eval()


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("layout", [SPLayout("ulysses", 1, 2), SPLayout("ulysses", 1, 4), SPLayout("ring", 3, 1),
                                    SPLayout("torus", 2, 2)], ids=lambda layout: layout.describe().split(" (")[0])
def test_parallel_transformer_equals_plain_forward(layout: SPLayout, dtype: torch.dtype, tol: float) -> None:
    """45 tokens (3 x 3 x 5 after patching; uneven over 2 and 4) and 2 heads (none on two of 4 Ulysses ranks)."""
    models = [_demo_transformer(dtype) for _ in range(layout.degree)]
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(1, 16, 3, 6, 10, generator=gen).to(dtype)
    text = torch.randn(1, 11, 32, generator=gen).to(dtype)
    timestep = torch.tensor([637.0])
    kwargs = dict(hidden_states=hidden, timestep=timestep, encoder_hidden_states=text, return_dict=False)
    with torch.no_grad():
        reference = models[0](**kwargs)[0]
    processors = [block.attn1.processor for block in models[0].blocks]

    def rank_fn(rank, world):
        handle = parallelize_transformer(models[rank], build_attention(_comm(rank, world, layout.degree), layout))
        with torch.no_grad():
            out = models[rank](**kwargs)[0]
        handle.remove()
        return out

    for out in run_ranks(layout.degree, rank_fn):
        assert out.shape == reference.shape
        torch.testing.assert_close(out, reference, rtol=tol, atol=tol)
    assert [block.attn1.processor for block in models[0].blocks] == processors
    with torch.no_grad():
        assert torch.equal(models[0](**kwargs)[0], reference), "remove() must restore the model exactly"


def test_per_token_timesteps_are_split_too() -> None:
    """Wan2.2 TI2V passes ``timestep`` as ``[B, N]``: each rank keeps its tokens' timesteps."""
    models = [_demo_transformer(torch.float64) for _ in range(2)]
    gen = torch.Generator().manual_seed(8)
    hidden = torch.randn(1, 16, 3, 6, 10, generator=gen, dtype=torch.float64)
    text = torch.randn(1, 5, 32, generator=gen, dtype=torch.float64)
    timestep = torch.linspace(100, 900, 45).unsqueeze(0)
    with torch.no_grad():
        reference = models[0](hidden, timestep, text, return_dict=False)[0]

    def rank_fn(rank, world):
        attention = build_attention(_comm(rank, world, 2), SPLayout("ulysses", 1, 2))
        parallelize_transformer(models[rank], attention)
        with torch.no_grad():
            return models[rank](hidden, timestep, text, return_dict=False)[0]

    for out in run_ranks(2, rank_fn):
        torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)


def test_parallelize_twice_is_refused() -> None:
    model = _demo_transformer(torch.float32)

    def rank_fn(rank, world):
        attention = build_attention(_comm(rank, world, 1), SPLayout("none", 1, 1))
        handle = parallelize_transformer(model, attention)
        try:
            with pytest.raises(ValueError, match="already"):
                parallelize_transformer(model, attention)
        finally:
            handle.remove()

    run_ranks(1, rank_fn)


# ---- the group denoiser over WanStages ---------------------------------------------------------------------------


def _variant(demo_model_dir: pathlib.Path, tmp_path: pathlib.Path, **index_changes) -> pathlib.Path:
    model_dir = tmp_path / "variant"
    shutil.copytree(demo_model_dir, model_dir)
    index = json.loads((model_dir / "model_index.json").read_text())
    index.update(index_changes)
    (model_dir / "model_index.json").write_text(json.dumps(index, indent=2))
    return model_dir


@pytest.mark.parametrize("variant", ["plain", "expand_timesteps"])
def test_group_denoiser_equals_one_rank(demo_model_dir: pathlib.Path, tmp_path: pathlib.Path, variant: str) -> None:
    from spmd_diff.models.shapes import VideoSpec
    from spmd_diff.models.wan import WanStages

    model_dir = demo_model_dir if variant == "plain" else _variant(demo_model_dir, tmp_path, expand_timesteps=True)
    spec = VideoSpec(height=48, width=80, num_frames=9, num_inference_steps=3, guidance_scale=3.5)
    encoder = WanStages(model_dir, {"encode"})
    embeds = encoder.encode("A steam train crosses a stone bridge.", "blurry", spec)
    single = WanStages(model_dir, {"denoise"})
    reference = single.denoise(embeds, 77, spec)
    stages = [WanStages(model_dir, {"denoise"}) for _ in range(3)]
    steps: list = []

    def rank_fn(rank, world):
        comm = _comm(rank, world, 3)
        layout = resolve_layout("auto", 3, int(stages[rank].transformer.config.num_attention_heads))
        denoiser = SPDenoiser(stages[rank], comm, layout)
        try:
            leader = rank == 0
            return denoiser.denoise(embeds if leader else None, 77 if leader else None, spec,
                                    callback=lambda i, n: steps.append((rank, i, n)))
        finally:
            denoiser.remove()

    results = run_ranks(3, rank_fn)
    assert results[1] is None and results[2] is None
    torch.testing.assert_close(results[0], reference, rtol=1e-5, atol=1e-5)
    assert sorted(steps) == [(r, i, 3) for r in range(3) for i in range(3)]


def test_group_denoiser_rejects_bad_leader_inputs_on_every_rank(demo_model_dir: pathlib.Path) -> None:
    from spmd_diff.models.shapes import VideoSpec
    from spmd_diff.models.wan import WanStages

    spec = VideoSpec(height=64, width=64, num_frames=9, num_inference_steps=2, guidance_scale=1.0)
    stages = [WanStages(demo_model_dir, {"denoise"}) for _ in range(2)]
    errors: list = []

    def rank_fn(rank, world):
        denoiser = SPDenoiser(stages[rank], _comm(rank, world, 2), SPLayout("ulysses", 1, 2))
        try:
            denoiser.denoise({"prompt_embeds": torch.zeros(1, 3, 32)} if rank == 0 else None, 1, spec)
        except ValueError as error:
            errors.append(str(error))
        finally:
            denoiser.remove()

    run_ranks(2, rank_fn)
    assert len(errors) == 2 and all("expected (1, 512, 32)" in e or "unusable" in e for e in errors)


# ---- over the real collectives (LocalTransport: ranks as threads) ------------------------------------------------


@pytest.mark.parametrize("layout", [SPLayout("ulysses", 1, 4), SPLayout("ring", 4, 1), SPLayout("torus", 2, 2),
                                    SPLayout("ulysses", 1, 3)], ids=lambda layout: layout.describe().split(" (")[0])
def test_attention_over_group_collectives(layout: SPLayout) -> None:
    from spmd_diff.comm import run_local
    from spmd_diff.comm.collectives import GroupCollectives

    q, k, v, cos, sin = _inputs(1, 23, 3, 8, seed=11)
    reference = _reference(q, k, v, cos, sin)
    sizes = split_sizes(23, layout.degree)

    def body(transport):
        coll = GroupCollectives(transport, 0, 1 << 20, max_ranks=4, chunk_bytes=1024, timeout_s=60)
        comm = GroupSeqComm(coll.group(list(range(layout.degree))), coll.group)
        attention = build_attention(comm, layout)
        rank = transport.rank
        rotary = (_shard(cos, sizes, rank), _shard(sin, sizes, rank))
        outs = [attention(_shard(q, sizes, rank), _shard(k, sizes, rank), _shard(v, sizes, rank), sizes, rotary)
                for _ in range(2)]  # twice: slots and epochs are reused
        assert torch.equal(outs[0], outs[1])
        return outs[0]

    outputs = run_local(layout.degree, 1 << 20, body, timeout_s=120)
    torch.testing.assert_close(torch.cat(outputs, dim=1), reference, rtol=1e-12, atol=1e-12)
