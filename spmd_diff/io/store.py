"""The HDF5 result store: exactly-once, crash-safe, verifiable, readable with h5py alone.

Layout of OUT/::

    store.json                       {"format": "spmd-diff store", "version": 2, "token": <8 hex digits>}: the
                                     token is random, made when OUT is first written, and ends every item file name
    job.json                         the settings of the videos in OUT (see jobrecord.py)
    items/<xx>/<key>.<identity>.<token>.h5
                                     one file per finished item (itemfile.py: the video, its attributes, a header
                                     with its checksum). ``key`` = SHA-1 of the item id, ``identity`` = digest of
                                     everything that decides the video (identity.py). Written as a temporary file,
                                     fsynced, then renamed into place: a final name is always a complete file.
    failed/<key>.json                items whose stage failed (id, stage, error, identity); a success removes it
    corrupt/<file> (+ <file>.json)   item files that did not verify, moved aside with the reason
    videos.h5                        the view: /videos/<id> is an HDF5 external link to ``items/<xx>/<file>``,
                                     /failed/<id> a group whose attributes say why. Rebuilt into a temporary file
                                     and renamed, so a reader never sees a half-written view.

Why the view can never show another job's video: HDF5 looks for an external link's file next to the view first,
and only if it is not there (the view copied alone, a file moved aside) relative to the reader's working
directory. Every item file name carries this OUT's random token and the item's content identity, so no other
job's OUT holds a file of that name. ``read_video`` below never uses HDF5's search at all.

An item is done when its file is under its final name *and verifies* (itemfile.py: quick check of header and size
whenever a run plans its work or the view is rebuilt; full check of the data's checksum by ``spmd-diff verify``
and whenever ``read_video`` or ``export`` read a video). A corrupt file is reported, moved to corrupt/, and its
item rendered again. No file is ever modified in place; a crash leaves at most ``*.tmp.*`` files, which the next
run removes.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import h5py
import numpy as np

from spmd_diff.errors import UserError
from spmd_diff.io import itemfile, jobrecord
from spmd_diff.io.identity import clean_text, describe_changes, identity_of
from spmd_diff.io.inputs import unstorable_text
from spmd_diff.io.itemfile import CorruptItem, Header

STORE_VERSION = 2
MAX_LISTED = 10


def item_key(item_id: str) -> str:
    """File-system name of an item: SHA-1 of its id (ids may hold any character but '/')."""
    return hashlib.sha1(item_id.encode("utf-8")).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tmp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp.{socket.gethostname()}.{os.getpid()}")


def atomic_write_bytes(path: Path, data: bytes | memoryview) -> None:
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@dataclass(frozen=True)
class ItemRef:
    """An item file found under a final name (not yet checked)."""

    path: Path
    key: str
    identity: str
    token: str

    @staticmethod
    def parse(path: Path) -> "ItemRef | None":
        parts = path.name.split(".")
        if len(parts) == 4 and parts[3] == "h5" and len(parts[0]) == 40 and len(parts[1]) == 16 \
                and len(parts[2]) == 8:
            return ItemRef(path, parts[0], parts[1], parts[2])
        return None


@dataclass
class CorruptFile:
    """An item file that did not verify."""

    file: str  # relative to OUT
    reason: str
    item_id: str | None = None
    moved_to: str | None = None  # relative to OUT, when moved aside

    def describe(self) -> str:
        who = f"item {self.item_id!r}" if self.item_id is not None else "an item"
        where = f"; moved to {self.moved_to}" if self.moved_to else ""
        return f"{who} is corrupt ({self.file}: {self.reason}){where}"


@dataclass
class RunPlan:
    """What a run will do, decided by rank 0 under the OUT lock."""

    pending: list[str]
    done: int
    corrupt: list[CorruptFile] = field(default_factory=list)
    rerendered: list[str] = field(default_factory=list)  # changed items re-rendered because of --force
    stale_failures: int = 0  # failure records of items whose content changed since (rendered again)


@dataclass
class ViewReport:
    path: Path
    num_videos: int
    num_failed: int
    corrupt: list[CorruptFile]
    num_superseded: int = 0
    identities: dict[str, str] = field(default_factory=dict)
    """Item id -> content identity of every video in the view."""


class VideoStore:
    """One OUT directory. Any rank may write items; rank 0 plans the run and rebuilds the view."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.root = Path(out_dir)
        self.items_dir = self.root / "items"
        self.failed_dir = self.root / "failed"
        self.corrupt_dir = self.root / "corrupt"
        self.view_path = self.root / "videos.h5"
        self.job_path = self.root / "job.json"
        self.store_path = self.root / "store.json"
        self._token: str | None = None
        self._attrs_of: Callable[[str], Mapping] | None = None

    # -- setup ------------------------------------------------------------------------------------------------
    def check_writable(self) -> None:
        """Create OUT/ and prove we can write there. Raises UserError naming the directory."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = _tmp_name(self.root / ".write-probe")
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            raise UserError(f"output directory {self.root} is not writable: {exc.strerror or exc}") from None

    @property
    def token(self) -> str:
        """This OUT's random token (store.json), made on first use; every item file name ends with it."""
        if self._token is None:
            self._token = self._read_token() or self._create_store_file()
        return self._token

    def _read_token(self) -> str | None:
        try:
            record = json.loads(self.store_path.read_text(encoding="utf-8"))
            token = record["token"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"{self.store_path} is unreadable: it names this output directory's items; "
                            "restore it from a backup, or render into another --out") from None
        if not (isinstance(token, str) and len(token) == 8 and all(c in "0123456789abcdef" for c in token)):
            raise UserError(f"{self.store_path}: token {token!r} is not 8 hex digits")
        return token

    def _create_store_file(self) -> str:
        record = {"format": "spmd-diff store", "version": STORE_VERSION, "token": secrets.token_hex(4),
                  "created": time.time()}
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_name(self.store_path)
        tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
        try:
            os.link(tmp, self.store_path)  # never replaces: the first writer's token wins
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(self.root)
        return self._read_token()  # type: ignore[return-value]

    def expect(self, attrs_of: Callable[[str], Mapping] | None) -> None:
        """Tell the store the attributes of this run's items (by id), so failure records carry their identity."""
        self._attrs_of = attrs_of

    def remove_stale_temporaries(self, max_age_s: float = 86400.0) -> int:
        """Delete temporary files a killed run left (never a final-named file).

        A temporary is named ``<final>.tmp.<host>.<pid>``. It is stale when its writer is gone: a process of
        this host that no longer exists, or (another host, which we cannot ask) older than ``max_age_s``. Job
        array tasks sharing OUT never delete each other's files in flight.
        """
        host, now, count = socket.gethostname(), time.time(), 0
        candidates = [*self.items_dir.glob("*/*.tmp.*"), *self.failed_dir.glob("*.tmp.*"),
                      *self.root.glob("*.tmp.*")]
        for path in candidates:
            writer_host, _, pid = path.name.split(".tmp.", 1)[1].rpartition(".")
            try:
                if writer_host == host and pid.isdigit():
                    if _process_alive(int(pid)):
                        continue
                elif now - path.stat().st_mtime < max_age_s:
                    continue
                path.unlink()
                count += 1
            except FileNotFoundError:
                pass
        return count

    # -- finding items ----------------------------------------------------------------------------------------
    def item_refs(self) -> dict[str, list[ItemRef]]:
        """key -> the item files under final names (one listing; nothing opened)."""
        refs: dict[str, list[ItemRef]] = {}
        if not self.items_dir.is_dir():
            return refs
        for sub in sorted(os.scandir(self.items_dir), key=lambda e: e.name):
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub.path):
                if entry.name.endswith(".h5"):
                    ref = ItemRef.parse(Path(entry.path))
                    if ref is not None:
                        refs.setdefault(ref.key, []).append(ref)
        return refs

    def legacy_files(self) -> list[Path]:
        """Item files of the round-1 layout (``items/<xx>/<sha1>.h5``: no identity, no checksum)."""
        if not self.items_dir.is_dir():
            return []
        return [p for p in self.items_dir.glob("*/*.h5") if len(p.name) == 43 and "." not in p.name[:-3]]

    def _refuse_legacy(self) -> None:
        legacy = self.legacy_files()
        if legacy:
            raise UserError(f"{self.root} holds {len(legacy)} item file(s) of an older spmd-diff "
                            f"(e.g. {legacy[0].relative_to(self.root)}) that record no content identity or "
                            "checksum, so they cannot be verified; render into a new --out (or move items/ away)")

    def check_header(self, ref: ItemRef) -> Header:
        """Quick check of one item file (itemfile.read_header) and that its header belongs to its name."""
        header = itemfile.read_header(ref.path)
        if (header.key, header.identity, header.token) != (ref.key, ref.identity, ref.token) \
                or item_key(header.id) != ref.key:
            raise CorruptItem("its header belongs to another item file (renamed or copied over)")
        return header

    def quarantine(self, ref: ItemRef, reason: str, item_id: str | None, move: bool) -> CorruptFile:
        """Report a corrupt item file and, with ``move``, move it to OUT/corrupt/ with a note saying why."""
        corrupt = CorruptFile(str(ref.path.relative_to(self.root)), reason, item_id)
        if not move:
            return corrupt
        try:
            self.corrupt_dir.mkdir(exist_ok=True)
            target = self.corrupt_dir / ref.path.name
            if target.exists():
                target = self.corrupt_dir / f"{ref.path.name}.{time.strftime('%Y%m%dT%H%M%S')}.{os.getpid()}"
            os.rename(ref.path, target)
            note = {"file": corrupt.file, "reason": reason, "id": item_id, "moved": time.time()}
            atomic_write_text(target.with_name(target.name + ".json"), json.dumps(note) + "\n")
            corrupt.moved_to = str(target.relative_to(self.root))
        except FileNotFoundError:
            corrupt.moved_to = "(already moved by another process)"
        except OSError as exc:
            corrupt.reason += f"; could not be moved aside: {exc.strerror or exc}"
        return corrupt

    # -- planning a run ---------------------------------------------------------------------------------------
    def plan(self, expected: Mapping[str, Mapping], settings: Mapping | None, *, force: bool = False,
             retry_failed: bool = False, apply: bool = False, model_path: str = "",
             job: Mapping | None = None) -> RunPlan | None:
        """Decide which of ``expected`` (item id -> attributes) to render; rank 0 of a run.

        Refuses (UserError, OUT untouched) when OUT holds the older layout, or videos of other settings, or other
        versions of some of these items (each listed with what changed) - unless ``force``, which re-renders
        exactly the changed items (their old files are deleted). With ``apply`` (under the OUT lock) it also
        records store.json and job.json, removes stale temporaries and superseded files, quick-checks the
        finished files of these items, moves corrupt ones aside and returns the plan; without, it only checks.
        """
        self._refuse_legacy()
        self._read_token()  # an unreadable store.json is refused before anything is written
        refs = self.item_refs()
        identities = {item_id: identity_of({**attrs, "id": item_id}) for item_id, attrs in expected.items()}
        changed: dict[str, list[ItemRef]] = {}
        candidates: dict[str, list[ItemRef]] = {}
        for item_id, identity in identities.items():
            files = refs.get(item_key(item_id), [])
            matching = [r for r in files if r.identity == identity]
            if matching:
                candidates[item_id] = matching + [r for r in files if r.identity != identity]
            elif files:
                changed[item_id] = files
        old_record = jobrecord.read(self.job_path)
        settings_diff = jobrecord.difference(old_record, settings) if settings is not None else None
        if (changed or settings_diff) and not force:
            raise UserError(self._refusal(settings_diff, changed, expected))
        if not apply:
            return None
        self.items_dir.mkdir(parents=True, exist_ok=True)
        self.failed_dir.mkdir(exist_ok=True)
        _ = self.token
        if settings is not None:
            new_record = jobrecord.updated(old_record, settings, model_path, job or {})
            if new_record != old_record:
                atomic_write_text(self.job_path, json.dumps(new_record, indent=2, sort_keys=True) + "\n")
        self.remove_stale_temporaries()
        plan = RunPlan([], 0)
        done: set[str] = set()
        for item_id, files in changed.items():  # --force: the old versions go; the item is rendered again
            for ref in files:
                ref.path.unlink(missing_ok=True)
            plan.rerendered.append(item_id)
        for item_id, files in candidates.items():
            for ref in files:
                if ref.identity != identities[item_id]:
                    ref.path.unlink(missing_ok=True)  # superseded: a newer version of the item is here
                    continue
                if item_id in done:
                    continue
                try:
                    self.check_header(ref)
                except CorruptItem as exc:
                    plan.corrupt.append(self.quarantine(ref, str(exc), item_id, move=True))
                else:
                    done.add(item_id)
        failures = {} if retry_failed else self.failures()
        for item_id in expected:
            if item_id in done:
                continue
            record = failures.get(item_id)
            if record is not None and record.get("identity", identities[item_id]) == identities[item_id]:
                continue  # failed with this very content: stays failed until --retry-failed
            plan.stale_failures += record is not None
            plan.pending.append(item_id)
        plan.done = len(done)
        return plan

    def _refusal(self, settings_diff: str | None, changed: Mapping[str, list[ItemRef]],
                 expected: Mapping[str, Mapping]) -> str:
        parts = []
        if settings_diff:
            parts.append(f"{self.root} holds videos of a different job configuration ({settings_diff})")
        if changed:
            listed = []
            for item_id in list(changed)[:MAX_LISTED]:
                try:
                    old = itemfile.read_attrs(changed[item_id][0].path)
                    what = describe_changes(old, {**expected[item_id], "id": item_id})
                except CorruptItem:
                    what = "its old file is unreadable"
                listed.append(f"{item_id!r} ({what})")
            more = f" and {len(changed) - MAX_LISTED} more" if len(changed) > MAX_LISTED else ""
            parts.append(f"{'it' if parts else self.root} holds other versions of {len(changed)} item(s) of this "
                         f"prompts file: {', '.join(listed)}{more}")
        if any("seed: " in item for item in parts[-1:]):
            parts[-1] += (" (a JSONL item without a \"seed\" gets run.seed + its line index, so adding, removing "
                          "or moving lines above it changes its seed: give items their own \"seed\")")
        action = (f"--force to re-render exactly those {len(changed)} item(s) (their old videos are deleted)"
                  if changed else "--force to add videos with these settings (each video's attributes record its "
                  "own)")
        return "; ".join(parts) + f". Use another --out, or {action}"

    # -- writing items ----------------------------------------------------------------------------------------
    def write_item(self, item_id: str, video_FHWC: np.ndarray, attrs: Mapping) -> Path:
        """Write one finished video atomically. ``video_FHWC``: uint8 [frames, height, width, 3]."""
        if video_FHWC.dtype != np.uint8 or video_FHWC.ndim != 4 or video_FHWC.shape[-1] != 3:
            raise ValueError(f"video must be uint8 [F, H, W, 3], got {video_FHWC.dtype} {video_FHWC.shape}")
        attrs = {**attrs, "id": item_id}
        key, identity, token = item_key(item_id), identity_of(attrs), self.token
        path = self.items_dir / key[:2] / f"{key}.{identity}.{token}.h5"
        data = itemfile.encode_item(np.ascontiguousarray(video_FHWC), attrs, item_id=item_id, key=key,
                                    identity=identity, settings=jobrecord.settings_digest(jobrecord.settings_of(attrs)),
                                    token=token)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
        for old in path.parent.glob(f"{key}.*.h5"):  # older versions of this item (a --force re-render)
            if old != path:
                old.unlink(missing_ok=True)
        (self.failed_dir / f"{key}.json").unlink(missing_ok=True)
        return path

    def write_failure(self, item_id: str, stage: str, error: str, prompt: str = "") -> None:
        """Record that an item failed; it stays pending for ``--retry-failed`` (or until its content changes)."""
        self.failed_dir.mkdir(parents=True, exist_ok=True)
        record = {"id": item_id, "stage": clean_text(str(stage)), "error": clean_text(str(error)),
                  "prompt": clean_text(str(prompt)), "time": time.time()}
        if self._attrs_of is not None:
            try:
                record["identity"] = identity_of({**self._attrs_of(item_id), "id": item_id})
            except KeyError:
                pass
        atomic_write_text(self.failed_dir / f"{item_key(item_id)}.json", json.dumps(record) + "\n")

    def failures(self) -> dict[str, dict]:
        """Item id -> failure record, for every readable record (unreadable or foreign ones are skipped)."""
        out = {}
        if self.failed_dir.is_dir():
            for path in sorted(self.failed_dir.glob("*.json")):
                try:
                    record = json.loads(path.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    continue
                item_id = record.get("id") if isinstance(record, dict) else None
                if not isinstance(item_id, str) or unstorable_text(item_id) or item_key(item_id) != path.stem:
                    continue
                out[item_id] = record
        return out

    # -- the view ---------------------------------------------------------------------------------------------
    def build_view(self, expected: Mapping[str, Mapping] | None = None, repair: bool = True) -> ViewReport:
        """Rebuild OUT/videos.h5 over every item file that passes the quick check, and every failure.

        ``expected``: the attributes of the run's items by id (to prefer, for an item with several files, the
        one of the content asked for; else the newest). With ``repair``, corrupt files are moved to corrupt/ and
        superseded ones deleted; job.json's video counts are refreshed.
        """
        self._refuse_legacy()
        wanted = {item_key(i): identity_of({**a, "id": i}) for i, a in (expected or {}).items()}
        ids_by_key = {item_key(i): i for i in (expected or {})}
        chosen: dict[str, tuple[ItemRef, Header]] = {}
        corrupt: list[CorruptFile] = []
        superseded = 0
        counts: dict[str, int] = {}
        for key, refs in sorted(self.item_refs().items()):
            good = []
            for ref in refs:
                try:
                    good.append((ref, self.check_header(ref)))
                except CorruptItem as exc:
                    item_id = ids_by_key.get(key) or _id_from_header(ref.path)
                    corrupt.append(self.quarantine(ref, str(exc), item_id, move=repair))
            if not good:
                continue
            good.sort(key=lambda rh: (rh[0].identity == wanted.get(key), rh[1].written), reverse=True)
            chosen[key] = good[0]
            counts[good[0][1].settings] = counts.get(good[0][1].settings, 0) + 1
            for ref, _ in good[1:]:
                superseded += 1
                if repair:
                    ref.path.unlink(missing_ok=True)
        videos = {header.id: ref for ref, header in chosen.values()}
        failures = {i: r for i, r in self.failures().items() if i not in videos}
        if repair:
            record = jobrecord.read(self.job_path)
            if record:
                refreshed = jobrecord.with_counts(record, counts)
                if refreshed != record:
                    atomic_write_text(self.job_path, json.dumps(refreshed, indent=2, sort_keys=True) + "\n")
        self._write_view(videos, failures, len(corrupt))
        return ViewReport(self.view_path, len(videos), len(failures), corrupt, superseded,
                          {item_id: ref.identity for item_id, ref in videos.items()})

    def _write_view(self, videos: Mapping[str, ItemRef], failures: Mapping[str, dict], num_corrupt: int) -> None:
        tmp = _tmp_name(self.view_path)
        try:
            with h5py.File(tmp, "w", libver="latest") as f:
                group = f.create_group("videos")
                for item_id in sorted(videos):
                    group[item_id] = h5py.ExternalLink(videos[item_id].path.relative_to(self.root).as_posix(),
                                                       "/video")
                failed = f.create_group("failed")
                for item_id, record in sorted(failures.items()):
                    entry = failed.create_group(item_id)
                    for name in ("stage", "error", "prompt"):
                        entry.attrs[name] = clean_text(str(record.get(name, "")))
                f.attrs["num_videos"] = len(videos)
                f.attrs["num_failed"] = len(failures)
                f.attrs["num_corrupt_found"] = num_corrupt
                token = self._read_token()
                if token:
                    f.attrs["store_token"] = token
                if self.job_path.exists():
                    f.attrs["job"] = clean_text(self.job_path.read_text(encoding="utf-8", errors="replace"))
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, self.view_path)
            _fsync_dir(self.root)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    # -- verification -----------------------------------------------------------------------------------------
    def verify(self, repair: bool = True, progress: Callable[[int, int], None] | None = None) -> "VerifyReport":
        """Full check of every item file (itemfile.verify_file: header, size, HDF5, the video's checksum); corrupt
        files are reported and, with ``repair``, moved aside, and the view rebuilt without them."""
        self._refuse_legacy()
        started = time.monotonic()
        refs = [ref for group in self.item_refs().values() for ref in group]
        corrupt, num_bytes = [], 0
        for n, ref in enumerate(refs, start=1):
            try:
                header = self.check_header(ref)
                itemfile.read_video(ref.path, header, verify=True)
                num_bytes += header.size
            except CorruptItem as exc:
                item_id = _id_from_header(ref.path)
                corrupt.append(self.quarantine(ref, str(exc), item_id, move=repair))
            if progress is not None:
                progress(n, len(refs))
        view = self.build_view(repair=repair) if repair else None
        return VerifyReport(len(refs), num_bytes, corrupt, time.monotonic() - started, view)


