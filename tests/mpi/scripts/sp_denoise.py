"""Sequence-parallel DiT groups on 4 MPI ranks (CPU) against one-rank denoising, in one launch.

Cases, each run by every rank in the same order over the project's collectives on MPI RMA (``GroupCollectives``):
S = 2 (two groups at once, different items) and S = 4, Ulysses and ring; the torus 2 x 2 and "auto" from a
virtual topology of 2 nodes x 2 ranks (``Topology.uniform(2, 2)`` -> ``plan_roles``, as the engine does with
``world.ranks_per_node=2``). Rank 0 compares every leader's latents and decoded video with the one-rank result of
the same item. Then the same attention over torch.distributed (gloo) through ``TorchSeqComm``, the GPU code path.

Rank 0 writes RESULT_JSON: ``{"failures", "groups": [...], "torch_comm_attention": [...],
"torch_comm_denoise": [...]}``, one row per checked output (its layout, error and ``ok``).

    mpirun -n 4 python tests/mpi/scripts/sp_denoise.py MODEL_DIR RESULT_JSON
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from mpi4py import MPI

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from spmd_diff.comm.collectives import GroupCollectives  # noqa: E402
from spmd_diff.comm.mpi_rma import MpiRmaTransport  # noqa: E402
from spmd_diff.models.shapes import VideoSpec  # noqa: E402
from spmd_diff.models.wan import WanStages  # noqa: E402
from spmd_diff.parallel.group_denoise import SPDenoiser  # noqa: E402
from spmd_diff.plan.roles import plan_roles  # noqa: E402
from spmd_diff.plan.topology import Topology  # noqa: E402

SPEC = VideoSpec(height=48, width=80, num_frames=9, num_inference_steps=3, guidance_scale=3.5)  # 45 tokens
PROMPTS = ["A steam train crosses a stone bridge high above a deep valley.",
           "Fish swim between bright corals in clear blue water.",
           "A robot walks through a futuristic city with glass towers."]


def main() -> int:
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    assert size == 4, "run with mpirun -n 4"
    torch.set_num_threads(1)
    model_dir = sys.argv[1]
    stages = WanStages(model_dir, {"encode", "denoise", "decode"} if rank == 0 else {"encode", "denoise"})
    heads = int(stages.transformer.config.num_attention_heads)
    transport = MpiRmaTransport(world, 8 << 20)
    coll = GroupCollectives(transport, 0, 8 << 20, max_ranks=4, timeout_s=120)
    failures = 0
    report: dict = {"groups": [], "torch_comm_attention": [], "torch_comm_denoise": []}
    try:
        items = [(PROMPTS[i], 100 + i) for i in range(len(PROMPTS))]
        embeds = [stages.encode(prompt, "blurry, static", SPEC) for prompt, _ in items]
        reference = {}
        if rank == 0:
            t0 = time.perf_counter()
            for index, (_, seed) in enumerate(items):
                latents = stages.denoise(embeds[index], seed, SPEC)
                reference[index] = (latents, stages.decode(latents))
            print(f"S=1 references: {time.perf_counter() - t0:.2f} s", flush=True)

        virtual = plan_roles(Topology.uniform(2, 2), 0, 0, sp_degree=4, sp_layout="torus")
        cases = [("ulysses", [[0, 1], [2, 3]], None), ("ring", [[0, 1], [2, 3]], None),
                 ("ulysses", [[0, 1, 2, 3]], None), ("ring", [[0, 1, 2, 3]], None),
                 (virtual.sp_layout, [list(g) for g in virtual.dit_groups], virtual.torus_shape),
                 ("auto", [[0, 1, 2, 3]], (2, 2)), ("auto", [[3, 1, 0, 2]], None)]
        for case_index, (layout_name, groups, torus_shape) in enumerate(cases):
            group_ranks = next(g for g in groups if rank in g)
            group = coll.group(group_ranks)
            t0 = time.perf_counter()
            denoiser = SPDenoiser.from_group(stages, group, coll.group, layout_name, torus_shape)
            item = (case_index + groups.index(group_ranks)) % len(items)
            leader = group.rank_in_group == 0
            latents = denoiser.denoise(embeds[item] if leader else None, items[item][1] if leader else None, SPEC)
            denoiser.remove()
            elapsed = time.perf_counter() - t0
            results = world.gather((item, latents, denoiser.layout.describe(), group_ranks, elapsed) if leader
                                   else None, root=0)
            if rank == 0:
                for result in results:
                    if result is None:
                        continue
                    item, latents, described, ranks, elapsed = result
                    ref_latents, ref_video = reference[item]
                    rel = float((latents - ref_latents).norm() / ref_latents.norm())
                    video = stages.decode(latents)
                    levels = int(np.abs(video.astype(np.int16) - ref_video.astype(np.int16)).max())
                    ok = rel < 1e-5 and levels <= 1
                    failures += not ok
                    report["groups"].append(dict(case=case_index, layout=described, ranks=ranks, item=item,
                                                 latents_rel_err=rel, video_max_levels=levels, ok=ok))
                    print(f"case {case_index} {described:52s} group {ranks}: latents rel err {rel:.2e}, "
                          f"video max diff {levels} level(s), {elapsed:.2f} s {'ok' if ok else 'FAIL'}", flush=True)
        world.Barrier()
        failures += torch_comm_check(world, heads, report["torch_comm_attention"])
        failures += torch_comm_denoise(world, stages, embeds, items, reference, report["torch_comm_denoise"])
    finally:
        coll.free()
        transport.free()
    failures = world.allreduce(failures)
    if rank == 0:
        print(f"sp_denoise: {'all ok' if failures == 0 else f'{failures} failure(s)'}", flush=True)
        Path(sys.argv[2]).write_text(json.dumps(dict(failures=failures, **report), indent=1) + "\n")
    return 1 if failures else 0


def torch_comm_check(world, heads: int, rows: list) -> int:
    """Ulysses/ring/torus attention over TorchSeqComm (gloo): the GPU code path, checked on the CPU. Rank 0
    appends a row per layout to ``rows``."""
    import torch.distributed as dist

    from spmd_diff.parallel.attention import math_attention
    from spmd_diff.parallel.seq_comm import offsets, split_sizes
    from spmd_diff.parallel.group_denoise import build_attention
    from spmd_diff.parallel._kernels import apply_rotary_reference as reference_rotary
    from spmd_diff.parallel.layout import SPLayout
    from spmd_diff.parallel.torch_comm import build_torch_comms, init_from_mpi

    rank = world.Get_rank()
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    init_from_mpi(world)
    failures = 0
    try:
        comm = build_torch_comms([[0, 1, 2, 3]], torus_shapes=[(2, 2)])
        pair = build_torch_comms([[0, 1], [2, 3]])
        gen = torch.Generator().manual_seed(5)
        num_tokens, num_heads, head_dim = 23, 3, 8
        q, k, v = (torch.randn(1, num_tokens, num_heads, head_dim, dtype=torch.float64, generator=gen)
                   for _ in range(3))
        angles = torch.randn(num_tokens, head_dim // 2, dtype=torch.float64, generator=gen).repeat_interleave(2, -1)
        cos, sin = angles.cos().view(1, num_tokens, 1, head_dim), angles.sin().view(1, num_tokens, 1, head_dim)
        reference = math_attention(reference_rotary(q, cos, sin).transpose(1, 2),
                                   reference_rotary(k, cos, sin).transpose(1, 2), v.transpose(1, 2))[0].transpose(1, 2)
        for layout, group_comm, chunks in ((SPLayout("ulysses", 1, 4), comm, 1), (SPLayout("ring", 4, 1), comm, 1),
                                           (SPLayout("torus", 2, 2), comm, 1), (SPLayout("ulysses", 1, 2), pair, 1),
                                           (SPLayout("ring", 2, 1), pair, 1), (SPLayout("ulysses", 1, 2), pair, 2)):
            sizes = split_sizes(num_tokens, layout.degree)
            me = group_comm.rank
            cut = slice(offsets(sizes)[me], offsets(sizes)[me] + sizes[me])
            attention = build_attention(group_comm, layout, head_chunks=chunks)
            out = attention(q[:, cut], k[:, cut], v[:, cut], sizes, (cos[:, cut], sin[:, cut]))
            err = float((out - reference[:, cut]).abs().max())
            ok = err < 1e-12
            failures += not ok
            errs = world.gather(err, root=0)
            oks = world.gather(ok, root=0)
            if rank == 0:
                rows.append(dict(layout=layout.describe(), head_chunks=chunks, max_abs_err=max(errs), ok=all(oks)))
                print(f"TorchSeqComm (gloo) {layout.describe():36s} head chunks {chunks}: max abs err {max(errs):.1e} "
                      f"{'ok' if ok else 'FAIL'}", flush=True)
    except BaseException:
        dist.destroy_process_group()
        raise
    return failures


def torch_comm_denoise(world, stages, embeds, items, reference, rows: list) -> int:
    """SPDenoiser over TorchSeqComm (gloo; the engine's GPU path runs NCCL): S=4 ring and S=2 Ulysses pairs. Rank
    0 appends a row per group leader's item to ``rows``."""
    import torch.distributed as dist

    from spmd_diff.parallel.layout import resolve_layout
    from spmd_diff.parallel.torch_comm import build_torch_comms

    rank = world.Get_rank()
    failures = 0
    try:
        for name, groups in (("ring", [[0, 1, 2, 3]]), ("ulysses", [[0, 1], [2, 3]])):
            comm = build_torch_comms(groups)
            layout = resolve_layout(name, comm.size, int(stages.transformer.config.num_attention_heads))
            denoiser = SPDenoiser(stages, comm, layout)
            item = (rank // comm.size) % len(items)
            leader = comm.rank == 0
            latents = denoiser.denoise(embeds[item] if leader else None, items[item][1] if leader else None, SPEC)
            denoiser.remove()
            results = world.gather((item, latents) if leader else None, root=0)
            if rank == 0:
                for result in filter(None, results):
                    item, latents = result
                    rel = float((latents - reference[item][0]).norm() / reference[item][0].norm())
                    ok = rel < 1e-5
                    failures += not ok
                    rows.append(dict(layout=layout.describe(), item=item, latents_rel_err=rel, ok=ok))
                    print(f"SPDenoiser over TorchSeqComm (gloo) {layout.describe():24s} item {item}: latents rel err "
                          f"{rel:.2e} {'ok' if ok else 'FAIL'}", flush=True)
    finally:
        dist.destroy_process_group()
    return failures


if __name__ == "__main__":
    sys.exit(main())
