"""The prompts file: JSONL (one object per item) or plain text (one prompt per line).

Errors name the file and the 1-based line. Every rank parses the same file the same way.

Ids and seeds:

- JSONL: ``id`` is the item's name (default: its 0-based index as text); ``seed`` defaults to ``run.seed`` + the
  item's index.
- Plain text: the id comes from the text of the line, not its position, so inserting, removing or reordering lines
  never gives an existing prompt another id: ``<first 16 hex digits of the SHA-1 of the line>``, and for the k-th
  repetition of the same line (k >= 2) ``<that>.<k>``. The seed comes from the id the same way
  (``run.seed`` + a number drawn from the id's SHA-1), so a prompt keeps its video wherever its line moves.

Images (image-to-video models): JSONL ``image`` is the path of the item's first frame, relative to the prompts
file's folder or absolute; it is resolved here, read only when the item is rendered (a missing or bad file fails
that item, not the job).

Per-item settings (JSONL): ``height``, ``width``, ``num_frames``, ``num_inference_steps`` and ``guidance_scale``
override the job's ``[video]`` values for that item (``VideoConfig.for_item``); each is checked here as the job's
are (``config.video_value_problem``), naming the file and the line, and the multiples the model needs are
checked against the model's configs before anything is rendered (``Item.where`` names the line there too).

Text HDF5 cannot store (NUL characters, lone UTF-16 surrogates such as the JSON escape ``"\\ud83c"``) is refused
here, naming the file, the line and the field, before anything is rendered.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from spmd_diff.config import PER_ITEM_VIDEO_KEYS, video_value_problem
from spmd_diff.errors import UserError, did_you_mean

MAX_ID_LENGTH = 256
_KEYS = ("id", "prompt", "negative_prompt", "seed", "image", *PER_ITEM_VIDEO_KEYS)
_TEXT_ID_DIGITS = 16
BOM = "\ufeff"


@dataclass(frozen=True)
class Item:
    """One video to render. ``index`` is the item's position in the prompts file (0-based)."""

    index: int
    id: str
    prompt: str
    negative_prompt: str | None
    seed: int
    image: str | None = None
    """Image-to-video: the absolute path of the conditioning image (JSONL ``image``); None for text-to-video."""
    height: int | None = None
    """The item's own ``video.height`` (JSONL ``height``); None: the job's. Likewise the four below."""
    width: int | None = None
    num_frames: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    where: str = ""
    """``<prompts file>:<line>`` the item comes from: what an error about its settings names."""


def unstorable_text(text: str) -> str | None:
    """Why HDF5 cannot store ``text`` as a UTF-8 string (a NUL, a lone surrogate), or None if it can."""
    position = text.find("\x00")
    if position >= 0:
        return f"a NUL character (\\u0000) at character {position + 1}"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (f"a lone UTF-16 surrogate (\\u{ord(text[exc.start]):04x}) at character {exc.start + 1}: "
                "JSON escapes of characters beyond U+FFFF must come in pairs, e.g. \\ud83c\\udf05")
    return None


def _check_text(text: str, field: str, where: str) -> None:
    problem = unstorable_text(text)
    if problem is not None:
        raise UserError(f"{where}: {field} contains {problem}; HDF5 cannot store it")


def _check_id(item_id: str, where: str) -> None:
    _check_text(item_id, "id", where)
    if not item_id or item_id.strip() != item_id:
        raise UserError(f"{where}: id {item_id!r} is empty or has leading/trailing spaces")
    if "/" in item_id or item_id in (".", ".."):
        raise UserError(f"{where}: id {item_id!r} may not contain '/', nor be '.' or '..' "
                        "(it names an HDF5 path /videos/<id>)")
    if len(item_id) > MAX_ID_LENGTH:
        raise UserError(f"{where}: id is {len(item_id)} characters long; at most {MAX_ID_LENGTH}")


def _check_seed(seed, where: str) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"{where}: seed must be an integer, got {type(seed).__name__} {seed!r}")
    if not 0 <= seed < 2**63:
        raise UserError(f"{where}: seed must be in [0, 2^63), got {seed}")
    return seed


def _object_without_duplicate_keys(where: str):
    def hook(pairs: list[tuple[str, object]]) -> dict:
        obj: dict = {}
        for key, value in pairs:
            if key in obj:
                raise UserError(f"{where}: key {key!r} appears twice in one object")
            obj[key] = value
        return obj

    return hook


