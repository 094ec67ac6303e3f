"""The three phases of perf/bench_sp.py (each runs under its own torchrun): ours, diffusers CP, xfuser USP."""

from __future__ import annotations

import gc
import importlib.metadata
import json
import os
import platform
from pathlib import Path

import torch
import torch.distributed as dist

from bench_sp import REF_DIR, Phase
from sp_bench_lib import NullComm, RecordingComm, build_model, make_inputs, probe_attention, time_forward
from spmd_diff.parallel.attention import LocalAttention, SeqParallelAttention
from spmd_diff.parallel.group_denoise import build_attention
from spmd_diff.parallel.hooks import parallelize_transformer
from spmd_diff.parallel.layout import SPLayout
from spmd_diff.parallel.torch_comm import TorchSeqComm, build_torch_comms


def run_phase(phase: Phase) -> None:
    {"ours": run_ours, "coll": run_coll, "diffusers": run_diffusers, "xfuser": run_xfuser}[phase.name](phase)


def _versions() -> dict:
    found = {}
    for name in ("torch", "diffusers", "triton", "xfuser", "yunchang", "nvidia-nccl-cu13", "nvidia-cudnn-cu13"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    if torch.cuda.is_available():
        found["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        found["cudnn"] = torch.backends.cudnn.version()
    return found


def _free(*objects) -> None:
    del objects
    gc.collect()
    torch.cuda.empty_cache()


def _my_group(groups: list[list[int]], rank: int) -> int | None:
    return next((i for i, g in enumerate(groups) if rank in g), None)


def _forward(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


# ---- ours ------------------------------------------------------------------------------------------------------


def run_ours(ph: Phase) -> None:
    REF_DIR.mkdir(parents=True, exist_ok=True)
    choice = [None]
    if ph.rank == 0:
        probe = probe_attention(ph.device, heads=3, num_tokens=32760) if ph.device.type == "cuda" else \
            {"best": "auto", "best_lse": "auto", "note": "CPU smoke test: no probe"}
        choice = [probe]
        cuda = ph.device.type == "cuda"
        ph.record(case="env", degree=0, method="environment", host=platform.node(),
                  gpu=torch.cuda.get_device_name(ph.device) if cuda else "cpu",
                  gpus=torch.cuda.device_count() if cuda else ph.world, versions=_versions(), attention_probe=probe,
                  args=vars(ph.args), commit=os.environ.get("SP_BENCH_COMMIT"))
    dist.broadcast_object_list(choice, 0)
    local = LocalAttention(choice[0]["best"], lse_backend=choice[0]["best_lse"])
    for degree, groups, assigned in ph.rounds():
        mine = _my_group(groups, ph.rank)
        if degree == 1:
            comm = TorchSeqComm([ph.rank], None)
        else:  # collective over the world
            comm = build_torch_comms(groups, torus_shapes=[(2, 2)] if degree == 4 else [])
        pg = comm.group if degree > 1 else None
        for case in assigned[mine] if mine is not None else []:
            leader = ph.rank == groups[mine][0]
            model = build_model(case, ph.device)
            inputs = make_inputs(case, ph.device)
            forward = lambda: _forward(model, inputs)  # noqa: E731
            if degree == 1:
                row = ph.measure("diffusers", case, 1, None, forward, leader, attention="native (SDPA default)")
                if row is not None:
                    torch.save(ph.last_out.cpu(), REF_DIR / f"{case.key}-L{case.layers}.pt")
                ph.last_out = None
                try:
                    model.set_attention_backend("_native_cudnn")
                    ph.measure("diffusers+cudnn", case, 1, None, forward, leader, attention="_native_cudnn")
                except Exception as error:  # noqa: BLE001 - a local finding (no collectives at S=1)
                    ph.record(case=case.key, degree=1, method="diffusers+cudnn",
                              error=f"{type(error).__name__}: {error}")
                finally:
                    model.set_attention_backend("native")
                variants = [("ours", SPLayout("ulysses", 1, 1), 1)]
            else:
                variants = _sp_variants("ours", case, degree, ph.args.compile)
            _measure_variants(ph, variants, case, degree, pg, model, forward, comm, local, leader,
                              attention=f"{local.backend}/{local.lse_backend}")
            if degree == 4:
                torus_diagnostics(ph, case, comm, pg, model, forward, local, leader)
            _free(model, inputs)
        dist.barrier()
        if ph.over_budget():
            break


def _sp_variants(prefix: str, case, degree: int, compile_variant: bool) -> list:
    """``(method, layout, head_chunks)`` of our layouts at ``degree`` > 1: Ulysses (also compiled, also
    head-pipelined), ring, and at 4 the torus 2 x 2."""
    ulysses = SPLayout("ulysses", 1, degree)
    variants = [(f"{prefix}-ulysses", ulysses, 1)]
    if compile_variant:
        variants.append((f"{prefix}-ulysses+compile", ulysses, 1))
    variants += [(f"{prefix}-ulysses-pipe", ulysses, max(1, min(3, case.heads // degree))),
                 (f"{prefix}-ring", SPLayout("ring", degree, 1), 1)]
    if degree == 4:
        variants.append((f"{prefix}-torus", SPLayout("torus", 2, 2), 1))
    return variants


def _measure_variants(ph: Phase, variants: list, case, degree: int, pg, model, forward, seq_comm, local,
                      leader: bool, **extra) -> None:
    """Parallelize ``model`` over ``seq_comm`` in each layout of ``variants`` (a ``+compile`` method compiles the
    blocks), time ``forward`` and record it, then restore the model."""
    for method, layout, chunks in variants:
        compiled = method.endswith("+compile")
        handle = parallelize_transformer(model, build_attention(seq_comm, layout, local, head_chunks=chunks),
                                         compile_blocks=compiled)
        ph.measure(method, case, degree, pg, forward, leader, layout=layout.describe(), head_chunks=chunks,
                   compiled=compiled, **extra)
        handle.remove()


def torus_diagnostics(ph: Phase, case, comm, pg, model, forward, local, leader: bool) -> None:
    """The 2 x 2 torus with its inter-row exchange removed (same compute), and that exchange alone."""
    layout = SPLayout("torus", 2, 2)
    inner, outer = comm.split(2, 2)
    recorder = RecordingComm(outer)
    handle = parallelize_transformer(model, SeqParallelAttention(layout, comm, inner, recorder, local))
    forward()
    handle.remove()
    recorder.recording = False
    handle = parallelize_transformer(model, SeqParallelAttention(layout, comm, inner, NullComm(outer), local))
    ph.measure("ours-torus-no-exchange", case, 4, pg, forward, leader, layout=layout.describe())
    handle.remove()
    try:
        timing = time_forward(lambda: recorder.replay(ph.device), pg, warmup=1, reps=ph.args.reps)
        if leader:
            ph.record(case=case.key, degree=4, method="torus-exchange-only", median_s=timing["median_s"] * case.scale,
                      measured_s=timing["median_s"], times_s=timing["times_s"], layers=case.layers,
                      num_exchanges=len(recorder.calls))
    except Exception as error:  # noqa: BLE001
        if leader:
            ph.record(case=case.key, degree=4, method="torus-exchange-only", error=f"{type(error).__name__}: {error}")


# ---- ours over the project's collectives (NVSHMEM) ----------------------------------------------------------------


def run_coll(ph: Phase) -> None:
    """Our layouts over ``GroupSeqComm(GroupCollectives(NvshmemTransport))``, the engine's GPU path (mpirun)."""
    from spmd_diff.comm.collectives import GroupCollectives
    from spmd_diff.comm.select import make_transport
    from spmd_diff.parallel.seq_comm import GroupSeqComm

    heap = 1 << 30 if ph.device.type == "cuda" else 64 << 20
    transport = make_transport(ph.mpi_world, heap, os.environ.get("SP_BENCH_COLL_TRANSPORT", "nvshmem"))
    coll = GroupCollectives(transport, 0, heap, max_ranks=4, timeout_s=120)
    choice = [None]
    if ph.rank == 0:
        env = next((json.loads(line) for line in (Path(ph.args.out) / "ours.jsonl").read_text().splitlines()
                    if '"environment"' in line), {}) if (Path(ph.args.out) / "ours.jsonl").exists() else {}
        choice = [env.get("attention_probe") or {"best": "auto", "best_lse": "auto"}]
    dist.broadcast_object_list(choice, 0)
    local = LocalAttention(choice[0]["best"], lse_backend=choice[0]["best_lse"])
    try:
        for degree, groups, assigned in ph.rounds():
            if degree == 1:
                continue
            mine = _my_group(groups, ph.rank)
            pgs = [dist.new_group(g) for g in groups]
            comm = GroupSeqComm(coll.group(groups[mine]), coll.group, device=ph.device) if mine is not None else None
            for case in assigned[mine] if mine is not None else []:
                leader = ph.rank == groups[mine][0]
                model = build_model(case, ph.device)
                inputs = make_inputs(case, ph.device)
                _measure_variants(ph, _sp_variants("coll", case, degree, ph.args.compile), case, degree, pgs[mine],
                                  model, lambda: _forward(model, inputs), comm, local, leader,
                                  comm="GroupCollectives/NVSHMEM")
                _free(model, inputs)
            coll.synchronize()
            dist.barrier()
            if ph.over_budget():
                break
    finally:
        coll.free()
        transport.free()


# ---- diffusers' context parallelism ------------------------------------------------------------------------------


def run_diffusers(ph: Phase) -> None:
    from diffusers import ContextParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    for degree, groups, assigned in ph.rounds():
        if degree == 1:
            continue
        mine = _my_group(groups, ph.rank)
        pgs = [dist.new_group(g) for g in groups]
        configs = {}
        for kind, shape in (("ulysses", (1, degree)), ("ring", (degree, 1))):  # collective: meshes, flattening
            mesh = init_device_mesh(ph.device.type, (len(groups), *shape), mesh_dim_names=("dp", "ring", "ulysses"))
            config = ContextParallelConfig(ring_degree=shape[0], ulysses_degree=shape[1], mesh=mesh)
            config.setup(ph.rank, ph.world, ph.device, mesh)
            configs[kind] = config
        # the native (SDPA) backend has no log-sum-exp, so diffusers' ring needs cuDNN or torch's flash kernel
        variants = [("diffusers-ulysses", "ulysses", None), ("diffusers-ulysses+cudnn", "ulysses", "_native_cudnn"),
                    ("diffusers-ring+cudnn", "ring", "_native_cudnn"),
                    ("diffusers-ring+flash", "ring", "_native_flash")]
        if ph.args.compile:
            variants.insert(2, ("diffusers-ulysses+cudnn+compile", "ulysses", "_native_cudnn"))
        for case in assigned[mine] if mine is not None else []:
            leader = ph.rank == groups[mine][0]
            inputs = make_inputs(case, ph.device)
            for method, kind, backend in variants:
                try:
                    model = build_model(case, ph.device)
                    if backend:
                        model.set_attention_backend(backend)
                    model.enable_parallelism(config=configs[kind])
                    if method.endswith("+compile"):
                        model.compile_repeated_blocks(dynamic=False)  # diffusers' regional compilation
                except Exception as error:  # noqa: BLE001 - same on every rank: record and go on
                    if leader:
                        ph.record(case=case.key, degree=degree, method=method, error=f"{type(error).__name__}: {error}")
                    continue
                ph.measure(method, case, degree, pgs[mine], lambda: _forward(model, inputs), leader,
                           attention=backend or "native")
                _free(model)
            _free(inputs)
        dist.barrier()
        if ph.over_budget():
            break


# ---- xDiT / xfuser USP ---------------------------------------------------------------------------------------------


def run_xfuser(ph: Phase) -> None:
    try:
        from xfuser.core.distributed import init_distributed_environment, initialize_model_parallel
        from xfuser.core.distributed.parallel_state import destroy_model_parallel  # the package does not re-export it
        from xfuser.core.distributed.runtime_state import get_runtime_state
        from xfuser.model_executor.models.transformers.transformer_wan import xFuserWanTransformer3DWrapper
    except Exception as error:  # noqa: BLE001 - not installed or not importable here: a finding
        if ph.rank == 0:
            ph.record(case="all", degree=0, method="xfuser", error=f"import failed: {type(error).__name__}: {error}")
        return
    cuda = ph.device.type == "cuda"
    comm_backend = "nccl" if cuda else "gloo"  # named: xDiT refuses to pick one on a machine without a GPU
    # xDiT's default attention on this machine (no flash_attn 3/4: cuDNN) and torch's flash; SDPA in the CPU smoke test
    variants = (("xfuser-usp-ulysses", "CUDNN"), ("xfuser-usp-ulysses+sdpa_flash", "SDPA_FLASH")) if cuda else \
        (("xfuser-usp-ulysses", "SDPA"),)
    init_distributed_environment(world_size=ph.world, rank=ph.rank, backend=comm_backend)
    for degree, groups, assigned in ph.rounds():
        if degree == 1:
            continue
        mine = _my_group(groups, ph.rank)
        pgs = [dist.new_group(g) for g in groups]
        initialize_model_parallel(data_parallel_degree=ph.world // degree, sequence_parallel_degree=degree,
                                  ulysses_degree=degree, ring_degree=1, backend=comm_backend)
        for case in assigned[mine] if mine is not None else []:
            leader = ph.rank == groups[mine][0]
            inputs = make_inputs(case, ph.device)
            try:
                model = build_model(case, ph.device, cls=xFuserWanTransformer3DWrapper)
                _xfuser_runtime_state(model, ph.world // degree, degree)
            except Exception as error:  # noqa: BLE001
                if leader:
                    ph.record(case=case.key, degree=degree, method="xfuser", error=f"{type(error).__name__}: {error}")
                continue
            for method, backend in variants:
                try:
                    get_runtime_state().set_attention_backend(backend)
                except Exception as error:  # noqa: BLE001
                    if leader:
                        ph.record(case=case.key, degree=degree, method=method, error=f"{type(error).__name__}: {error}")
                    continue
                ph.measure(method, case, degree, pgs[mine], lambda: _forward(model, inputs), leader, attention=backend)
            _free(model, inputs)
        dist.barrier()
        destroy_model_parallel()
        if ph.over_budget():
            break


def _xfuser_runtime_state(model, dp_degree: int, ulysses_degree: int) -> None:
    """xDiT's global runtime state for ``model`` (an ``xFuserWanTransformer3DWrapper``) run outside its pipelines.
    Its forward needs a ``DiTRuntimeState`` (``increment_step_counter``); ``initialize_runtime_state()`` without a
    pipeline makes an ``ExternalRuntimeState``, which has none and whose default config (no parallelism) xDiT's own
    checks reject in a world of several ranks. So: this round's degrees as xDiT's engine config, and a stand-in
    pipeline holding only the transformer (xDiT reads its config: heads against the Ulysses degree, patch size).
    Local: no collective; the model parallel groups must already exist."""
    from types import SimpleNamespace

    from xfuser.config import xFuserArgs
    from xfuser.core.distributed.runtime_state import initialize_runtime_state

    config, _ = xFuserArgs(data_parallel_degree=dp_degree, ulysses_degree=ulysses_degree, ring_degree=1).create_config()
    initialize_runtime_state(pipeline=SimpleNamespace(transformer=model), engine_config=config)
