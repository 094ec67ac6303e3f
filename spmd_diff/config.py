"""The job: a TOML file, typed and validated before anything collective happens.

Every rank loads the same file and overrides; a bad job raises :class:`UserError` with the same message on
every rank (the CLI gathers errors so no rank hangs while another exits).
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from spmd_diff.errors import UserError, did_you_mean
from spmd_diff.io.codec import DEFAULT_FPS, DEFAULT_PRESET, DEFAULT_QUALITY


@dataclass(frozen=True)
class ModelConfig:
    path: str = "demo"
    """A local diffusers directory (Wan2.1 text-to-video or image-to-video: its ``model_index.json`` says which),
    "demo" / "demo-i2v" for the built-in demo models, or "random:<architecture>"."""
    dtype: str = "auto"
    """Transformer and text-encoder dtype: "auto" (float32 on CPU, bfloat16 on GPU), "float32", "bfloat16", "float16"."""


@dataclass(frozen=True)
class VideoConfig:
    height: int = 64
    """Frame height in pixels; a multiple of the VAE's spatial factor times the patch size (16 for Wan)."""
    width: int = 64
    """Frame width in pixels; same rule as height."""
    num_frames: int = 9
    """Frames per video; 4k+1 for Wan."""
    num_inference_steps: int = 4
    """Denoising steps."""
    guidance_scale: float = 5.0
    """Classifier-free guidance; <= 1 turns the negative branch off."""
    negative_prompt: str = ""
    """Default negative prompt for items that do not give one."""
    max_sequence_length: int = 512
    """Text tokens per prompt (longer prompts are truncated with a warning, as diffusers does)."""

    def for_item(self, item: Any) -> "VideoConfig":
        """These settings with ``item``'s own (a prompts-file item's ``height``, ``width``, ``num_frames``,
        ``num_inference_steps``, ``guidance_scale``, where it gives them) in place of the job's defaults."""
        own = {name: getattr(item, name) for name in PER_ITEM_VIDEO_KEYS if getattr(item, name, None) is not None}
        return dataclasses.replace(self, **own) if own else self


PER_ITEM_VIDEO_KEYS = ("height", "width", "num_frames", "num_inference_steps", "guidance_scale")
"""[video] settings an item of the prompts file may give for itself (the job's values are the defaults)."""


def video_value_problem(name: str, value: Any) -> str | None:
    """Why ``value`` is not a valid ``[video]`` ``name`` (the job's and every item's settings are checked alike:
    integers >= 1, ``num_frames`` 4k+1, ``guidance_scale`` a finite number >= 0), or None if it is valid. The
    multiples the model needs are checked against its configs once it is known (``models.shapes.read_shapes``)."""
    if name == "guidance_scale":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value \
                or value in (float("inf"), float("-inf")):
            return f"must be a finite number, got {type(value).__name__} {value!r}"
        if value < 0:
            return f"must be >= 0, got {value}"
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        return f"must be an integer, got {type(value).__name__} {value!r}"
    if value < 1:
        return f"must be >= 1, got {value}"
    if name == "num_frames" and (value - 1) % 4 != 0:
        return f"must be 4k+1 for Wan (e.g. 9, 17, 81), got {value}"
    return None


@dataclass(frozen=True)
class RunConfig:
    seed: int = 0
    """Base seed; an item without a seed gets seed + its index in the prompts file."""
    ring_slots: int = 2
    """Slots per double-ring channel (items in flight per producer->consumer edge)."""
    timeout_s: float = 0.0
    """Deadline of any single wait (channel, barrier), seconds; 0 = from the cost model (a few items' worth of the
    slowest stage, at least 300 s). A peer silent this long is reported and the job aborts."""
    threads: int = 0
    """CPU threads per rank (torch intra-op, and the h264/hevc encoder); 0 = cores of the node divided by the
    ranks on it."""
    events: bool = True
    """Write OUT/events/ (per-rank event logs, merged into OUT/events.jsonl at the end)."""
    progress_interval_s: float = 30.0
    """Seconds between progress lines when stderr is not a terminal."""


