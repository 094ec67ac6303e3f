"""``model.path = "random:<name>"``: the real Wan2.1 architectures with random weights built on the device.

For benchmarks where weights cannot be downloaded. ``random_model_dir`` writes a *config-only* diffusers directory
(``model_index.json``, the published component configs, the demo model's tokenizer, no weights; a few KB) so that
``read_shapes`` and every shape computation work unchanged; ``RandomWanStages`` is ``WanStages`` whose neural
components are constructed from those configs directly on ``device`` (``with torch.device(device)``: no host
copy, no disk), initialised by their own ``reset_parameters`` / ``_init_weights`` after ``torch.manual_seed``,
then cast like ``from_pretrained(torch_dtype=...)`` does (diffusers' ``_keep_in_fp32_modules`` stay float32).
Same seed and same GPU model give the same weights on every rank.

Published values (Wan-AI/Wan2.1-T2V-1.3B-Diffusers and -14B-Diffusers, ``config.json`` of each component):

| | 1.3B | 14B |
|---|---|---|
| DiT dim (heads x head dim) | 1536 (12 x 128) | 5120 (40 x 128) |
| DiT ffn_dim / layers | 8960 / 30 | 13824 / 40 |
| both | text_dim 4096, freq_dim 256, patch (1, 2, 2), in/out 16 channels, qk_norm rms_norm_across_heads, cross_attn_norm, eps 1e-6, rope_max_seq_len 1024 | |

UMT5-XXL encoder: d_model 4096, 24 layers, 64 heads (d_kv 64), d_ff 10240, gated-gelu, vocab 256384. VAE: the
``AutoencoderKLWan`` defaults (base_dim 96, dim_mult 1/2/4/4, 2 res blocks, z_dim 16, Wan2.1 latents mean/std).
Tokenizer: the demo model's (about 300 pieces): its token ids are valid rows of the 256384-row embedding, and
prompt text only selects rows of random weights, so the real 256k SentencePiece model would change nothing here.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Iterable

import torch

from spmd_diff.errors import UserError
from spmd_diff.models.speed import EXACT, StageOptions
from spmd_diff.models.wan import WanStages

PREFIX = "random:"
MARKER_FILE = "spmd_diff_random.json"
VERSION = 1

_DIT_COMMON = dict(patch_size=[1, 2, 2], attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
                   freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                   image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024)
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_decoder_layers=24,
                num_heads=64, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                dropout_rate=0.1, layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new",
                is_gated_act=True, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
                decoder_start_token_id=0, initializer_factor=1.0)

ARCHITECTURES: dict[str, dict[str, Any]] = {
    "wan2.1-t2v-1.3b": dict(
        transformer=dict(_DIT_COMMON, num_attention_heads=12, ffn_dim=8960, num_layers=30),
        text_encoder=UMT5_XXL, vae={}),
    "wan2.1-t2v-14b": dict(
        transformer=dict(_DIT_COMMON, num_attention_heads=40, ffn_dim=13824, num_layers=40),
        text_encoder=UMT5_XXL, vae={}),
    "wan2.1-t2v-tiny": dict(  # the demo model's sizes, for CPU tests of this module
        transformer=dict(_DIT_COMMON, attention_head_dim=12, num_attention_heads=2, ffn_dim=32, num_layers=2,
                         text_dim=32),
        text_encoder=dict(UMT5_XXL, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2,
                          dropout_rate=0.0),
        vae=dict(base_dim=3, dim_mult=[1, 1, 1, 1], num_res_blocks=1)),
}
"""Per name: keyword overrides of each component's config (the VAE's are over the AutoencoderKLWan defaults)."""

SEED_OFFSETS = {"text_encoder": 1, "transformer": 2, "transformer_2": 3, "vae": 4}
"""Each component is built right after ``torch.manual_seed(seed + offset)``."""

_CLASSES = {"text_encoder": ("transformers", "UMT5EncoderModel"), "tokenizer": ("transformers", "T5Tokenizer"),
            "transformer": ("diffusers", "WanTransformer3DModel"), "vae": ("diffusers", "AutoencoderKLWan"),
            "scheduler": ("diffusers", "UniPCMultistepScheduler")}


def architecture_name(model_path: str) -> str:
    """``"random:wan2.1-t2v-1.3b"`` -> ``"wan2.1-t2v-1.3b"``; UserError for an unknown name."""
    name = model_path[len(PREFIX):] if model_path.startswith(PREFIX) else model_path
    if name not in ARCHITECTURES:
        known = ", ".join(PREFIX + n for n in ARCHITECTURES)
        raise UserError(f"model.path={model_path!r}: unknown random architecture (known: {known})")
    return name


def is_random_model_dir(model_dir: str | os.PathLike) -> bool:
    """True for a directory written by ``random_model_dir``."""
    return (pathlib.Path(model_dir) / MARKER_FILE).is_file()


def random_model_dir(model_path: str, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The config-only directory of ``model_path`` (``random:<name>``) under ``cache_dir``, written if missing.

    Atomic (built privately, renamed into place), so several processes may call it at once. Needs the demo model
    (built in the same cache if missing) for its tokenizer.
    """
    from spmd_diff.models.demo import default_cache_dir, demo_model_dir

    name = architecture_name(model_path)
    cache = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out_dir = cache / f"random-{name}-v{VERSION}"
    if is_random_model_dir(out_dir):
        return out_dir
    demo = demo_model_dir(cache)
    cache.mkdir(parents=True, exist_ok=True)
    tmp_dir = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=cache))
    try:
        _write_configs(tmp_dir, name, demo)
        try:
            os.rename(tmp_dir, out_dir)
        except OSError:
            if not is_random_model_dir(out_dir):
                raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir


