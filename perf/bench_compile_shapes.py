"""Compiled transformer blocks over items of several shapes: compilations, their seconds, and the step time
against eager (one GPU, so degree 1: the same blocks every per-item SP group uses, ``models.speed.compile_blocks``).

The random Wan2.1-1.3B transformer (bf16, as ``from_pretrained`` leaves it) runs ``--steps`` forwards per item
(one per denoising step, no CFG) over items whose shapes alternate (480x832x33, 480x832x81, 320x576x81 by
default), twice round, in three modes:

- ``eager``: the plain model (the baseline, same call);
- ``static``: ``compile_blocks`` as the engine does (``dynamic=False``): one graph per distinct token count;
- ``dynamic``: every block compiled with ``dynamic=True`` (one graph with a symbolic token count), for the
  bucket-or-dynamic decision.

Per mode: graphs compiled (a counting wrapper around the backend), the first forward of each shape less the
median forward of that shape's later items (its compile seconds), the median forward per shape on items after
the first round, and the wall time. A mode stops being started once ``--budget-s`` has passed (the file says
which ran). Results: ``OUT/compile-shapes-DATE.json`` and ``.md``.

    python3 perf/bench_compile_shapes.py --out DIR            # GPU
    python3 perf/bench_compile_shapes.py --out DIR --tiny     # CPU smoke test (aot_eager, tiny shapes)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from bench_common import header_line, results_header
from spmd_diff.models.speed import allow_compiled_variants, compile_blocks

WAN_1_3B = dict(patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
                freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
                num_attention_heads=12, ffn_dim=8960, num_layers=30)
"""Wan2.1-T2V-1.3B's transformer config.json."""
TINY = dict(WAN_1_3B, attention_head_dim=16, text_dim=32, freq_dim=32, num_attention_heads=2, ffn_dim=64,
            num_layers=2)
SHAPES = ["480x832x33", "480x832x81", "320x576x81"]
TINY_SHAPES = ["32x48x9", "48x64x9", "32x32x17"]
TEXT_TOKENS = 512


def build_model(config: dict, device: torch.device) -> torch.nn.Module:
    """Random weights as ``from_pretrained(..., torch_dtype=torch.bfloat16)`` leaves them (fp32 where the model
    keeps fp32)."""
    from diffusers import WanTransformer3DModel

    from spmd_diff.models.random_wan import cast_like_from_pretrained

    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(**config)
    with torch.no_grad():
        cast_like_from_pretrained(model, torch.bfloat16, WanTransformer3DModel._keep_in_fp32_modules or ())
    return model.eval().requires_grad_(False)