@dataclass(frozen=True)
class RolesConfig:
    encoders: int = 1
    """Ranks that run the text encoder (0 = DiT ranks encode their own items)."""
    decoders: int = 1
    """Ranks that run the VAE decoder and write results (0 = DiT ranks decode their own items)."""
    policy: str = "auto"
    """"auto": the planner chooses which
    ranks encode, denoise (groups of dit.sp_degree) and decode -- a rank holds several stages where its GPU's
    memory allows, so no GPU is reserved for a small stage -- and re-balances between batches from the timings
    every rank measured (roles.encoders/decoders are ignored). "static": roles.encoders / roles.decoders as
    given, for the whole job. `spmd-diff plan` prints either."""
    colocate: bool = True
    """policy "auto": let a rank hold several stages where its GPU's memory allows (false: one stage per rank,
    e.g. to keep a GPU's memory for larger activations)."""
    batch_s: float = 300.0
    """policy "auto": seconds of predicted work (of the batch's kind of item) of the job's first batch and of the
    first batch after a re-plan or a new kind of item; each batch after one that kept plan and kind is twice as
    long (``runtime.rebalance.batch_length``). Between batches the timings are combined over MPI and the plan may
    change; where stages hand items between ranks the pipeline drains there (where every rank renders whole items
    alone it does not, and a re-plan lags one batch). Shorter batches follow changes sooner, longer ones drain
    less."""
    time_share: bool | str = "auto"
    """Ranks whose GPU cannot hold every stage's components at once may still run every stage, one at a time: a
    time-shared rank keeps one stage's components on its GPU (the others in host memory) and runs the items it
    pulls stage by stage, roles.stage_batch at a time (encode them all, denoise them all, decode and write them
    all), so no GPU is reserved for a small stage even when memory forbids co-location. "auto" (policy "auto"):
    the planner uses it where it predicts it faster than ranks with dedicated stages; true: every rank
    time-shares (policy "static" then needs roles.encoders = roles.decoders = 0 and dit.sp_degree = 1); false:
    never. Same videos (components move between host and GPU unchanged)."""
    stage_batch: int = 8
    """Items a time-shared rank takes per cycle: larger cycles move the components less often per item and hold
    more encoded prompts and latents in host memory (about 8 MB each at 480p with guidance). The most: policy
    "auto" plans fewer (``RolePlan.stage_batch``) where that fills a rank's cycles evenly (12 items per rank: two
    cycles of 6) or the ranks' fitted speeds differ (a slow rank's last cycle is shorter)."""
    group_decode: bool = False
    """policy "static" with at least 2 decoder ranks: the decoder ranks decode each video together, every one a
    band of rows (``spmd_diff.parallel.decoder_group``), whichever of them received its latents; that one writes
    it. Off: each decoder decodes its own items alone. Same videos (the one-rank decode within floating-point
    reassociation: at most one uint8 level)."""


