"""The built-in demo model: loadable by diffusers, deterministic, tokenizer sane, concurrent builds safe."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import pathlib
import shutil

import pytest

from spmd_diff.errors import UserError
from spmd_diff.models import demo


def _file_hashes(root: pathlib.Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_marker(demo_model_dir: pathlib.Path) -> None:
    hashes = _file_hashes(demo_model_dir)
    for name in ("model_index.json", "text_encoder/model.safetensors",
                 "transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "tokenizer/tokenizer.json", "scheduler/scheduler_config.json", demo.MARKER_FILE):
        assert name in hashes, sorted(hashes)
    assert demo.is_complete(demo_model_dir)
    total = sum(p.stat().st_size for p in demo_model_dir.rglob("*") if p.is_file())
    assert total < 1_000_000, f"demo model grew to {total} bytes"
    index = json.loads((demo_model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline"
    assert index["scheduler"] == ["diffusers", "UniPCMultistepScheduler"]
    scheduler = json.loads((demo_model_dir / "scheduler/scheduler_config.json").read_text())
    assert (scheduler["prediction_type"], scheduler["use_flow_sigmas"], scheduler["flow_shift"]) == (
        "flow_prediction", True, 3.0)


def test_wan_pipeline_loads_it(demo_model_dir: pathlib.Path) -> None:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    pipeline = WanPipeline.from_pretrained(demo_model_dir)
    assert isinstance(pipeline.transformer, WanTransformer3DModel)
    assert isinstance(pipeline.vae, AutoencoderKLWan)
    assert isinstance(pipeline.text_encoder, UMT5EncoderModel)
    assert isinstance(pipeline.scheduler, UniPCMultistepScheduler)
    assert pipeline.transformer_2 is None
    assert pipeline.text_encoder.config.d_model == pipeline.transformer.config.text_dim
    assert pipeline.text_encoder.config.vocab_size == len(pipeline.tokenizer)


def test_rebuild_is_byte_identical(demo_model_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    again = demo.build_demo_model(tmp_path / "again")
    assert _file_hashes(again) == _file_hashes(demo_model_dir)


def test_complete_dir_is_returned_not_rebuilt(demo_model_dir: pathlib.Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in demo_model_dir.rglob("*")}
    assert demo.build_demo_model(demo_model_dir) == demo_model_dir
    assert {p: p.stat().st_mtime_ns for p in demo_model_dir.rglob("*")} == before


def test_refuses_a_foreign_directory(tmp_path: pathlib.Path) -> None:
    foreign = tmp_path / "demo-v1"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="exists but is not a spmd_diff demo model"):
        demo.build_demo_model(foreign)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_stale_build_is_replaced(demo_model_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    stale = tmp_path / "demo-v1"
    shutil.copytree(demo_model_dir, stale)
    (stale / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"older weights")
    marker = json.loads((stale / demo.MARKER_FILE).read_text())
    (stale / demo.MARKER_FILE).write_text(json.dumps({**marker, "recipe": "older-recipe"}))
    assert not demo.is_complete(stale)
    assert demo.build_demo_model(stale) == stale
    assert _file_hashes(stale) == _file_hashes(demo_model_dir)
    assert [p.name for p in tmp_path.iterdir()] == ["demo-v1"], "temp or stale dirs left behind"


def test_tokenizer_round_trip(demo_model_dir: pathlib.Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir / "tokenizer")
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    prompt = "A cat and a dog are baking a cake together in a bright kitchen."
    ids = tokenizer(prompt).input_ids
    assert ids[-1] == 1 and 2 not in ids and len(ids) < len(prompt)
    assert tokenizer.decode(ids, skip_special_tokens=True) == prompt
    padded = tokenizer([prompt], padding="max_length", max_length=64, truncation=True, return_tensors="pt")
    assert padded.input_ids.shape == (1, 64)
    assert padded.input_ids[0, len(ids):].eq(0).all() and padded.attention_mask.sum() == len(ids)
    assert tokenizer("Zebra!").input_ids.count(2) >= 1  # characters outside the corpus are <unk>


def _build_in_child(cache_dir: str, barrier, results) -> None:
    import torch

    torch.set_num_threads(1)  # as torch's DataLoader workers do after fork
    barrier.wait(timeout=60)  # start together, so the builds overlap
    results.put(str(demo.demo_model_dir(cache_dir)))


def test_concurrent_builders_end_with_one_model(tmp_path: pathlib.Path) -> None:
    ctx = multiprocessing.get_context("fork")  # the children reuse this process's imports: seconds, not tens
    barrier, results = ctx.Barrier(2), ctx.Queue()
    children = [ctx.Process(target=_build_in_child, args=(str(tmp_path), barrier, results)) for _ in range(2)]
    for child in children:
        child.start()
    paths = [results.get(timeout=120) for _ in children]
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    assert paths[0] == paths[1] == str(tmp_path / f"demo-v{demo.DEMO_VERSION}")
    assert demo.is_complete(paths[0])
    assert [p.name for p in tmp_path.iterdir()] == [f"demo-v{demo.DEMO_VERSION}"], "temp dirs left behind"


def test_losing_the_rename_race_returns_the_winner(demo_model_dir: pathlib.Path, tmp_path: pathlib.Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    out_dir = tmp_path / "demo-v1"
    write = demo._write_demo_model

    def write_then_lose(tmp_dir: pathlib.Path, task: str = "t2v") -> None:
        write(tmp_dir, task)
        shutil.copytree(demo_model_dir, out_dir)  # another process renames its copy into place first

    monkeypatch.setattr(demo, "_write_demo_model", write_then_lose)
    assert demo.build_demo_model(out_dir) == out_dir
    assert demo.is_complete(out_dir)
    assert [p.name for p in tmp_path.iterdir()] == ["demo-v1"], "the loser's temp dir was left behind"


def test_cache_dir_from_environment(demo_model_dir: pathlib.Path, tmp_path: pathlib.Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    cached = tmp_path / f"demo-v{demo.DEMO_VERSION}"
    shutil.copytree(demo_model_dir, cached)
    monkeypatch.setenv(demo.CACHE_ENV, str(tmp_path))
    assert demo.default_cache_dir() == tmp_path
    assert demo.demo_model_dir() == cached  # complete: found, not rebuilt
    monkeypatch.delenv(demo.CACHE_ENV)
    assert demo.default_cache_dir() == pathlib.Path.home() / ".cache" / "spmd_diff"
