"""Content identity and the model fingerprint: what changes a video changes them, nothing else does."""

import os
import shutil

import pytest

from spmd_diff.io.identity import (SAMPLE_BYTES, WHOLE_FILE_BYTES, clean_text, describe_changes, identity_of,
                                   model_fingerprint)

BASE = {"id": "a", "prompt": "a cat", "negative_prompt": "blurry", "seed": 3, "num_inference_steps": 4,
        "guidance_scale": 5.0, "model": "/models/x", "height": 64, "width": 64, "num_frames": 9,
        "max_sequence_length": 512, "dtype": "float32", "model_fingerprint": "f0", "dit_compile": False}


@pytest.mark.parametrize("change", [{"prompt": "a dog"}, {"seed": 4}, {"negative_prompt": "sharp"},
                                    {"num_inference_steps": 5}, {"guidance_scale": 4.0}, {"height": 128},
                                    {"dtype": "bfloat16"}, {"model_fingerprint": "f1"}, {"dit_compile": True},
                                    {"max_sequence_length": 256}, {"id": "b"}, {"image_sha256": "new per-item"}])
def test_what_changes_the_video_changes_the_identity(change):
    assert identity_of({**BASE, **change}) != identity_of(BASE)


def test_informational_attributes_do_not():
    assert identity_of({**BASE, "model": "/elsewhere/x", "spmd_diff_version": "9", "written": 1.0}) == \
        identity_of(BASE)
    no_cfg = {**BASE, "guidance_scale": 1.0}
    assert identity_of({**no_cfg, "negative_prompt": "other"}) == identity_of(no_cfg), "unused without CFG"


def test_describe_changes():
    text = describe_changes(BASE, {**BASE, "seed": 4, "model_fingerprint": "f1"})
    assert text == "model weights (fingerprint): 'f0' there, 'f1' now; seed: 3 there, 4 now"


def _model(root, weights: bytes):
    (root / "transformer").mkdir(parents=True)
    (root / "model_index.json").write_text('{"_class_name": "WanPipeline"}')
    (root / "transformer" / "config.json").write_text('{"num_layers": 2}')
    (root / "transformer" / "model.safetensors").write_bytes(weights)
    return root


def test_model_fingerprint(tmp_path):
    weights = os.urandom(3 * WHOLE_FILE_BYTES)
    a = model_fingerprint(str(_model(tmp_path / "a", weights)))
    assert model_fingerprint(str(_model(tmp_path / "moved", weights))) == a, "the path is not the identity"
    other = bytearray(weights)
    other[:SAMPLE_BYTES] = bytes(SAMPLE_BYTES)  # other weights of the same size (the first sample differs)
    assert model_fingerprint(str(_model(tmp_path / "b", bytes(other)))) != a
    c = _model(tmp_path / "c", weights)
    (c / "transformer" / "config.json").write_text('{"num_layers": 3}')
    assert model_fingerprint(str(c)) != a
    d = _model(tmp_path / "d", weights)
    (d / ".cache").mkdir()
    (d / ".cache" / "download.lock").write_text("x")
    (d / "README.md").write_text("docs")
    (d / "LICENSE").write_text("Apache-2.0")
    assert model_fingerprint(str(d)) == a, "hidden files and documents do not count"
    e = tmp_path / "e"
    shutil.copytree(tmp_path / "a", e)
    (e / "transformer" / "model.safetensors").write_bytes(weights + b"x")
    assert model_fingerprint(str(e)) != a


def test_clean_text():
    assert clean_text("a\x00b\ud83c") == "a\\x00b\\ud83c"
    assert clean_text("fine \U0001f305") == "fine \U0001f305"
