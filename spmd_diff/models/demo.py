"""The built-in demo models: tiny Wan2.1-architecture text-to-video and image-to-video pipelines in diffusers format.

Random weights from fixed seeds and a tokenizer trained offline on a built-in corpus, so it needs no download and
renders a 64x64, 9-frame, 4-step CFG video in well under a second on one CPU core. Every component has the real
Wan2.1 T2V classes and layout (``model_index.json``, ``tokenizer/``, ``text_encoder/``, ``transformer/``, ``vae/``,
``scheduler/``), so ``diffusers.WanPipeline.from_pretrained(dir)`` loads it and the engine runs it through exactly
the code paths it uses for Wan2.1-T2V-1.3B/14B. The videos are noise-like patterns, not pictures.

The image-to-video demo (``task="i2v"``, ``model.path = "demo-i2v"``) adds a small CLIP vision model and image
processor (made offline, no download) and a transformer taking 36 input channels and image embeddings, as
Wan2.1-I2V-14B; ``diffusers.WanImageToVideoPipeline.from_pretrained(dir)`` loads it.

Building is deterministic: two builds give byte-identical safetensors and tokenizer files. Directories are written
atomically (a temp dir next to the target, then ``os.rename``), so several processes may build at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import shutil
import tempfile

from spmd_diff.errors import UserError

logger = logging.getLogger(__name__)

DEMO_VERSION = 1
"""Bump whenever the demo model's contents change (constants or code); part of the cache directory name."""

MARKER_FILE = "spmd_diff_demo.json"
"""Written last into a complete demo model: ``{"name": "spmd_diff-demo", "version": ..., "recipe": ...}``."""

CACHE_ENV = "SPMD_DIFF_CACHE"
"""Environment variable naming the cache root (default ``~/.cache/spmd_diff``)."""

TOKENIZER_VOCAB_SIZE = 400
"""Vocabulary size asked of the Unigram trainer (the corpus may give a little less)."""

TEXT_ENCODER_CONFIG = dict(
    d_model=32,
    d_kv=16,
    d_ff=64,
    num_layers=2,
    num_heads=2,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    dropout_rate=0.0,
    feed_forward_proj="gated-gelu",
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)
"""UMT5 encoder config (``vocab_size`` is filled in from the trained tokenizer). Wan2.1 uses umt5-xxl: d_model 4096."""

TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=16,
    out_channels=16,
    text_dim=32,
    freq_dim=256,
    ffn_dim=32,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=1024,
)
"""WanTransformer3DModel config: diffusers' own Wan test dummy, with Wan2.1's rope_max_seq_len so any size renders."""

VAE_CONFIG = dict(
    base_dim=3,
    z_dim=16,
    dim_mult=[1, 1, 1, 1],
    num_res_blocks=1,
    temperal_downsample=[False, True, True],
)
"""AutoencoderKLWan config: diffusers' own Wan test dummy (spatial factor 8, temporal factor 4, like Wan2.1)."""

SCHEDULER_CONFIG = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
"""UniPCMultistepScheduler settings Wan2.1 ships (flow_shift 3.0 is its 480p setting)."""

I2V_TRANSFORMER_CONFIG = dict(TRANSFORMER_CONFIG, in_channels=36, image_dim=16, added_kv_proj_dim=24)
"""The image-to-video transformer: 16 noise + 4 mask + 16 condition channels in, CLIP width ``image_dim``, image
keys/values projected from the model width (``added_kv_proj_dim`` = heads x head dim, as Wan2.1-I2V)."""

IMAGE_ENCODER_CONFIG = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                            image_size=32, patch_size=8, projection_dim=16)
"""CLIPVisionConfig: 17 tokens (4 x 4 patches + class) of width 16. Wan2.1 uses ViT-H/14: 257 tokens of 1280."""

IMAGE_PROCESSOR_CONFIG = dict(do_resize=True, size={"shortest_edge": 32}, resample=3, do_center_crop=True,
                              crop_size={"height": 32, "width": 32}, do_rescale=True, rescale_factor=1 / 255,
                              do_normalize=True, image_mean=[0.48145466, 0.4578275, 0.40821073],
                              image_std=[0.26862954, 0.26130258, 0.27577711], do_convert_rgb=True)
