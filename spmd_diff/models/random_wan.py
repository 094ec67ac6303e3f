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

Image-to-video (Wan-AI/Wan2.1-I2V-14B-480P-Diffusers and -720P-Diffusers): the 14B DiT with ``in_channels`` 36
(16 noise + 4 mask + 16 condition), ``image_dim`` 1280 and ``added_kv_proj_dim`` 5120; the CLIP ViT-H/14 vision
model (hidden 1280, 32 layers, 16 heads, MLP 5120, 224 px, patch 14: 257 tokens) and its image processor
(bicubic resize to 224, centre crop, CLIP mean/std); scheduler flow_shift 3.0 (480P) or 5.0 (720P).

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
from spmd_diff.models.shapes import I2V_PIPELINE_CLASS, model_index
from spmd_diff.models.wan import WanStages
from spmd_diff.models.wan_i2v import WanI2VStages

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

_I2V_DIT = dict(_DIT_COMMON, in_channels=36, image_dim=1280, added_kv_proj_dim=5120)
CLIP_VIT_H_14 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                     image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu", layer_norm_eps=1e-5)

ARCHITECTURES: dict[str, dict[str, Any]] = {
    "wan2.1-t2v-1.3b": dict(
        transformer=dict(_DIT_COMMON, num_attention_heads=12, ffn_dim=8960, num_layers=30),
        text_encoder=UMT5_XXL, vae={}),
    "wan2.1-t2v-14b": dict(
        transformer=dict(_DIT_COMMON, num_attention_heads=40, ffn_dim=13824, num_layers=40),
        text_encoder=UMT5_XXL, vae={}),
    "wan2.1-i2v-14b-480p": dict(
        transformer=dict(_I2V_DIT, num_attention_heads=40, ffn_dim=13824, num_layers=40),
        text_encoder=UMT5_XXL, vae={}, image_encoder=CLIP_VIT_H_14, flow_shift=3.0),
    "wan2.1-i2v-14b-720p": dict(
        transformer=dict(_I2V_DIT, num_attention_heads=40, ffn_dim=13824, num_layers=40),
        text_encoder=UMT5_XXL, vae={}, image_encoder=CLIP_VIT_H_14, flow_shift=5.0),
    "wan2.1-i2v-tiny": dict(  # the I2V demo model's sizes, for CPU tests of this module
        transformer=dict(_I2V_DIT, attention_head_dim=12, num_attention_heads=2, ffn_dim=32, num_layers=2,
                         text_dim=32, image_dim=16, added_kv_proj_dim=24),
        text_encoder=dict(UMT5_XXL, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2,
                          dropout_rate=0.0),
        vae=dict(base_dim=3, dim_mult=[1, 1, 1, 1], num_res_blocks=1),
        image_encoder=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, projection_dim=16)),
    "wan2.1-t2v-tiny": dict(  # the demo model's sizes, for CPU tests of this module
        transformer=dict(_DIT_COMMON, attention_head_dim=12, num_attention_heads=2, ffn_dim=32, num_layers=2,
                         text_dim=32),
        text_encoder=dict(UMT5_XXL, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2,
                          dropout_rate=0.0),
        vae=dict(base_dim=3, dim_mult=[1, 1, 1, 1], num_res_blocks=1)),
}
"""Per name: keyword overrides of each component's config (the VAE's are over the AutoencoderKLWan defaults); an
``image_encoder`` (CLIPVisionConfig) makes it image-to-video; ``flow_shift`` overrides the scheduler's."""

