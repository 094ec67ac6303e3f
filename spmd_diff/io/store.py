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
job's OUT holds a file of that name. ``view.read_video`` never uses HDF5's search at all.

An item is done when its file is under its final name *and verifies* (itemfile.py: quick check of header and size
whenever a run plans its work or the view is rebuilt; full check of the data's checksum by ``spmd-diff verify``
and whenever ``read_video`` or ``export`` read a video). A corrupt file is reported, moved to corrupt/, and its
item rendered again. No file is ever modified in place; a crash leaves at most ``*.tmp.*`` files, which the next
run removes.

This module is the layout and the files; runplan.py decides what a run renders (and refuses), view.py builds
and reads the view.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np

from spmd_diff.errors import UserError
from spmd_diff.io import itemfile, jobrecord
from spmd_diff.io.identity import clean_text, identity_of
from spmd_diff.io.inputs import unstorable_text
from spmd_diff.io.itemfile import CorruptItem, Header

STORE_VERSION = 2
MAX_LISTED = 10


def item_key(item_id: str) -> str:
    """File-system name of an item: SHA-1 of its id (ids may hold any character but '/')."""
    return hashlib.sha1(item_id.encode("utf-8")).hexdigest()


def fsync_dir(path: Path) -> None:
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


def tmp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp.{socket.gethostname()}.{os.getpid()}")


def atomic_write_bytes(path: Path, data: bytes | memoryview) -> None:
    tmp = tmp_name(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


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
    def check_can_write(self) -> None:
        """Whether OUT/ could be created or written, without creating or writing anything (a job refused later,
        for a bad model say, must leave OUT as it found it). Raises UserError naming the directory."""
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"output directory {self.root} is a file, not a directory; give another --out")
        existing = self.root
        while not existing.exists():
            if existing.parent == existing:
                break
            existing = existing.parent
        if existing.exists() and not existing.is_dir():
            raise UserError(f"output directory {self.root} cannot be created: {existing} is a file")
        if not os.access(existing, os.W_OK | os.X_OK):
            what = "is not writable" if existing == self.root else f"cannot be created: {existing} is not writable"
            raise UserError(f"output directory {self.root} {what}")

    def check_writable(self) -> None:
        """Create OUT/ and prove we can write there. Raises UserError naming the directory."""
        self.check_can_write()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = tmp_name(self.root / ".write-probe")
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            raise UserError(f"output directory {self.root} is not writable: {exc.strerror or exc}") from None

    @property
    def token(self) -> str:
        """This OUT's random token (store.json), made on first use; every item file name ends with it."""
        if self._token is None:
            self._token = self.read_token() or self._create_store_file()
        return self._token

    def read_token(self) -> str | None:
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
        tmp = tmp_name(self.store_path)
        tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
        try:
            os.link(tmp, self.store_path)  # never replaces: the first writer's token wins
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(self.root)
        return self.read_token()  # type: ignore[return-value]

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

    def refuse_legacy(self) -> None:
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

    # -- writing items ----------------------------------------------------------------------------------------
    def write_item(self, item_id: str, video: np.ndarray, attrs: Mapping) -> Path:
        """Write one finished video atomically. ``video``: uint8 [frames, height, width, 3] for a raw video, or
        the mp4 bytes uint8 [N] of an encoded one (``attrs["codec"]`` h264/hevc; frames.stored_form makes both)."""
        encoded = itemfile.is_encoded(attrs)
        if video.dtype != np.uint8 or (video.ndim != 1 if encoded else (video.ndim != 4 or video.shape[-1] != 3)):
            want = "mp4 bytes uint8 [N]" if encoded else "uint8 [F, H, W, 3]"
            raise ValueError(f"video must be {want} (codec {attrs.get('codec', 'raw')!r}), got {video.dtype} "
                             f"{video.shape}")
        attrs = {**attrs, "id": item_id}
        key, identity, token = item_key(item_id), identity_of(attrs), self.token
        path = self.items_dir / key[:2] / f"{key}.{identity}.{token}.h5"
        data = itemfile.encode_item(np.ascontiguousarray(video), attrs, item_id=item_id, key=key,
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

def id_from_header(path: Path) -> str | None:
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


def warn(message: str) -> None:
    print(f"spmd-diff: warning: {message}", file=sys.stderr, flush=True)


def describe_corrupt(corrupt: Iterable[CorruptFile], action: str) -> list[str]:
    """One warning line per corrupt file: what, why, where it went, and ``action`` (what happens next)."""
    return [f"{c.describe()}; {action}" for c in corrupt]