@dataclass(frozen=True)
class DitConfig:
    sp_degree: int = 1
    """Ranks per DiT group (sequence-parallel degree)."""
    sp_layout: str = "auto"
    """"auto", "ulysses", "ring" or "torus"."""
    per_item_degree: bool = False
    """Give each item the SP degree that suits it: dit.sp_degree and its doublings up to the ranks of one node
    (those that split the heads evenly), picked per item by ``plan.degree.pick_degree`` from the cost model and
    the DiT ranks free when the item starts, its group formed then by the group-free collectives (no
    communicators). Needs roles.policy = "static" with roles.encoders = roles.decoders = 0 (every rank encodes,
    denoises and decodes; a group's leader encodes and decodes its item). Same videos as any fixed degree. With
    compiled blocks (dit.compile, speed.fast_compile_dit; GPU) each rank compiles its blocks once, before its first
    item, and every item runs on them, degree 1 included: one compilation per distinct local token count this
    rank meets (its items' shapes x degrees, known from the schedule up front; at most 32, else the job is
    refused), paid by the first item of each, never again for later items or group changes."""
    collective_mib: int = 64
    """Heap MiB for the group collectives of sequence-parallel DiT groups and of decoder groups
    (roles.group_decode) (chunk buffers; larger = fewer rounds)."""
    cfg_parallel: bool | str = "auto"
    """DiT groups of an even number of ranks, with classifier-free guidance (video.guidance_scale > 1): run the
    conditional branch on one half of the group and the unconditional one on the other (each half sequence-
    parallel over its ranks), swapping noise predictions once per step. true / false / "auto" (the planner: on
    whenever the group is even and guidance is on). Same videos within floating-point reassociation."""
    group_decode: bool | str = "auto"
    """DiT groups (dit.sp_degree > 1) that decode their own items (no decoder ranks): every rank of the group
    decodes a band of rows of each video, right after denoising it, and the leader writes it (instead of the
    leader decoding alone). true / false / "auto" (on wherever it applies). Same videos (halos exchanged per
    layer; the one-rank decode within floating-point reassociation)."""
    compile: bool = False
    """GPU DiT groups (dit.sp_degree > 1; no effect on single-rank DiT, except with dit.per_item_degree, where
    every item runs compiled): compile each transformer block with torch.compile (fuses the blocks' elementwise
    passes; the first step of each video shape pays the compilation). Changes bf16 rounding: videos differ from
    uncompiled ones by about 1.5 uint8 levels on average."""


TIERS = ("exact", "fast")
ATTENTION_BACKENDS = ("native", "_native_cudnn", "_native_flash", "_native_efficient")


@dataclass(frozen=True)
class SpeedConfig:
    """How much speed may change the video. ``exact`` only removes waste; ``fast`` also changes kernels.

    The ``fast_*`` options are what ``tier = "fast"`` turns on (each can be switched off to measure or avoid it);
    under ``tier = "exact"`` they are ignored. Their measured deviations are in perf/results/throughput-*.md.
    """

    tier: str = "exact"
    """"exact" (default): videos bit-identical to diffusers' WanPipeline on the same device; only waste is removed
    (uint8 conversion on the device, background writes, cached negative-prompt embeddings, tensors kept on the
    device, decode overlapping the next denoise). "fast": also the fast_* options below (a measured deviation)."""
    fast_vae_bf16: bool = True
    """fast tier: decode with the VAE in bfloat16 instead of float32 (H200, random Wan2.1-1.3B 480p x 81: decode
    ~0.85 s faster; mean 0.80, max 6 uint8 levels from exact on a no-CFG video)."""
    fast_compile_dit: bool = True
    """fast tier: torch.compile each transformer block at every SP degree, S=1 included (the warm-up pays the
    compilation, ~10 s with a warm Inductor cache; mean 0.25, max 2 levels; with the bf16 VAE the whole fast tier
    is mean 0.84 / max 7 levels without CFG, 1.67 / 14 with CFG 5.0). GPU only: ignored on CPU."""
    fast_attention: str = "_native_cudnn"
    """fast tier: diffusers attention backend of the transformer on GPUs ("native" = PyTorch's default choice,
    "_native_cudnn", "_native_flash", "_native_efficient"); ignored on CPU and in SP groups (their own attention).
    With torch 2.11 on the H200 "_native_cudnn" gave videos bit-identical to "native" (PyTorch picks cuDNN there)."""
    overlap_decode: bool = True
    """Both tiers, one rank that denoises and decodes: decode (and write) item k on a second thread and CUDA
    stream while item k+1 is encoded and denoised (the same kernels on the same inputs: bit-identical)."""
    write_queue: int = 2
    """Both tiers: finished videos waiting for the background writer (host memory: one video each); the GPU
    never waits for the disk unless this many are queued. 0 = write in the rank's own thread."""
    warmup: bool = True
    """Before the first item, run one denoise step and one decode on throwaway inputs, so that compilation and
    library start-up are not charged to the first item (and event timings are steady from item one)."""

    def resolved(self) -> dict[str, Any]:
        """The options in force (those that change the video): what job.json and each video's attributes record."""
        if self.tier == "exact":
            return {"tier": "exact"}
        return {"tier": "fast", "vae_dtype": "bfloat16" if self.fast_vae_bf16 else "float32",
                "compile_dit": self.fast_compile_dit, "attention": self.fast_attention}


