"""Run ``spmd-diff run`` in this one process for each case of a JSON table; print one JSON result per case.

Each case: {"name", "args": [...], "files": {relative path: text}}. The driver makes a fresh directory per case,
writes the files, runs the CLI (a singleton MPI rank), and reports exit code, stderr and what appeared in OUT.
One process for the whole table: the torch/diffusers import cost is paid once.
"""

import contextlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path

from spmd_diff.cli import main


def snapshot(root: Path) -> dict:
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


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
            "out_changed": snapshot(out) != before, "out_files": sorted(snapshot(out))}


def main_driver() -> None:
    cases = json.loads(Path(sys.argv[1]).read_text())
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            print(json.dumps(run_case(case, Path(tmp))), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main_driver()
