"""The store's promises end to end, as a user meets them: one process runs ``spmd-diff`` (the real CLI, one
rank, the demo model at 2 steps) through a sequence of steps and prints one JSON record per step.

    python store_scenarios.py WORK_DIR JOB_TOML

One process for every step, so torch and diffusers are imported once. Records: {"step", "code", "stderr" (tail),
...step-specific fields}; tests/mpi/test_store_e2e.py asserts them field by field.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
from pathlib import Path

import h5py

from spmd_diff.cli import main
from spmd_diff.io.inputs import text_item_id
from spmd_diff.io.store import VideoStore, item_key
from spmd_diff.io.view import read_video
from spmd_diff.runtime.faults import OutLock

WORK, JOB = Path(sys.argv[1]), sys.argv[2]
FAST = ["--set", "video.num_inference_steps=2"]
P1 = [{"id": "a", "prompt": "a red ball bounces"}, {"id": "b", "prompt": "waves on rocks", "seed": 7},
      {"id": "c", "prompt": "a paper boat"}]
P2 = [{**P1[0], "prompt": "a red ball bounces twice"}, *P1[1:]]  # one prompt edited
P3 = [P1[0], {**P1[1], "seed": 8}, P1[2]]  # one seed edited


def emit(step: str, **fields) -> None:
    print(json.dumps({"step": step, **fields}), flush=True)


def prompts(name: str, items: list[dict]) -> Path:
    path = WORK / name
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def cli(*args: str) -> tuple[int, str, str]:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(list(args))
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def run(prompts_file: Path, out: Path, *extra: str) -> tuple[int, str]:
    code, _, err = cli("run", JOB, "--prompts", str(prompts_file), "--out", str(out), *FAST, *extra)
    return code, err


def digest(data) -> str:
    return hashlib.sha256(memoryview(data).cast("B") if not isinstance(data, bytes) else data).hexdigest()


def videos(out: Path) -> dict[str, str]:
    """id -> SHA-256 of the video, read with plain h5py through the view."""
    with h5py.File(out / "videos.h5", "r") as f:
        return {k: digest(f["videos"][k][...].tobytes()) for k in f["videos"]}


def snapshot(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): digest(p.read_bytes()) for p in sorted(out.rglob("*")) if p.is_file()}


def item_files(out: Path) -> dict[str, str]:
    """item id -> file name of its item file(s), joined (one name when all is well)."""
    store = VideoStore(out)
    names = {}
    for item in (json.loads(line) for line in (WORK / "all_ids.jsonl").read_text().splitlines()):
        refs = store.item_refs().get(item_key(item), [])
        names[item] = ",".join(sorted(r.path.name for r in refs))
    return names


def item_path(out: Path, item_id: str) -> Path:
    [ref] = VideoStore(out).item_refs()[item_key(item_id)]
    return ref.path


def tail(text: str) -> str:
    return text[-3000:]


def main_driver() -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "all_ids.jsonl").write_text("".join(json.dumps(i) + "\n" for i in ("a", "b", "c")))
    p1, p2, p3 = prompts("p1.jsonl", P1), prompts("p2.jsonl", P2), prompts("p3.jsonl", P3)
    out1, out2 = WORK / "out1", WORK / "out2"

    code, err = run(p1, out1)
    emit("base", code=code, stderr=tail(err), videos=videos(out1), files=item_files(out1))

    # Changed content, rerun into the same OUT: refused, OUT untouched, the message lists the ids and the change.
    from spmd_diff.models.demo import demo_model_dir

    other_weights, moved = WORK / "other-model", WORK / "moved-model"
    shutil.copytree(demo_model_dir(), other_weights)
    shutil.copytree(demo_model_dir(), moved)
    weights = other_weights / "transformer" / "diffusion_pytorch_model.safetensors"
    _perturb_safetensors(weights)
    for step, args in [("changed_prompt", (p2,)), ("changed_seed", (p3,)),
                       ("changed_run_seed", (p1, "--set", "run.seed=99")),
                       ("changed_weights", (p1, "--model", str(other_weights)))]:
        before = snapshot(out1)
        code, err = run(args[0], out1, *args[1:])
        emit(step, code=code, stderr=tail(err), untouched=snapshot(out1) == before)

    before = snapshot(out1)
    code, err = run(p1, out1, "--model", str(moved))
    after = snapshot(out1)
    emit("moved_model", code=code, stderr=tail(err),
         items_untouched=all(after.get(k) == v for k, v in before.items() if k.startswith("items/")))

    # --force re-renders exactly the changed item; the result equals a clean run of the new prompts.
    files_before = item_files(out1)
    code, err = run(p2, out1, "--force")
    emit("force", code=code, stderr=tail(err), files_before=files_before, files=item_files(out1),
         videos=videos(out1))
    code, err = run(p2, out2)
    emit("clean_p2", code=code, stderr=tail(err), videos=videos(out2))

    # The view read from inside another OUT with the same ids: in place, its own videos; copied alone, an error.
    alone = WORK / "alone"
    alone.mkdir()
    shutil.copy(out2 / "videos.h5", alone / "videos.h5")
    here = os.getcwd()
    os.chdir(out1)
    try:
        in_place = videos(out2)
        copied = {}
        with h5py.File(alone / "videos.h5", "r") as f:
            for item_id in ("a", "b", "c"):
                try:
                    copied[item_id] = digest(f["videos"][item_id][...].tobytes())
                except (KeyError, OSError) as exc:
                    copied[item_id] = f"error: {type(exc).__name__}"
        try:
            read_video(alone, "a")
            tool = "read"
        except FileNotFoundError as exc:
            tool = str(exc)
    finally:
        os.chdir(here)
    emit("decoy_cwd", in_place=in_place, copied=copied, read_video=tool)

    # Corrupt item files: reported by id, left out by inspect/export, moved aside and rendered again by a run.
    out_c = WORK / "out-corrupt"
    shutil.copytree(out2, out_c)
    path_a, path_b = item_path(out_c, "a"), item_path(out_c, "b")
    path_a.write_bytes(path_a.read_bytes()[:-5000])
    path_b.write_bytes(os.urandom(path_b.stat().st_size))
    code_i, inspected, _ = cli("inspect", str(out_c))
    code_e, exported, err_e = cli("export", str(out_c), str(WORK / "exported"), "--format", "png")
    code, err = run(p2, out_c)
    emit("corrupt", inspect_code=code_i, inspect=inspected, export_code=code_e, exported=exported,
         export_stderr=err_e, code=code, stderr=tail(err), videos=videos(out_c), files=item_files(out_c),
         corrupt_dir=sorted(p.name for p in (out_c / "corrupt").iterdir()))

    # A corrupt file of an item this run does not render: named, moved aside, the view still published.
    out_d = WORK / "out-corrupt-other"
    shutil.copytree(out2, out_d)
    path_a = item_path(out_d, "a")
    path_a.write_bytes(path_a.read_bytes()[:-5000])
    code, err = run(prompts("only-b.jsonl", [P2[1]]), out_d)  # b has its own seed: the same item on line 1
    code_m, merged, err_m = cli("merge", str(out_d))
    emit("corrupt_other", code=code, stderr=tail(err), videos=sorted(videos(out_d)), merge_code=code_m,
         merge=merged, merge_stderr=err_m)

    # Damage only the full check sees (the video bytes, header and size intact): verify finds it, a run redoes it.
    code_v0, verified0, _ = cli("verify", str(out_c))
    path_c = item_path(out_c, "c")
    data = bytearray(path_c.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path_c.write_bytes(bytes(data))
    code_v, verified, err_v = cli("verify", str(out_c))
    code, err = run(p2, out_c)
    emit("verify", first_code=code_v0, first=verified0, code_verify=code_v, verify=verified, verify_stderr=err_v,
         code=code, stderr=tail(err), videos=videos(out_c))

    # Plain text: ids from the text, so an inserted line is the only new item.
    t, out_t = WORK / "t.txt", WORK / "out-text"
    t.write_text("a cat\na dog\n")
    code1, err1 = run(t, out_t)
    t.write_text("a NEW first line\na cat\na dog\n")
    code, err = run(t, out_t)
    ids = {text: text_item_id(text, 1) for text in ("a NEW first line", "a cat", "a dog")}
    emit("plain_text", first_code=code1, first_stderr=tail(err1), code=code, stderr=tail(err), ids=ids,
         videos=sorted(videos(out_t)), num_files=len(list((out_t / "items").glob("*/*.h5"))))

    # Text HDF5 cannot store: refused at parse time with file and line, nothing written.
    bad = {"nul_prompt": '{"id": "a", "prompt": "x\\u0000y"}',
           "surrogate_prompt": '{"id": "a", "prompt": "sunset \\ud83c"}',
           "surrogate_id": '{"id": "a\\ud83c", "prompt": "x"}', "nul_id": '{"id": "a\\u0000", "prompt": "x"}'}
    for name, line in bad.items():
        path = WORK / f"{name}.jsonl"
        path.write_text('{"id": "fine", "prompt": "fine"}\n' + line + "\n")
        code, err = run(path, WORK / f"out-{name}")
        emit(f"bad_text_{name}", code=code, stderr=tail(err), out_exists=(WORK / f"out-{name}").exists())

    # An OUT holding failure records with text HDF5 cannot store (as older versions wrote): runs and merge work.
    out_p = WORK / "out-poisoned"
    shutil.copytree(out2, out_p)
    (out_p / "failed" / f"{item_key('x')}.json").write_text(
        '{"id": "x", "stage": "write", "error": "VLEN strings do not support embedded NULLs \\u0000", '
        '"prompt": "sunset \\ud83c"}\n')
    (out_p / "failed" / f"{item_key('y')}.json").write_text('{"id": "y\\ud83c", "stage": "s", "error": "e"}\n')
    code, err = run(p2, out_p)
    code_m, merged, err_m = cli("merge", str(out_p))
    with h5py.File(out_p / "videos.h5", "r") as f:
        failed = {k: dict(f["failed"][k].attrs) for k in f["failed"]}
    emit("poisoned", code=code, stderr=tail(err), merge_code=code_m, merge_stderr=err_m,
         failed={k: {a: str(v) for a, v in attrs.items()} for k, attrs in failed.items()})

    # Array tasks of different shard counts on one OUT at once: refused.
    out_s = WORK / "out-shards"
    out_s.mkdir()
    running = OutLock(out_s, (0, 2))
    running.acquire()
    code, err = run(p1, out_s, "--shard", "0/3")
    running.release()
    code2, err2 = run(p1, out_s, "--shard", "0/3")
    emit("mixed_shards", code=code, stderr=tail(err), code_after=code2, stderr_after=tail(err2))


def _perturb_safetensors(path: Path) -> None:
    """Other weights of the same shapes (as another checkpoint of the same architecture would be)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    save_file({k: v * 1.5 if v.is_floating_point() else v for k, v in tensors.items()}, str(path))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main_driver()