SEED_OFFSETS = {"text_encoder": 1, "transformer": 2, "transformer_2": 3, "vae": 4, "image_encoder": 5}
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
    i2v = "image_encoder" in arch
    index = {"_class_name": "WanImageToVideoPipeline" if i2v else "WanPipeline",
             "_diffusers_version": diffusers.__version__, "boundary_ratio": None,
             "expand_timesteps": False, "transformer_2": [None, None]}
    index.update({component: list(cls) for component, cls in _CLASSES.items()})
    if i2v:
        from transformers import CLIPVisionConfig

        from spmd_diff.models.demo import IMAGE_PROCESSOR_CONFIG

        index.update(image_encoder=["transformers", "CLIPVisionModel"],
                     image_processor=["transformers", "CLIPImageProcessor"])
        CLIPVisionConfig(architectures=["CLIPVisionModel"], **arch["image_encoder"]).save_pretrained(
            root / "image_encoder")
        side = arch["image_encoder"]["image_size"]
        processor = dict(IMAGE_PROCESSOR_CONFIG, size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                         image_processor_type="CLIPImageProcessor")
        (root / "image_processor").mkdir()
        (root / "image_processor" / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    (root / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    for component in ("transformer", "vae"):
        (root / component).mkdir()
        config = {"_class_name": _CLASSES[component][1], "_diffusers_version": diffusers.__version__,
                  **arch[component]}
        (root / component / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    UMT5Config(architectures=["UMT5EncoderModel"], **arch["text_encoder"]).save_pretrained(root / "text_encoder")
    UniPCMultistepScheduler(**dict(SCHEDULER_CONFIG, flow_shift=arch.get("flow_shift", SCHEDULER_CONFIG["flow_shift"]))
                            ).save_config(root / "scheduler")
    shutil.copytree(demo / "tokenizer", root / "tokenizer")
    marker = {"name": f"spmd_diff-random-{name}", "version": VERSION, "weights": "random, built on the device"}
    (root / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")


def build_random_module(component: str, model_dir: str | os.PathLike, device: str | torch.device,
                        dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """Construct ``component`` of a random model directory on ``device`` with seeded random weights.

    Args:
        component: "text_encoder", "image_encoder", "transformer" or "vae".
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
        elif component == "image_encoder":
            from transformers import CLIPVisionConfig, CLIPVisionModel

            module = CLIPVisionModel(CLIPVisionConfig.from_pretrained(path))
            keep = ()
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
        device, dtype, options, time_shared: as ``WanStages`` (the VAE in ``options.vae_dtype``, as there;
            time-shared, each component is built on ``device``, so its weights are those of any other rank, then
            taken to host memory before the next is built).
        seed: weight seed; every rank that builds a component with the same seed gets the same weights.
    """

    def __init__(self, model_dir: str | pathlib.Path, stages: Iterable[str], *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, seed: int = 0, options: StageOptions = EXACT,
                 time_shared: bool = False) -> None:
        if not is_random_model_dir(model_dir):
            raise UserError(f"{model_dir} is not a random-weights model directory (no {MARKER_FILE})")
        self.weight_seed = seed
        super().__init__(model_dir, stages, device=device, dtype=dtype, options=options, time_shared=time_shared)

    def _load(self, name: str, dtype: torch.dtype | None = None) -> Any:
        if name in SEED_OFFSETS:
            return build_random_module(name, self.model_dir, self.device, dtype or torch.float32, self.weight_seed)
        return super()._load(name, dtype)


class RandomWanI2VStages(RandomWanStages, WanI2VStages):
    """``WanI2VStages`` over a random image-to-video model directory (the image encoder built on ``device`` too)."""


def make_stages(model_dir: str | pathlib.Path, stages: Iterable[str], *, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, options: StageOptions = EXACT,
                time_shared: bool = False) -> WanStages:
    """The stages class for ``model_dir`` (what the engine calls): image-to-video (``WanI2VStages``) or
    text-to-video (``WanStages``) as its ``model_index.json`` says, with random weights for a random model
    directory. ``time_shared``: components in host memory, one stage's on ``device`` at a time
    (:meth:`WanStages.use`)."""
    i2v = model_index(model_dir)[1].get("_class_name") == I2V_PIPELINE_CLASS
    if is_random_model_dir(model_dir):
        cls: type[WanStages] = RandomWanI2VStages if i2v else RandomWanStages
    else:
        cls = WanI2VStages if i2v else WanStages
    return cls(model_dir, stages, device=device, dtype=dtype, options=options, time_shared=time_shared)
