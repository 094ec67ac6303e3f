"""GPU check of sequence-parallel denoising (run by tests/gpu/test_sp_gpu.py under torchrun, one process per GPU).

A Wan2.1-1.3B-architecture transformer (random weights, bf16, 4 blocks) denoises 4 UniPC steps of a 17-frame
480 x 832 video (7,800 tokens) and of a 9-frame 464 x 784 one (4,263 tokens: uneven over 2 and 4 ranks) on one GPU
with plain diffusers, then with every layout over NCCL (TorchSeqComm): S=2 (two pairs at once), S=4 Ulysses,
ring, torus 2 x 2, head-pipelined Ulysses. Rank 0 writes RESULT_JSON: ``{"num_ranks", "failures", "rows": [{"case",
"degree", "method", "rel_err", "ok"}]}``, one row per group and layout and case (``rel_err``: relative L2 error of
the final latents against one GPU; ``ok``: below 1e-2); each row is printed too.

    torchrun --standalone --nproc_per_node=4 tests/gpu/sp_gpu_worker.py RESULT_JSON

Without CUDA (gloo) it runs tiny shapes: a smoke test of this script.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from spmd_diff.models.random_wan import ARCHITECTURES
from spmd_diff.parallel.attention import LocalAttention
from spmd_diff.parallel.group_denoise import build_attention
from spmd_diff.parallel.hooks import parallelize_transformer
from spmd_diff.parallel.layout import SPLayout
from spmd_diff.parallel.torch_comm import build_torch_comms

SHAPES = {"7800-tokens": (1, 16, 5, 60, 104), "4263-tokens": (1, 16, 3, 58, 98)}
STEPS = 4
MODEL = dict(ARCHITECTURES["wan2.1-t2v-1.3b"]["transformer"], num_layers=4)
"""Wan2.1-1.3B's transformer config (the checkpoint's config.json), 4 of its 30 blocks."""
TINY_MODEL = dict(MODEL, attention_head_dim=16, num_attention_heads=4, ffn_dim=64, num_layers=2, text_dim=32,
                  freq_dim=32)


def build_model(config: dict, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """A random-weight Wan transformer as ``from_pretrained(..., torch_dtype=torch.bfloat16)`` leaves one:
    bf16 weights except ``_keep_in_fp32_modules`` (fp32), the rotary tables as built. Same seed, same weights on
    every rank."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    with torch.device(device):
        model = WanTransformer3DModel(**config)
    keep = set(WanTransformer3DModel._keep_in_fp32_modules or ())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not keep.intersection(name.split(".")):
                param.data = param.data.to(torch.bfloat16)
    return model.eval().requires_grad_(False)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    a, b = out.float(), ref.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


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
        shapes, config = SHAPES, MODEL
    else:  # a CPU smoke test of this script (gloo)
        device = torch.device("cpu")
        shapes, config = {"tiny": (1, 16, 3, 6, 10)}, TINY_MODEL
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(seconds=120))
    assert world in (2, 4), "run on 2 or 4 GPUs"
    model = build_model(config, device)
    gen = torch.Generator().manual_seed(0)
    text = torch.randn(1, 512, config["text_dim"], generator=gen).to(device, torch.bfloat16)
    inputs = {name: torch.randn(shape, generator=gen).to(device) for name, shape in shapes.items()}
    reference = {name: denoise(model, x, text) for name, x in inputs.items()}

    local = LocalAttention("auto")
    rounds = [(2, [[0, 1], [2, 3]] if world == 4 else [[0, 1]])] + ([(4, [[0, 1, 2, 3]])] if world == 4 else [])
    failures = 0
    rows = []
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
                    rows.append(dict(case=case, degree=degree, method=name, rel_err=err, ok=err < 1e-2))
                    print(json.dumps(rows[-1]), flush=True)
            handle.remove()
        dist.barrier()
    total = torch.tensor([failures], device=device)
    dist.all_reduce(total)
    every_rows = [None] * world
    dist.all_gather_object(every_rows, rows)
    if rank == 0:
        result = {"num_ranks": world, "failures": int(total.item()), "rows": [r for part in every_rows for r in part]}
        Path(sys.argv[1]).write_text(json.dumps(result, indent=1) + "\n")
        print(f"WORKER DONE failures={result['failures']}", flush=True)
    dist.destroy_process_group()
    return 0 if int(total.item()) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
