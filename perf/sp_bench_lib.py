"""Pieces of perf/bench_sp.py: the Wan2.1 shapes, random-weight models as from_pretrained leaves them, timing,
kernel probing and the comm wrappers the torus diagnostics use. Imported by the benchmark and tests/gpu."""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from spmd_diff.parallel.attention import LocalAttention, math_attention
from spmd_diff.parallel.seq_comm import Pending, SeqComm

WAN_COMMON = dict(patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
                  freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                  rope_max_seq_len=1024)
MODELS = {
    "1.3B": dict(WAN_COMMON, num_attention_heads=12, ffn_dim=8960, num_layers=30),
    "14B": dict(WAN_COMMON, num_attention_heads=40, ffn_dim=13824, num_layers=40),
}
"""Wan2.1 T2V transformer configs (the checkpoints' config.json)."""
RESOLUTIONS = {"480p": (480, 832), "720p": (720, 1280)}
NUM_FRAMES = 81
TEXT_TOKENS = 512
if os.environ.get("SP_BENCH_TINY") == "1":  # a CPU smoke test of the harness (gloo): tiny shapes, same code
    TINY = dict(WAN_COMMON, attention_head_dim=16, text_dim=32, freq_dim=32)
    MODELS = {"1.3B": dict(TINY, num_attention_heads=4, ffn_dim=64, num_layers=2),
              "14B": dict(TINY, num_attention_heads=8, ffn_dim=64, num_layers=4)}
    RESOLUTIONS = {"480p": (48, 80), "720p": (64, 96)}
    NUM_FRAMES = 9
    TEXT_TOKENS = 16
CUDA = torch.cuda.is_available()