OUTPUT_VIDEOS = ("raw", "h264", "hevc")
OUTPUT_COMPRESSIONS = ("none", "gzip", "lzf", "zstd")


@dataclass(frozen=True)
class OutputConfig:
    """How each video is stored in its item file: raw uint8 frames (optionally with a lossless HDF5 filter) or an
    mp4 encoded in-process (spmd_diff/io/codec.py). Part of every video's identity and attributes (see
    ``attrs``): the stored bytes, and for h264/hevc the pixels read back, depend on it."""

    video: str = "raw"
    """"raw" (uint8 [F, H, W, 3]), "h264" (libx264) or "hevc" (libx265): an mp4, yuv420p, in the item file."""
    quality: int = DEFAULT_QUALITY
    """h264/hevc: constant rate factor, 0-51, lower = better and bigger. 17 keeps a natural-looking clip above
    40 dB PSNR at ~1/150 of raw (perf/results/encode-2026-12-03.md)."""
    preset: str = DEFAULT_PRESET
    """h264/hevc: x264/x265 preset ("ultrafast" ... "veryslow"): slower = smaller at the same quality."""
    fps: int = DEFAULT_FPS
    """h264/hevc: frames per second written into the mp4 (Wan2.1 renders 16). Raw videos carry none."""
    compression: str = "none"
    """raw: lossless HDF5 filter on each frame's chunk: "none", "gzip", "lzf" or "zstd" (hdf5plugin; readers
    need ``import hdf5plugin`` before h5py opens such a file). Frames read back bit-identical."""

    def attrs(self) -> dict[str, Any]:
        """What each video records of its output form (and what identifies it): only the settings that apply."""
        if self.video == "raw":
            return {"codec": "raw", "compression": self.compression}
        return {"codec": self.video, "quality": self.quality, "preset": self.preset, "fps": self.fps}

    def validate(self, source: str) -> None:
        """UserError naming the setting and its choices; checks the installed FFmpeg (PyAV) has the encoder and
        that hdf5plugin is there for zstd."""
        from spmd_diff.io import codec

        if self.video not in OUTPUT_VIDEOS:
            raise UserError(f"{source}: output.video must be one of {', '.join(OUTPUT_VIDEOS)}, got {self.video!r}")
        if self.compression not in OUTPUT_COMPRESSIONS:
            raise UserError(f"{source}: output.compression must be one of {', '.join(OUTPUT_COMPRESSIONS)}, "
                            f"got {self.compression!r}")
        if self.video != "raw" and self.compression != "none":
            raise UserError(f"{source}: output.compression applies to output.video = \"raw\" only (an mp4 is "
                            f"already compressed); got compression {self.compression!r} with video {self.video!r}")
        if not 0 <= self.quality <= codec.MAX_QUALITY:
            raise UserError(f"{source}: output.quality (constant rate factor) must be in 0..{codec.MAX_QUALITY}, "
                            f"got {self.quality}")
        if self.preset not in codec.PRESETS:
            raise UserError(f"{source}: output.preset must be one of {', '.join(codec.PRESETS)}, "
                            f"got {self.preset!r}")
        if not 1 <= self.fps <= 240:
            raise UserError(f"{source}: output.fps must be in 1..240, got {self.fps}")
        if self.video != "raw":
            missing = codec.missing_codecs(codec.CODECS)
            if self.video in missing:
                usable = ["raw"] + [name for name in codec.CODECS if name not in missing]
                raise UserError(f"{source}: output.video = {self.video!r}: {missing[self.video]}; available here: "
                                f"{', '.join(usable)}")
        if self.compression == "zstd":
            try:
                import hdf5plugin  # noqa: F401
            except ImportError:
                raise UserError(f"{source}: output.compression = \"zstd\" needs hdf5plugin (pip install "
                                "hdf5plugin); available here: none, gzip, lzf") from None