def _parse_json_line(line: str, index: int, base_seed: int, where: str, folder: str) -> Item:
    try:
        obj = json.loads(line, object_pairs_hook=_object_without_duplicate_keys(where))
    except json.JSONDecodeError as exc:
        at = "" if exc.msg.endswith(" at") else " at"  # "Unterminated string starting at" names a place itself
        raise UserError(f"{where}: not valid JSON ({exc.msg}{at} column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object {{\"id\": ..., \"prompt\": ...}}, got {type(obj).__name__}")
    for key in obj:
        if key not in _KEYS:
            _check_text(key, "a key", where)
            raise UserError(f"{where}: unknown key {key!r}{did_you_mean(key, _KEYS)}")
    item_id = obj.get("id", str(index))
    if not isinstance(item_id, str):
        raise UserError(f"{where}: id must be a string, got {type(item_id).__name__} {item_id!r}")
    _check_id(item_id, where)
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError(f"{where}: prompt must be a non-empty string, got {prompt!r}")
    _check_text(prompt, "prompt", where)
    negative = obj.get("negative_prompt")
    if negative is not None:
        if not isinstance(negative, str):
            raise UserError(f"{where}: negative_prompt must be a string, got {type(negative).__name__}")
        _check_text(negative, "negative_prompt", where)
    seed = _check_seed(obj["seed"], where) if "seed" in obj else base_seed + index
    image = obj.get("image")
    if image is not None:
        if not isinstance(image, str) or not image.strip():
            raise UserError(f"{where}: image must be a non-empty string (a file path), got {image!r}")
        _check_text(image, "image", where)
        image = os.path.abspath(os.path.join(folder, os.path.expanduser(image)))
    own = {}
    for name in PER_ITEM_VIDEO_KEYS:
        if name in obj:
            problem = video_value_problem(name, obj[name])
            if problem:
                raise UserError(f"{where}: {name} {problem}")
            own[name] = float(obj[name]) if name == "guidance_scale" else obj[name]
    return Item(index, item_id, prompt, negative, seed, image, **own, where=where)


def text_item_id(text: str, occurrence: int) -> str:
    """The id of the ``occurrence``-th (1-based) line of a plain-text prompts file whose text is ``text``."""
    digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:_TEXT_ID_DIGITS]
    return digest if occurrence == 1 else f"{digest}.{occurrence}"


def text_item_seed(item_id: str, base_seed: int) -> int:
    """The seed of a plain-text item: ``run.seed`` plus a number drawn from its id (not from its line number)."""
    offset = int.from_bytes(hashlib.sha1(item_id.encode("utf-8")).digest()[:8], "big")
    return (base_seed + offset) % 2**63


def parse_prompts(text: str, source: str, base_seed: int, fmt: str = "auto") -> list[Item]:
    """Items from the text of a prompts file. ``fmt``: "jsonl", "text", or "auto" (from the file's suffix:
    .jsonl/.ndjson/.json are JSONL, .txt is text; otherwise JSONL if the first non-blank line starts with '{').
    A leading UTF-8 byte-order mark is ignored."""
    if text.startswith(BOM):
        text = text[1:]
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise UserError(f"{source}: no prompts (the file is empty)")
    first = next(line for line in lines if line.strip())
    if fmt == "auto":
        suffix = Path(source).suffix.lower()
        fmt = "jsonl" if suffix in (".jsonl", ".ndjson", ".json") else "text" if suffix == ".txt" else \
            ("jsonl" if first.lstrip().startswith("{") else "text")
    is_jsonl = fmt == "jsonl"
    items: list[Item] = []
    seen: dict[str, int] = {}
    occurrences: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        where = f"{source}:{number}"
        if not line.strip():
            raise UserError(f"{where}: empty line (remove it; every line is one item)")
        index = len(items)
        if is_jsonl:
            item = _parse_json_line(line, index, base_seed, where, os.path.dirname(os.path.abspath(source)))
        else:
            prompt = line.strip()
            _check_text(prompt, "the prompt", where)
            occurrences[prompt] = occurrences.get(prompt, 0) + 1
            item_id = text_item_id(prompt, occurrences[prompt])
            item = Item(index, item_id, prompt, None, text_item_seed(item_id, base_seed), where=where)
        if item.id in seen:
            raise UserError(f"{where}: duplicate id {item.id!r} (first on line {seen[item.id]})")
        seen[item.id] = number
        items.append(item)
    return items


def load_prompts(path: str | Path, base_seed: int) -> list[Item]:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"prompts file {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"prompts file {path} is a directory") from None
    except OSError as exc:
        raise UserError(f"cannot read prompts file {path}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        if data.startswith((b"\xff\xfe", b"\xfe\xff")):
            raise UserError(f"prompts file {path} is UTF-16 (it starts with a UTF-16 byte-order mark); "
                            "save it as UTF-8") from None
        raise UserError(f"prompts file {path} is not UTF-8 text (line {line}, byte {exc.start}: "
                        f"{data[exc.start:exc.start + 1]!r})") from None
    return parse_prompts(text, str(path), base_seed)


def shard_items(items: list[Item], shard: tuple[int, int] | None) -> list[Item]:
    """Items of array task I of N (index % N == I)."""
    if shard is None:
        return items
    index, count = shard
    return [item for item in items if item.index % count == index]


def parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if count < 1 or not 0 <= index < count:
        raise UserError(f"--shard {text!r}: need 0 <= I < N")
    return index, count