def _write_configs(root: pathlib.Path, name: str, demo: pathlib.Path) -> None:
    import diffusers
    from diffusers import UniPCMultistepScheduler
    from transformers import UMT5Config

    from spmd_diff.models.demo import SCHEDULER_CONFIG

    arch = ARCHITECTURES[name]
    index = {"_class_name": "WanPipeline", "_diffusers_version": diffusers.__version__, "boundary_ratio": None,
             "expand_timesteps": False, "transformer_2": [None, None]}
    index.update({component: list(cls) for component, cls in _CLASSES.items()})
    (root / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    for component in ("transformer", "vae"):
        (root / component).mkdir()
        config = {"_class_name": _CLASSES[component][1], "_diffusers_version": diffusers.__version__,
                  **arch[component]}
        (root / component / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    UMT5Config(architectures=["UMT5EncoderModel"], **arch["text_encoder"]).save_pretrained(root / "text_encoder")
    UniPCMultistepScheduler(**SCHEDULER_CONFIG).save_config(root / "scheduler")
    shutil.copytree(demo / "tokenizer", root / "tokenizer")
    marker = {"name": f"spmd_diff-random-{name}", "version": VERSION, "weights": "random, built on the device"}
    (root / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")


def build_random_module(component: str, model_dir: str | os.PathLike, device: str | torch.device,
                        dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """Construct ``component`` of a random model directory on ``device`` with seeded random weights.

    Args:
        component: "text_encoder", "transformer" or "vae".
        model_dir: a ``random_model_dir``.
        device: where the parameters are allocated and initialised (no host copy for a CUDA device).
        dtype: the dtype ``from_pretrained(torch_dtype=dtype)`` would give (diffusers' fp32-kept modules stay fp32).
        seed: base seed; the component uses ``seed + SEED_OFFSETS[component]``.

    Returns:
        the module in eval mode without gradients.
    """
    path = pathlib.Path(model_dir) / component
    torch.manual_seed(seed + SEED_OFFSETS[component])
    with torch.device(device):
        if component == "text_encoder":
            from transformers import UMT5Config, UMT5EncoderModel

            module = UMT5EncoderModel(UMT5Config.from_pretrained(path))
            keep: Iterable[str] = ("wo",) if dtype == torch.float16 else ()
        else:
            import diffusers

            cls = getattr(diffusers, _CLASSES["vae" if component == "vae" else "transformer"][1])
            module = cls.from_config(cls.load_config(path))
            keep = cls._keep_in_fp32_modules or ()
    if dtype != torch.float32:
        cast_like_from_pretrained(module, dtype, keep)
    return module.eval().requires_grad_(False)


def cast_like_from_pretrained(module: torch.nn.Module, dtype: torch.dtype, keep_in_fp32: Iterable[str]) -> None:
    """Cast floating parameters and buffers to ``dtype`` in place, except those under a module whose name is in
    ``keep_in_fp32`` (the rule of diffusers' ``load_model_dict_into_meta``: a dotted name part matches)."""
    keep = set(keep_in_fp32)
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.is_floating_point() and not keep.intersection(name.split(".")):
            tensor.data = tensor.data.to(dtype)


class RandomWanStages(WanStages):
    """``WanStages`` over a ``random_model_dir``: neural components built on ``device`` with random weights.

    Args:
        model_dir: a directory from ``random_model_dir``.
        stages: as ``WanStages``.
        device, dtype, options: as ``WanStages`` (the VAE in ``options.vae_dtype``, as there).
        seed: weight seed; every rank that builds a component with the same seed gets the same weights.
    """

    def __init__(self, model_dir: str | pathlib.Path, stages: Iterable[str], *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, seed: int = 0, options: StageOptions = EXACT) -> None:
        if not is_random_model_dir(model_dir):
            raise UserError(f"{model_dir} is not a random-weights model directory (no {MARKER_FILE})")
        self.weight_seed = seed
        super().__init__(model_dir, stages, device=device, dtype=dtype, options=options)

    def _load(self, name: str, dtype: torch.dtype | None = None) -> Any:
        if name in SEED_OFFSETS:
            return build_random_module(name, self.model_dir, self.device, dtype or torch.float32, self.weight_seed)
        return super()._load(name, dtype)


def make_stages(model_dir: str | pathlib.Path, stages: Iterable[str], *, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, options: StageOptions = EXACT) -> WanStages:
    """``RandomWanStages`` for a random model directory, else ``WanStages`` (what the engine calls)."""
    cls = RandomWanStages if is_random_model_dir(model_dir) else WanStages
    return cls(model_dir, stages, device=device, dtype=dtype, options=options)