@dataclass
class VerifyReport:
    num_files: int
    num_bytes: int
    corrupt: list[CorruptFile]
    elapsed_s: float
    view: ViewReport | None


def _id_from_header(path: Path) -> str | None:
    try:
        with open(path, "rb") as fh:
            return itemfile.parse_header(fh.read(itemfile.HEADER_BYTES)).id
    except (OSError, CorruptItem):
        return None


def open_store(path: str | os.PathLike, *, write: bool = False) -> VideoStore:
    """The store at ``path`` (OUT/ or OUT/videos.h5) for a command other than ``run``: UserError, naming the
    problem, when it is missing, a file, not a spmd-diff output directory, or (``write``) not writable."""
    p = Path(path)
    if p.name == "videos.h5" and not p.is_dir():
        p = p.parent
    if not p.exists():
        raise UserError(f"{p} does not exist")
    if not p.is_dir():
        raise UserError(f"{p} is a file, not an output directory (give OUT/ or OUT/videos.h5)")
    store = VideoStore(p)
    if not any(x.exists() for x in (store.store_path, store.job_path, store.items_dir, store.view_path)):
        raise UserError(f"{p} is not a spmd-diff output directory (no store.json, job.json, items/ or videos.h5)")
    if write and not os.access(p, os.W_OK | os.X_OK):
        raise UserError(f"{p} is not writable (read-only); this command rewrites OUT/videos.h5")
    return store