@dataclass(frozen=True)
class WorldConfig:
    ranks_per_node: int = 0
    """Override the detected ranks per node (0 = detect). Lets one machine stand in for several nodes."""
    transport: str = "auto"
    """"auto", "mpi" (MPI RMA on host memory) or "nvshmem"."""
    gpu_memory_gib: float = 0.0
    """GiB of each GPU the role planner may use (0 = the GPU's own memory): no rank is planned with stages that
    need more, and once its weights are loaded each GPU rank's allocator is capped at it
    (``torch.cuda.set_per_process_memory_fraction``). Emulates smaller GPUs (e.g. 40 for an A100-40GB) on larger
    ones."""
    force_cpu: bool = False
    """Run every rank on the CPU even where GPUs are visible (float32 by model.dtype "auto", heaps in host
    memory). Environment override: ``SPMD_DIFF_FORCE_CPU=1``."""


P2P_KERNELS = ("cuda", "triton", "off")


@dataclass(frozen=True)
class DataplaneConfig:
    """How bytes move between GPUs: switches that change speed, never a video. Each has a documented environment
    override, read by the CLI only (``spmd_diff.cli.ENV_OVERRIDES``); ``--set`` wins over it."""

    p2p_kernel: str = "cuda"
    """The one-kernel all-to-all of DiT groups among GPUs that map each other's heaps: "cuda" (CUDA C through
    CuPy, Triton where CuPy is missing), "triton", or "off" (host-driven: copy engines and NVSHMEM stream
    operations). The CUDA put kernel (``put_kernel``) runs only with "cuda". Override: ``SPMD_DIFF_P2P_KERNEL``."""
    put_kernel: bool = True
    """NVSHMEM channels and collectives: put-with-signal to a P2P peer as one CUDA kernel (needs CuPy); false: a
    copy, then a signal operation. Override: ``SPMD_DIFF_PUT_KERNEL=0|1``."""
    a2a_blocks: str = ""
    """"S,R": thread blocks per peer (senders, receivers) of every CUDA all-to-all launch; "" chooses them by
    message size. Override: ``SPMD_DIFF_A2A_BLOCKS``."""

    def a2a_block_counts(self) -> tuple[int, int] | None:
        """``a2a_blocks`` as ``(send_blocks, recv_blocks)``, or None for "chosen by size"."""
        if not self.a2a_blocks.strip():
            return None
        try:
            send, recv = (int(v) for v in self.a2a_blocks.split(","))
        except ValueError:
            send = recv = 0
        if send < 1 or recv < 1:
            raise UserError(f"dataplane.a2a_blocks must be two positive block counts \"S,R\" (e.g. \"64,16\") or "
                            f"\"\", got {self.a2a_blocks!r}")
        return send, recv