@dataclass(frozen=True)
class Case:
    """One model at one resolution; ``layers`` < the model's own means "measure that many blocks, scale up"."""

    model: str
    resolution: str
    layers: int

    @property
    def key(self) -> str:
        return f"{self.model}-{self.resolution}"

    @property
    def full_layers(self) -> int:
        return MODELS[self.model]["num_layers"]

    @property
    def scale(self) -> float:
        """Factor from measured time to a full-depth step (blocks dominate; embeddings counted alike: an upper
        bound)."""
        return self.full_layers / self.layers

    @property
    def latent_shape(self) -> tuple[int, ...]:
        height, width = RESOLUTIONS[self.resolution]
        return (1, 16, (NUM_FRAMES - 1) // 4 + 1, height // 8, width // 8)

    @property
    def num_tokens(self) -> int:
        _, _, frames, height, width = self.latent_shape
        return frames * (height // 2) * (width // 2)

    @property
    def heads(self) -> int:
        return MODELS[self.model]["num_attention_heads"]


def build_model(case: Case, device: torch.device, cls=None, seed: int = 0) -> torch.nn.Module:
    """A random-weight Wan transformer as ``from_pretrained(..., torch_dtype=torch.bfloat16)`` leaves one:
    bf16 weights except ``_keep_in_fp32_modules`` (fp32), the rotary tables as built (float64). Same seed, same
    weights on every rank."""
    if cls is None:
        from diffusers import WanTransformer3DModel as cls
    config = dict(MODELS[case.model], num_layers=case.layers)
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls(**config)
    keep = set(getattr(cls, "_keep_in_fp32_modules", None) or ())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not keep.intersection(name.split(".")):
                param.data = param.data.to(torch.bfloat16)
    return model.eval().requires_grad_(False)


def make_inputs(case: Case, device: torch.device, seed: int = 1) -> dict:
    """Forward kwargs: latents ``[1, 16, 21, H/8, W/8]``, one timestep, text ``[1, 512, 4096]`` (bf16)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(case.latent_shape, generator=gen).to(device, torch.bfloat16)
    text_dim = MODELS[case.model]["text_dim"]
    text = torch.randn(1, TEXT_TOKENS, text_dim, generator=gen).to(device, torch.bfloat16)
    return dict(hidden_states=hidden, timestep=torch.tensor([500.0], device=device), encoder_hidden_states=text,
                return_dict=False)


def group_max(value: float, group) -> float:
    """The largest ``value`` over the ranks of ``group`` (a process group, or None for this rank alone)."""
    if group is None:
        return value
    probe = torch.tensor([value], dtype=torch.float64, device="cuda" if CUDA else "cpu")
    dist.all_reduce(probe, op=dist.ReduceOp.MAX, group=group)
    return float(probe.item())


def group_sync(group) -> None:
    if group is not None:
        probe = torch.zeros(1, device="cuda" if CUDA else "cpu")
        dist.all_reduce(probe, group=group)
    if CUDA:
        torch.cuda.synchronize()


def time_forward(fn, group, warmup: int, reps: int) -> dict:
    """Median wall time of ``fn()`` (CUDA events; each rep starts together on the group and counts the slowest
    rank). Returns ``{"median_s", "times_s", "out", "warmup_s"}``."""
    t0 = time.perf_counter()
    out = None
    for _ in range(warmup):
        out = fn()
    group_sync(group)
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        group_sync(group)
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
        else:
            t1 = time.perf_counter()
            out = fn()
            elapsed = time.perf_counter() - t1
        times.append(group_max(elapsed, group))
    return {"median_s": statistics.median(times), "times_s": times, "out": out, "warmup_s": warmup_s}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    a, b = out.float(), ref.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def probe_attention(device: torch.device, heads: int, num_tokens: int, reps: int = 3) -> dict:
    """Check each local attention backend against the math reference (small shapes, Ulysses' strided layout),
    then time the ones that pass at ``heads x num_tokens`` (head dim 128, bf16). Returns
    ``{"best": name, "best_lse": name, "times": {...}, "errors": {...}}``."""
    gen = torch.Generator(device="cpu").manual_seed(3)
    small = torch.randn(3, 1, 300, 2, 128, generator=gen).to(device, torch.bfloat16)  # [3, B, N, h, D]
    q, k, v = (small[i].transpose(1, 2) for i in range(3))
    ref_out, ref_lse = math_attention(q, k, v)
    result: dict = {"times": {}, "errors": {}, "lse_times": {}}
    big = torch.randn(3, 1, num_tokens, heads, 128, device=device, dtype=torch.bfloat16)
    bq, bk, bv = (big[i].transpose(1, 2) for i in range(3))
    for name in ("auto", "flash", "cudnn", "efficient"):
        local = LocalAttention(name)
        for kind, call in (("plain", lambda: (local(q, k, v), None)), ("lse", lambda: local.with_lse(q, k, v))):
            try:
                out, lse = call()
                err = rel_err(out, ref_out)
                if lse is not None:
                    err = max(err, float((lse.float() - ref_lse.float()).abs().max()))
                if not math.isfinite(err) or err > 2e-2:
                    raise RuntimeError(f"wrong result: error {err:.3g}")
                fn = (lambda: local(bq, bk, bv)) if kind == "plain" else (lambda: local.with_lse(bq, bk, bv))
                timing = time_forward(fn, None, 1, reps)
                (result["times"] if kind == "plain" else result["lse_times"])[name] = timing["median_s"]
            except Exception as error:  # noqa: BLE001 - a backend missing here is a finding, not a failure
                result["errors"][f"{name}/{kind}"] = f"{type(error).__name__}: {str(error)[:160]}"
    result["best"] = min(result["times"], key=result["times"].get) if result["times"] else "auto"
    result["best_lse"] = min(result["lse_times"], key=result["lse_times"].get) if result["lse_times"] else "auto"
    return result


class NullComm(SeqComm):
    """Same shapes as ``inner`` comm's exchanges, no transfer (zeros): the torus with the exchange removed."""

    def __init__(self, like: SeqComm) -> None:
        self.rank, self.size = like.rank, like.size
        self.blocking_start = like.blocking_start  # the torus takes the same path as over ``like``

    def all_to_all(self, send, recv_shapes):
        template = next(t for t in send if t is not None)
        return [send[i] if i == self.rank else (None if shape is None else
                torch.zeros(shape, dtype=template.dtype, device=template.device))
                for i, shape in enumerate(recv_shapes)]

    def broadcast(self, tensor, root):
        return tensor


class RecordingComm(SeqComm):
    """Passes through to ``comm`` and records every exchange's shapes, so the exchanges alone can be replayed."""

    def __init__(self, comm: SeqComm) -> None:
        self.comm, self.rank, self.size = comm, comm.rank, comm.size
        self.blocking_start = comm.blocking_start
        self.calls: list = []
        self.recording = True

    def _note(self, send, recv_shapes) -> None:
        if self.recording:
            self.calls.append(([None if t is None else (tuple(t.shape), t.dtype) for t in send], list(recv_shapes)))

    def all_to_all(self, send, recv_shapes):
        self._note(send, recv_shapes)
        return self.comm.all_to_all(send, recv_shapes)

    def start_all_to_all(self, send, recv_shapes) -> Pending:
        self._note(send, recv_shapes)
        return self.comm.start_all_to_all(send, recv_shapes)

    def broadcast(self, tensor, root):
        return self.comm.broadcast(tensor, root)

    def replay(self, device: torch.device) -> None:
        """Every recorded exchange again, started in order, then all waited for (what one forward moves)."""
        pending = []
        for sends, shapes in self.calls:
            tensors = [None if s is None else torch.empty(s[0], dtype=s[1], device=device) for s in sends]
            pending.append(self.comm.start_all_to_all(tensors, shapes))
        for exchange in pending:
            exchange.wait()