def resolve_link(view_path: Path, link: h5py.ExternalLink) -> Path:
    """The file an external link of the view names, relative to the view's own directory (never the cwd)."""
    target = Path(link.filename)
    return target if target.is_absolute() else view_path.parent / target


def read_video(view_or_out: str | os.PathLike, item_id: str, verify: bool = True) -> np.ndarray:
    """uint8 [F, H, W, 3] of one item, through the view, resolved next to the view and checked against the
    checksum recorded when it was written (CorruptItem if it does not match; KeyError for an unknown id)."""
    path = Path(view_or_out)
    if path.is_dir():
        path = path / "videos.h5"
    with h5py.File(path, "r") as f:
        link = f["videos"].get(item_id, getlink=True)
        if link is None:
            raise KeyError(f"no video {item_id!r} in {path}")
        if not isinstance(link, h5py.ExternalLink):  # a self-contained file holds the data itself
            return f["videos"][item_id][...]
    file = resolve_link(path, link)
    if not file.exists():
        raise FileNotFoundError(f"{file}: the file of item {item_id!r} is missing (a view needs the items/ folder "
                                "next to it: copy the whole output directory)")
    header = itemfile.read_header(file)
    if header.id != item_id:
        raise CorruptItem(f"{file} holds item {header.id!r}, not {item_id!r}")
    return itemfile.read_video(file, header, verify=verify)


def warn(message: str) -> None:
    print(f"spmd-diff: warning: {message}", file=sys.stderr, flush=True)


def describe_corrupt(corrupt: Iterable[CorruptFile], action: str) -> list[str]:
    """One warning line per corrupt file: what, why, where it went, and ``action`` (what happens next)."""
    return [f"{c.describe()}; {action}" for c in corrupt]