@dataclass(frozen=True)
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    run: RunConfig = field(default_factory=RunConfig)
    roles: RolesConfig = field(default_factory=RolesConfig)
    dit: DitConfig = field(default_factory=DitConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    dataplane: DataplaneConfig = field(default_factory=DataplaneConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


_SECTION_TYPES = {
    "model": ModelConfig,
    "video": VideoConfig,
    "run": RunConfig,
    "roles": RolesConfig,
    "dit": DitConfig,
    "world": WorldConfig,
    "speed": SpeedConfig,
    "output": OutputConfig,
    "dataplane": DataplaneConfig,
}


def _coerce(where: str, value: Any, annotation: str) -> Any:
    """Check a TOML value against a field's annotation ("int", "float", "str", "bool")."""
    kind = annotation
    if kind == "bool":
        if isinstance(value, bool):
            return value
    elif kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind == "str":
        if isinstance(value, str):
            return value
    elif kind == "bool | str":  # true, false or "auto"
        if isinstance(value, bool) or value == "auto":
            return value
        kind = 'true, false or "auto"'
    else:  # pragma: no cover - a field type this loader does not know is a bug
        raise AssertionError(f"unsupported config field type {annotation!r}")
    raise UserError(f"{where} must be {kind}, got {type(value).__name__} {value!r}")


def _parse_override(item: str) -> tuple[str, str, Any]:
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected section.key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise UserError(f"--set {item!r}: the key must be section.key, e.g. video.height=480")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word is a string: --set model.path=/models/wan
    return parts[0], parts[1], value


def build_job(data: dict[str, Any], source: str, overrides: list[str] = ()) -> JobConfig:
    """Typed job from parsed TOML plus ``section.key=value`` overrides. Unknown keys name the nearest known one."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for item in overrides:
        section, key, value = _parse_override(item)
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            raise UserError(f"{source}: [{section}] must be a table")
        data[section][key] = value
    sections: dict[str, Any] = {}
    for name, table in data.items():
        if name not in _SECTION_TYPES:
            raise UserError(f"{source}: unknown section [{name}]{did_you_mean(name, list(_SECTION_TYPES))}")
        if not isinstance(table, dict):
            raise UserError(f"{source}: {name} must be a table [{name}], got {type(table).__name__}")
        cls = _SECTION_TYPES[name]
        known = {f.name: f for f in fields(cls)}
        values = {}
        for key, value in table.items():
            if key not in known:
                raise UserError(f"{source}: unknown key {name}.{key}{did_you_mean(key, list(known))}")
            values[key] = _coerce(f"{source}: {name}.{key}", value, str(known[key].type))
        sections[name] = cls(**values)
    job = JobConfig(**sections)
    validate_job(job, source)
    return job


def validate_job(job: JobConfig, source: str) -> None:
    """Checks that need no model and no world: sizes, counts, names."""
    for name in (*PER_ITEM_VIDEO_KEYS, "max_sequence_length"):
        problem = video_value_problem(name, getattr(job.video, name))
        if problem:
            raise UserError(f"{source}: video.{name} {problem}")
    if job.run.ring_slots < 1:
        raise UserError(f"{source}: run.ring_slots must be >= 1, got {job.run.ring_slots}")
    if job.run.timeout_s < 0:
        raise UserError(f"{source}: run.timeout_s must be >= 0 (0 = automatic), got {job.run.timeout_s}")
    if job.roles.encoders < 0 or job.roles.decoders < 0:
        raise UserError(f"{source}: roles.encoders and roles.decoders must be >= 0")
    if job.roles.batch_s <= 0:
        raise UserError(f"{source}: roles.batch_s must be > 0, got {job.roles.batch_s}")
    if job.roles.time_share not in (True, False, "auto"):
        raise UserError(f'{source}: roles.time_share must be true, false or "auto", got {job.roles.time_share!r}')
    if job.roles.stage_batch < 1:
        raise UserError(f"{source}: roles.stage_batch must be >= 1, got {job.roles.stage_batch}")
    if job.roles.policy not in ("auto", "static"):
        raise UserError(f"{source}: roles.policy must be auto or static, got {job.roles.policy!r}")
    if job.roles.policy == "static" and job.roles.time_share is True:
        clashes = [f"roles.{name} = {getattr(job.roles, name)}" for name in ("encoders", "decoders")
                   if getattr(job.roles, name)]
        clashes += [f"dit.sp_degree = {job.dit.sp_degree}"] if job.dit.sp_degree > 1 else []
        clashes += ["dit.per_item_degree = true"] if job.dit.per_item_degree else []
        clashes += ["roles.group_decode = true"] if job.roles.group_decode else []
        if clashes:
            raise UserError(f'{source}: roles.time_share = true with roles.policy = "static" makes every rank hold '
                            "every stage alone (roles.encoders = 0, roles.decoders = 0, dit.sp_degree = 1, no "
                            f"per-item degree, no group decode); the job sets {', '.join(clashes)}")
    if job.roles.group_decode and (job.roles.policy != "static" or job.roles.decoders < 2):
        raise UserError(f'{source}: roles.group_decode = true needs roles.policy = "static" and roles.decoders >= 2 '
                        f"(a group of decoder ranks), got policy {job.roles.policy!r} and {job.roles.decoders} "
                        "decoder(s)")
    if job.world.gpu_memory_gib < 0:
        raise UserError(f"{source}: world.gpu_memory_gib must be >= 0 (0 = the GPU's own memory), "
                        f"got {job.world.gpu_memory_gib}")
    if job.dit.collective_mib < 1:
        raise UserError(f"{source}: dit.collective_mib must be >= 1, got {job.dit.collective_mib}")
    if job.dit.sp_degree < 1:
        raise UserError(f"{source}: dit.sp_degree must be >= 1, got {job.dit.sp_degree}")
    layouts = ("auto", "ulysses", "ring", "torus")
    if job.dit.sp_layout not in layouts:
        raise UserError(f"{source}: dit.sp_layout must be one of {', '.join(layouts)}, got {job.dit.sp_layout!r}")
    for name in ("cfg_parallel", "group_decode"):
        if getattr(job.dit, name) not in (True, False, "auto"):
            raise UserError(f'{source}: dit.{name} must be true, false or "auto", got {getattr(job.dit, name)!r}')
    if job.dit.cfg_parallel is True and job.roles.policy == "static" and job.dit.sp_degree % 2:
        raise UserError(f"{source}: dit.cfg_parallel=true needs an even dit.sp_degree (two halves), got "
                        f"{job.dit.sp_degree}")
    if job.dit.per_item_degree and (job.roles.policy != "static" or job.roles.encoders or job.roles.decoders):
        raise UserError(f'{source}: dit.per_item_degree = true needs roles.policy = "static" with roles.encoders = 0 '
                        f"and roles.decoders = 0 (every rank holds every stage), got policy {job.roles.policy!r}, "
                        f"{job.roles.encoders} encoder(s), {job.roles.decoders} decoder(s)")
    if job.world.transport not in ("auto", "mpi", "nvshmem"):
        raise UserError(f"{source}: world.transport must be auto, mpi or nvshmem, got {job.world.transport!r}")
    if job.dataplane.p2p_kernel not in P2P_KERNELS:
        raise UserError(f"{source}: dataplane.p2p_kernel must be one of {', '.join(P2P_KERNELS)}, got "
                        f"{job.dataplane.p2p_kernel!r}")
    try:
        job.dataplane.a2a_block_counts()
    except UserError as error:
        raise UserError(f"{source}: {error}") from None
    dtypes = ("auto", "float32", "bfloat16", "float16")
    if job.model.dtype not in dtypes:
        raise UserError(f"{source}: model.dtype must be one of {', '.join(dtypes)}, got {job.model.dtype!r}")
    if job.speed.tier not in TIERS:
        raise UserError(f"{source}: speed.tier must be one of {', '.join(TIERS)}, got {job.speed.tier!r}")
    if job.speed.fast_attention not in ATTENTION_BACKENDS:
        raise UserError(f"{source}: speed.fast_attention must be one of {', '.join(ATTENTION_BACKENDS)}, "
                        f"got {job.speed.fast_attention!r}")
    if job.speed.write_queue < 0:
        raise UserError(f"{source}: speed.write_queue must be >= 0, got {job.speed.write_queue}")
    if not job.model.path:
        raise UserError(f"{source}: model.path is empty")
    job.output.validate(source)


def load_job(path: str | Path, overrides: list[str] = ()) -> JobConfig:
    """Read JOB.toml; errors name the file (and the line, for TOML syntax errors)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"job file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read job file {path}: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML: {exc}") from None
    return build_job(data, str(path), overrides)
