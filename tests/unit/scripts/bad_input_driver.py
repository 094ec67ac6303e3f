"""Run ``spmd-diff run`` in this one process for each case of a JSON table; print one JSON result per case.

Each case: {"name", "args": [...], "files": {relative path: text}}. The driver makes a fresh directory per case,
writes the files, runs the CLI (a singleton MPI rank), and reports exit code, stderr and what appeared in OUT.
One process for the whole table: the torch/diffusers import cost is paid once.
"""

import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from spmd_diff.cli import main


def snapshot(root: Path) -> dict | None:
    """Every file and directory under ``root`` with its mtime; None if ``root`` does not exist."""
    if not root.exists():
        return None
    return {str(p.relative_to(root)) + ("/" if p.is_dir() else ""): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


def copy_demo_model(dest: Path, overrides: dict) -> None:
    """The session's demo model (``$SPMD_DIFF_CACHE/demo-v*``) copied to ``dest``, with files replaced by bytes."""
    from spmd_diff.models.demo import demo_model_dir

    shutil.copytree(demo_model_dir(), dest)
    for rel, data in overrides.items():
        (dest / rel).write_bytes(bytes(data) if not isinstance(data, str) else data.encode())


def run_case(case: dict, base: Path) -> dict:
    work = base / case["name"]
    work.mkdir()
    for rel, text in case.get("files", {}).items():
        path = work / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, str):
            path.write_text(text)
        else:
            path.write_bytes(bytes(text))
    if "model_copy" in case:
        copy_demo_model(work / "model", case["model_copy"])
    out = work / "out"
    before = snapshot(out)
    args = [a.replace("{work}", str(work)) for a in case["args"]]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(args)
        except SystemExit as exc:  # argparse errors
            code = exc.code
    return {"name": case["name"], "code": code, "stderr": err.getvalue()[-3000:],
            "out_changed": snapshot(out) != before, "out_files": sorted(snapshot(out) or {})}


def main_driver() -> None:
    cases = json.loads(Path(sys.argv[1]).read_text())
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            print(json.dumps(run_case(case, Path(tmp))), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main_driver()
