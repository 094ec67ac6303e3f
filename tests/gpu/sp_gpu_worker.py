"""GPU check of sequence-parallel denoising (run by tests/gpu/test_sp_gpu.py under torchrun, one process per GPU).

A Wan2.1-1.3B-architecture transformer (random weights, bf16, 4 blocks) denoises 4 UniPC steps of a 17-frame
480 x 832 video (7,800 tokens) and of a 9-frame 464 x 784 one (4,263 tokens: uneven over 2 and 4 ranks) on one GPU
with plain diffusers, then with every layout over NCCL (TorchSeqComm): S=2 (two pairs at once), S=4 Ulysses,
ring, torus 2 x 2, head-pipelined Ulysses. Prints ``RESULT <case> S=<n> <method> rel_err=<x>`` on group leaders
(relative L2 error of the final latents against one GPU) and ``WORKER DONE`` on rank 0.

    torchrun --standalone --nproc_per_node=4 tests/gpu/sp_gpu_worker.py
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "perf"))

from sp_bench_lib import MODELS, build_model, Case, rel_err  # noqa: E402
from spmd_diff.parallel.attention import LocalAttention  # noqa: E402
from spmd_diff.parallel.group_denoise import build_attention  # noqa: E402
from spmd_diff.parallel.hooks import parallelize_transformer  # noqa: E402
from spmd_diff.parallel.layout import SPLayout  # noqa: E402
from spmd_diff.parallel.torch_comm import build_torch_comms  # noqa: E402

SHAPES = {"7800-tokens": (1, 16, 5, 60, 104), "4263-tokens": (1, 16, 3, 58, 98)}
STEPS = 4


def denoise(model, latents: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """WanPipeline's loop (no CFG) with Wan2.1's scheduler settings; latents float32."""
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    scheduler.set_timesteps(STEPS, device=latents.device)
    with torch.no_grad():
        for t in scheduler.timesteps:
            noise = model(hidden_states=latents.to(torch.bfloat16), timestep=t.expand(1),
                          encoder_hidden_states=text, return_dict=False)[0]
            latents = scheduler.step(noise, t, latents, return_dict=False)[0]
    return latents


def main() -> int:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
        shapes = SHAPES
    else:  # a CPU smoke test of this script (gloo; with SP_BENCH_TINY=1 for a tiny model)
        device = torch.device("cpu")
        shapes = {"tiny": (1, 16, 3, 6, 10)}
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(seconds=120))
    assert world in (2, 4), "run on 2 or 4 GPUs"
    model = build_model(Case("1.3B", "480p", 4), device)
    gen = torch.Generator().manual_seed(0)
    text = torch.randn(1, 512, MODELS["1.3B"]["text_dim"], generator=gen).to(device, torch.bfloat16)
    inputs = {name: torch.randn(shape, generator=gen).to(device) for name, shape in shapes.items()}
    reference = {name: denoise(model, x, text) for name, x in inputs.items()}

    local = LocalAttention("auto")
    rounds = [(2, [[0, 1], [2, 3]] if world == 4 else [[0, 1]])] + ([(4, [[0, 1, 2, 3]])] if world == 4 else [])
    failures = 0
    for degree, groups in rounds:
        comm = build_torch_comms(groups, torus_shapes=[(2, 2)] if degree == 4 else [])
        variants = [("ulysses", SPLayout("ulysses", 1, degree), 1), ("ulysses-pipe", SPLayout("ulysses", 1, degree), 3),
                    ("ring", SPLayout("ring", degree, 1), 1)]
        if degree == 4:
            variants += [("torus-2x2", SPLayout("torus", 2, 2), 1),
                         ("torus-2x2-4-pieces", SPLayout("torus", 2, 2, 4), 1)]
        for name, layout, chunks in variants:
            handle = parallelize_transformer(model, build_attention(comm, layout, local, head_chunks=chunks))
            for case, x in inputs.items():
                out = denoise(model, x, text)
                err = rel_err(out, reference[case])
                failures += not err < 1e-2
                if comm.rank == 0:
                    print(f"RESULT {case} S={degree} {name} rel_err={err:.3e} "
                          f"{'ok' if err < 1e-2 else 'FAIL'}", flush=True)
            handle.remove()
        dist.barrier()
    total = torch.tensor([failures], device=device)
    dist.all_reduce(total)
    if rank == 0:
        print(f"WORKER DONE failures={int(total.item())}", flush=True)
    dist.destroy_process_group()
    return 0 if int(total.item()) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