"""CLIPImageProcessor: Wan2.1-I2V's settings (bicubic resize, centre crop, CLIP mean/std) at 32 pixels."""

TASKS = ("t2v", "i2v")

SEEDS = {"text_encoder": 1, "transformer": 2, "vae": 3, "image_encoder": 4}
"""``torch.manual_seed`` value set right before each component is constructed."""

CROSS_ATTENTION_GAIN = 4.0
"""Scales the transformer's cross-attention logits (``attn2.norm_k``) and output (``attn2.to_out``) after init."""

CORPUS = (
    "A cat and a dog are baking a cake together in a bright kitchen.",
    "The cat carefully measures the flour while the dog stirs the batter with a wooden spoon.",
    "Sunlight streams through the window and warms the old wooden table.",
    "A red fox runs across a snowy field at dawn, leaving small tracks behind it.",
    "Waves crash against the rocks as seagulls circle above the grey ocean.",
    "A young woman rides a bicycle along a quiet street lined with tall trees.",
    "Rain falls softly on the roof of a small house in the mountains.",
    "A busy city street at night, full of cars, lights and people with umbrellas.",
    "An astronaut floats slowly inside a space station and looks out at the blue earth.",
    "A drone flies over green hills, a river and a village with white houses.",
    "Two children build a sand castle on the beach while the tide comes in.",
    "A chef slices fresh vegetables on a board and drops them into a hot pan.",
    "The camera pans slowly across a field of yellow flowers swaying in the wind.",
    "A steam train crosses a stone bridge high above a deep valley.",
    "Fish swim between bright corals in clear blue water.",
    "An old man plays the violin in a park as leaves fall from the trees.",
    "A horse gallops along the shore, its mane flying in the wind.",
    "Snow covers the quiet forest and a deer walks between the pine trees.",
    "A robot walks through a futuristic city with glass towers and flying cars.",
    "Close up of a cup of coffee, steam rising from the dark surface.",
    "A golden retriever catches a ball in the air and runs back happily.",
    "Lightning flashes over the desert and dark clouds roll across the sky.",
    "A group of friends laugh around a campfire under a sky full of stars.",
    "A small boat sails on a calm lake surrounded by mountains at sunset.",
    "A painter adds blue and orange colors to a large canvas in a studio.",
    "A butterfly lands on a purple flower and slowly opens its wings.",
    "Traffic moves through a busy intersection seen from above in time lapse.",
    "A girl reads a book by the window while rain runs down the glass.",
    "Bright tones, overexposed, static, blurred details, subtitles, worst quality, low quality.",
    "Ugly, incomplete, extra fingers, poorly drawn hands, deformed, still picture, messy background.",
    "A panda eats bamboo in a green forest and looks at the camera.",
    "The northern lights dance in green and purple over a frozen lake.",
    "A man in a black coat walks down a long empty corridor.",
    "Cherry blossoms fall on a path in a japanese garden in spring.",
    "A hot air balloon rises above the fields in the early morning light.",
    "Cinematic shot of a castle on a hill, clouds moving fast behind it.",
)
"""Fixed English corpus the demo tokenizer is trained on (about 550 words)."""


