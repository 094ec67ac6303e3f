"""The prompts file: JSONL (one object per item) or plain text (one prompt per line).

Errors name the file and the 1-based line. Every rank parses the same file the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from spmd_diff.errors import UserError, did_you_mean

MAX_ID_LENGTH = 256
_KEYS = ("id", "prompt", "negative_prompt", "seed")


@dataclass(frozen=True)
class Item:
    """One video to render. ``index`` is the item's position in the prompts file (0-based)."""

    index: int
    id: str
    prompt: str
    negative_prompt: str | None
    seed: int


def _check_id(item_id: str, where: str) -> None:
    if not item_id or item_id.strip() != item_id:
        raise UserError(f"{where}: id {item_id!r} is empty or has leading/trailing spaces")
    if "/" in item_id or "\x00" in item_id or item_id in (".", ".."):
        raise UserError(f"{where}: id {item_id!r} may not contain '/' or NUL, nor be '.' or '..' "
                        "(it names an HDF5 path /videos/<id>)")
    if len(item_id) > MAX_ID_LENGTH:
        raise UserError(f"{where}: id is {len(item_id)} characters long; at most {MAX_ID_LENGTH}")


def _check_seed(seed, where: str) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"{where}: seed must be an integer, got {type(seed).__name__} {seed!r}")
    if not 0 <= seed < 2**63:
        raise UserError(f"{where}: seed must be in [0, 2^63), got {seed}")
    return seed


def _parse_json_line(line: str, index: int, base_seed: int, where: str) -> Item:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object {{\"id\": ..., \"prompt\": ...}}, got {type(obj).__name__}")
    for key in obj:
        if key not in _KEYS:
            raise UserError(f"{where}: unknown key {key!r}{did_you_mean(key, _KEYS)}")
    item_id = obj.get("id", str(index))
    if not isinstance(item_id, str):
        raise UserError(f"{where}: id must be a string, got {type(item_id).__name__} {item_id!r}")
    _check_id(item_id, where)
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError(f"{where}: prompt must be a non-empty string, got {prompt!r}")
    negative = obj.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise UserError(f"{where}: negative_prompt must be a string, got {type(negative).__name__}")
    seed = _check_seed(obj["seed"], where) if "seed" in obj else base_seed + index
    return Item(index, item_id, prompt, negative, seed)


def parse_prompts(text: str, source: str, base_seed: int, fmt: str = "auto") -> list[Item]:
    """Items from the text of a prompts file. ``fmt``: "jsonl", "text", or "auto" (from the file's suffix:
    .jsonl/.ndjson/.json are JSONL, .txt is text; otherwise JSONL if the first non-blank line starts with '{')."""
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
    for number, line in enumerate(lines, start=1):
        where = f"{source}:{number}"
        if not line.strip():
            raise UserError(f"{where}: empty line (remove it; every line is one item)")
        index = len(items)
        if is_jsonl:
            item = _parse_json_line(line, index, base_seed, where)
        else:
            if "\x00" in line:
                raise UserError(f"{where}: NUL byte in prompt")
            item = Item(index, str(index), line.strip(), None, base_seed + index)
        if item.id in seen:
            raise UserError(f"{where}: duplicate id {item.id!r} (first on line {seen[item.id]})")
        seen[item.id] = number
        items.append(item)
    return items


def load_prompts(path: str | Path, base_seed: int) -> list[Item]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"prompts file {path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"prompts file {path} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise UserError(f"cannot read prompts file {path}: {exc}") from None
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