def latent_shape(shape: str) -> tuple[int, ...]:
    height, width, frames = (int(v) for v in shape.split("x"))
    return (1, 16, (frames - 1) // 4 + 1, height // 8, width // 8)


def num_tokens(shape: str) -> int:
    _, _, frames, height, width = latent_shape(shape)
    return frames * (height // 2) * (width // 2)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_mode(mode: str, model, shapes: list[str], steps: int, device: torch.device, text_dim: int,
             backend: str) -> dict:
    graphs: list[str] = []
    current = [""]
    if mode != "eager":
        inner = torch._dynamo.lookup_backend(backend)

        def counting(gm, example_inputs):
            graphs.append(current[0])
            return inner(gm, example_inputs)

        if mode == "static":
            compile_blocks(model, counting)
        else:
            for block in model.blocks:
                block.compile(dynamic=True, backend=counting)
        allow_compiled_variants(len(shapes))
    gen = torch.Generator(device="cpu").manual_seed(1)
    text = torch.randn(1, TEXT_TOKENS, text_dim, generator=gen).to(device, torch.bfloat16)
    times: dict[str, list[list[float]]] = {shape: [] for shape in shapes}
    t_mode = time.perf_counter()
    for shape in shapes * 2:  # alternating, twice round
        current[0] = shape
        latents = torch.randn(latent_shape(shape), generator=gen).to(device, torch.bfloat16)
        item = []
        for step in range(steps):
            timestep = torch.tensor([1000.0 * (steps - step) / steps], device=device)
            sync(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model(hidden_states=latents, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]
            sync(device)
            item.append(time.perf_counter() - t0)
            latents = (latents.float() - 0.1 * out.float()).to(torch.bfloat16)
        times[shape].append(item)
    wall = time.perf_counter() - t_mode
    per_shape = {}
    for shape, items in times.items():
        later = [t for item in items[1:] for t in item] + items[0][1:]
        steady = statistics.median(later)
        per_shape[shape] = {"tokens": num_tokens(shape), "first_forward_s": round(items[0][0], 3),
                            "steady_forward_s": round(steady, 4),
                            "compile_s": round(items[0][0] - steady, 2) if mode != "eager" else 0.0,
                            "graphs": graphs.count(shape),
                            "forwards_s": [[round(t, 4) for t in item] for item in items]}
    return {"mode": mode, "graphs": len(graphs), "items": 2 * len(shapes), "wall_s": round(wall, 2),
            "shapes": per_shape}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny model and shapes, aot_eager")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--modes", default="eager,static,dynamic")
    parser.add_argument("--budget-s", type=float, default=270.0, help="start no mode after this many seconds")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    config = TINY if args.tiny else WAN_1_3B
    shapes = TINY_SHAPES if args.tiny else SHAPES
    backend = "aot_eager" if args.tiny else "inductor"
    header = results_header("torch", "diffusers", "triton")
    header["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    config_row = {"model": "random Wan2.1-1.3B" if not args.tiny else "tiny", "dtype": "bfloat16",
                  "steps": args.steps, "shapes": shapes, "backend": backend, "cfg": False,
                  "order": "the shapes alternating, twice round"}
    results = {**header, "config": config_row, "modes": [], "skipped": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"compile-shapes-{header['date'][:10]}"
    t_start = time.perf_counter()
    for mode in args.modes.split(","):
        if time.perf_counter() - t_start > args.budget_s:
            results["skipped"].append(mode)
            continue
        torch._dynamo.reset()
        model = build_model(config, device)
        row = run_mode(mode, model, shapes, args.steps, device, config["text_dim"], backend)
        print(json.dumps({k: v for k, v in row.items() if k != "shapes"}), flush=True)
        results["modes"].append(row)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
        stem.with_suffix(".md").write_text(render(results))
    return 0


def render(results: dict) -> str:
    cfg = results["config"]
    lines = [f"# Compiled blocks over items of several shapes ({cfg['model']}, {results['device']})", "",
             header_line(results), "",
             f"{cfg['steps']} forwards per item (no CFG), bf16, backend {cfg['backend']}; items: {cfg['order']} "
             f"({', '.join(cfg['shapes'])}); `perf/bench_compile_shapes.py`. First-item compile seconds = first "
             "forward of the shape less its steady forward (a cold Inductor cache on a fresh machine).", "",
             "| mode | graphs | wall s | " + " | ".join(f"{s} ({num_tokens_of(results, s)} tok): compile s / "
                                                        "steady ms" for s in cfg["shapes"]) + " |",
             "|---|---|---|" + "---|" * len(cfg["shapes"])]
    eager = next((m for m in results["modes"] if m["mode"] == "eager"), None)
    for row in results["modes"]:
        cells = []
        for shape in cfg["shapes"]:
            s = row["shapes"][shape]
            ratio = ""
            if eager is not None and row is not eager:
                ratio = f" ({eager['shapes'][shape]['steady_forward_s'] / s['steady_forward_s']:.3f}x eager)"
            cells.append(f"{s['compile_s']:.1f} / {1000 * s['steady_forward_s']:.1f}{ratio}")
        lines.append(f"| {row['mode']} | {row['graphs']} | {row['wall_s']:.1f} | " + " | ".join(cells) + " |")
    if results["skipped"]:
        lines += ["", f"Not run (over the time budget): {', '.join(results['skipped'])}."]
    return "\n".join(lines) + "\n"


def num_tokens_of(results: dict, shape: str) -> int:
    for row in results["modes"]:
        return row["shapes"][shape]["tokens"]
    return num_tokens(shape)


if __name__ == "__main__":
    raise SystemExit(main())