def _train_tokenizer_vocab() -> list[tuple[str, float]]:
    """Train a T5-style Unigram model on :data:`CORPUS`; return its (piece, log-prob) list with
    ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2 first, as T5/UMT5 vocabularies have them."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import Unigram
    from tokenizers.trainers import UnigramTrainer

    tokenizer = Tokenizer(Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    trainer = UnigramTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    trained = [(str(piece), float(score)) for piece, score in json.loads(tokenizer.to_str())["model"]["vocab"]]
    assert [piece for piece, _ in trained[:3]] == ["<pad>", "</s>", "<unk>"], trained[:3]
    # The trainer is not bit-reproducible (hash-map order: last-ulp score noise, and the scores it gives kept single
    # characters follow that order), but its piece set is. Round the scores and sort ties by piece: deterministic.
    pieces = sorted(((piece, round(score, 2)) for piece, score in trained[3:]), key=lambda ps: (-ps[1], ps[0]))
    return trained[:3] + pieces


def _condition_weights(transformer, vae) -> None:
    """Deterministic edits of the random init so the demo's videos respond to what the engine moves around.

    With plain random init the prompt barely reaches the latents (its ~10 tokens get ~2% of the cross-attention
    next to ~500 identical padding tokens) and the VAE decoder's biases swamp the latents (other seeds give the
    same video to within 1 uint8 level), so a dropped or swapped tensor would go unnoticed. So: sharpen and amplify
    the cross-attention (:data:`CROSS_ATTENTION_GAIN`); in the VAE decoder, zero every bias and every residual
    branch's last layer (zero-init residuals), which leaves a smooth, scale-free map from latents to pixels. Videos
    then differ by ~30 levels (mean |diff|) between seeds and visibly between prompts with CFG, with no saturation.
    """
    import torch

    with torch.no_grad():
        for name, module in transformer.named_modules():
            if name.endswith("attn2.norm_k"):
                module.weight.mul_(CROSS_ATTENTION_GAIN)
            elif name.endswith("attn2.to_out.0"):
                module.weight.mul_(CROSS_ATTENTION_GAIN)
                module.bias.mul_(CROSS_ATTENTION_GAIN)
        for name, module in vae.decoder.named_modules():
            if name.endswith(".conv2") or name.endswith(".attentions.0.proj"):  # last layer of a residual branch
                module.weight.zero_()
        for name, parameter in vae.decoder.named_parameters():
            if name.endswith("bias"):
                parameter.zero_()


def _build_components(task: str = "t2v") -> dict:
    """Construct the pipeline components with fixed seeds (float32, CPU): five for "t2v", seven for "i2v"."""
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import T5TokenizerFast, UMT5Config, UMT5EncoderModel

    # T5TokenizerFast (the class Wan2.1's model_index.json names) is T5Tokenizer in transformers >= 5.
    tokenizer = T5TokenizerFast(vocab=_train_tokenizer_vocab(), extra_ids=0, model_max_length=512)

    torch.manual_seed(SEEDS["text_encoder"])
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), **TEXT_ENCODER_CONFIG)).eval()

    torch.manual_seed(SEEDS["transformer"])
    transformer = WanTransformer3DModel(**(I2V_TRANSFORMER_CONFIG if task == "i2v" else TRANSFORMER_CONFIG)).eval()

    torch.manual_seed(SEEDS["vae"])
    vae = AutoencoderKLWan(**VAE_CONFIG).eval()

    _condition_weights(transformer, vae)
    scheduler = UniPCMultistepScheduler(**SCHEDULER_CONFIG)
    components = dict(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae,
                      scheduler=scheduler)
    if task == "i2v":
        from transformers import CLIPVisionConfig, CLIPVisionModel

        torch.manual_seed(SEEDS["image_encoder"])
        components["image_encoder"] = CLIPVisionModel(CLIPVisionConfig(**IMAGE_ENCODER_CONFIG)).eval()
        components["image_processor"] = _image_processor()
    return components


def _image_processor():
    """A ``CLIPImageProcessor`` (the PIL implementation where torchvision is missing: same resize and crop)."""
    import warnings

    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.CLIPImageProcessor(**IMAGE_PROCESSOR_CONFIG)


def recipe_fingerprint(task: str = "t2v") -> str:
    """Hash of everything this module's constants put into the demo model: a cached build made from another recipe
    (an older checkout) is stale even if :data:`DEMO_VERSION` was not bumped. Code changes still need the bump."""
    recipe = dict(version=DEMO_VERSION, text_encoder=TEXT_ENCODER_CONFIG, transformer=TRANSFORMER_CONFIG,
                  vae=VAE_CONFIG, scheduler=SCHEDULER_CONFIG, seeds=SEEDS, gain=CROSS_ATTENTION_GAIN,
                  vocab_size=TOKENIZER_VOCAB_SIZE, corpus=CORPUS)
    if task == "i2v":
        recipe.update(task=task, transformer=I2V_TRANSFORMER_CONFIG, image_encoder=IMAGE_ENCODER_CONFIG,
                      image_processor=IMAGE_PROCESSOR_CONFIG)
    else:
        recipe["seeds"] = {k: v for k, v in SEEDS.items() if k != "image_encoder"}  # t2v builds stay valid
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=list).encode()).hexdigest()[:16]


def _read_marker(model_dir: pathlib.Path) -> dict | None:
    try:
        info = json.loads((model_dir / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def is_complete(model_dir: str | os.PathLike, task: str = "t2v") -> bool:
    """True if ``model_dir`` holds a complete demo model of this version, task and recipe (its marker says so)."""
    info = _read_marker(pathlib.Path(model_dir))
    return info is not None and info.get("version") == DEMO_VERSION and info.get("recipe") == recipe_fingerprint(task)


def _write_demo_model(tmp_dir: pathlib.Path, task: str = "t2v") -> None:
    """Write all components, then the marker, into the (private) directory ``tmp_dir``."""
    from diffusers import WanImageToVideoPipeline, WanPipeline
    from transformers.utils import logging as transformers_logging

    pipeline_class = WanImageToVideoPipeline if task == "i2v" else WanPipeline
    pipeline = pipeline_class(**_build_components(task))
    bars_were_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # its "Writing model shards" bar is noise here
    try:
        pipeline.save_pretrained(tmp_dir, safe_serialization=True)
    finally:
        if bars_were_enabled:
            transformers_logging.enable_progress_bar()
    umask = os.umask(0)
    os.umask(umask)
    for path in [tmp_dir, *tmp_dir.rglob("*")]:  # mkdtemp makes 0700; the cache may be shared: use the umask
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
    if task == "i2v":  # name the class real Wan2.1-I2V directories name (not the PIL fallback's own name)
        index_path = tmp_dir / "model_index.json"
        index = json.loads(index_path.read_text())
        index["image_processor"] = ["transformers", "CLIPImageProcessor"]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    marker = {"name": "spmd_diff-demo", "version": DEMO_VERSION, "recipe": recipe_fingerprint(task), "task": task}
    (tmp_dir / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")


def build_demo_model(out_dir: str | os.PathLike, task: str = "t2v") -> pathlib.Path:
    """Write the demo model of ``task`` ("t2v" or "i2v") into ``out_dir`` (atomically) and return its path.

    If ``out_dir`` already holds a complete demo model of this version and recipe it is returned as is. The model is
    built in a temp dir next to ``out_dir`` and renamed into place; if another process renamed its own copy first,
    ours is dropped and theirs returned. A stale demo model (another version or recipe) is replaced. Raises
    :class:`UserError` if ``out_dir`` exists and holds something else.
    """
    if task not in TASKS:
        raise UserError(f"demo model task {task!r}: expected one of {', '.join(TASKS)}")
    out_dir = pathlib.Path(out_dir).expanduser().absolute()
    if is_complete(out_dir, task):
        return out_dir
    stale = _read_marker(out_dir) is not None
    if not stale and out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        if is_complete(out_dir, task):  # another process renamed its build into place since the first check
            return out_dir
        raise UserError(f"{out_dir} exists but is not a spmd_diff demo model; remove it or choose another directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tomb_dir = tmp_dir.with_name(tmp_dir.name.replace(".tmp-", ".stale-"))
    try:
        logger.info("building the demo model in %s", tmp_dir)
        _write_demo_model(tmp_dir, task)
        if stale:
            logger.warning("replacing the stale demo model in %s (another version or recipe)", out_dir)
            try:
                os.rename(out_dir, tomb_dir)  # out of the way; deleted below
            except OSError:
                pass  # another process moved it first
        try:
            os.rename(tmp_dir, out_dir)  # atomic; replaces out_dir only if it is an empty directory
        except OSError:
            if not is_complete(out_dir, task):  # not a lost race with another builder: a real error
                raise
            logger.info("another process built %s first; using it", out_dir)
    finally:
        for leftover in (tmp_dir, tomb_dir):
            if leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
    assert is_complete(out_dir, task), out_dir
    return out_dir


def default_cache_dir() -> pathlib.Path:
    """``$SPMD_DIFF_CACHE`` if set, else ``~/.cache/spmd_diff``."""
    return pathlib.Path(os.environ.get(CACHE_ENV) or "~/.cache/spmd_diff").expanduser()


def demo_model_dir(cache_dir: str | os.PathLike | None = None, task: str = "t2v") -> pathlib.Path:
    """Path of the demo model of ``task`` under ``cache_dir`` (default :func:`default_cache_dir`), built there if
    missing.

    Safe to call from several processes at once: each builds privately and the first rename wins.
    """
    root = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    name = f"demo-v{DEMO_VERSION}" if task == "t2v" else f"demo-{task}-v{DEMO_VERSION}"
    return build_demo_model(root / name, task)
