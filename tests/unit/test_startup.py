"""Startup checks the job, the prompts, the roles and OUT before torch is imported, and a rerun with nothing left to
render loads no model (spmd_diff/runtime/startup.py). Each case runs the CLI in a fresh interpreter and reports
whether torch (and diffusers) got imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py

REPO = Path(__file__).resolve().parents[2]
PROMPTS = '{"id": "a", "prompt": "a cat"}\n{"id": "b", "prompt": "a dog"}\n'
PROBE = ("import json, sys\nfrom spmd_diff.cli import main\ncode = main(sys.argv[1:])\n"
         "print(json.dumps({'code': code, 'torch': 'torch' in sys.modules, 'diffusers': 'diffusers' in sys.modules}))")


def cli(args: list[str], env: dict[str, str]) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=REPO)
    assert proc.stdout.strip(), proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_bad_input_and_nothing_to_do_never_import_torch(demo_model_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_COMM_WORLD", "PMIX_", "SLURM_"))}
    env.update(SPMD_DIFF_CACHE=str(demo_model_dir.parent), OMP_NUM_THREADS="1")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(PROMPTS)
    out = tmp_path / "out"
    base = ["run", str(REPO / "jobs/demo.toml"), "--prompts", str(prompts), "--out", str(out),
            "--set", "video.num_inference_steps=2"]

    typo, stderr = cli(base + ["--set", "video.heigth=64"], env)
    assert typo == {"code": 2, "torch": False, "diffusers": False}, stderr
    assert "unknown key video.heigth (did you mean 'height'?)" in stderr
    assert not out.exists()

    first, stderr = cli(base, env)
    assert first["code"] == 0 and first["torch"], stderr
    with h5py.File(out / "videos.h5") as f:
        assert sorted(f["videos"]) == ["a", "b"]

    rerun, stderr = cli(base, env)
    assert rerun == {"code": 0, "torch": False, "diffusers": False}, stderr
    assert "nothing to render (no model loaded): 2 of 2 item(s)" in stderr
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    ends = [e for e in events if e["ev"] == "job_end"]
    assert [e["status"] for e in ends] == ["complete", "nothing to do"], ends
