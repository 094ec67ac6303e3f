"""Planning a run (rank 0): which of the prompts file's items to render, and when to refuse.

An item whose content (identity) is in OUT is done once its file passes the quick check; one whose id is in OUT
with another content is *changed*: the run is refused, listing each changed id and what changed, unless
``--force``, which deletes the old versions and renders those items again. A job whose settings differ from the
ones OUT records (job.json) is refused the same way, so OUT does not silently mix settings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Mapping

from spmd_diff.errors import UserError
from spmd_diff.io import itemfile, jobrecord
from spmd_diff.io.identity import describe_changes, identity_of
from spmd_diff.io.itemfile import CorruptItem
from spmd_diff.io.store import MAX_LISTED, CorruptFile, ItemRef, VideoStore, atomic_write_text, item_key


@dataclass
class RunPlan:
    """What a run will do, decided by rank 0 under the OUT lock."""

    pending: list[str]
    done: int
    corrupt: list[CorruptFile] = field(default_factory=list)
    rerendered: list[str] = field(default_factory=list)  # changed items re-rendered because of --force
    stale_failures: int = 0  # failure records of items whose content changed since (rendered again)


def plan_run(store: VideoStore, expected: Mapping[str, Mapping], settings: Mapping | None, *, force: bool = False,
             retry_failed: bool = False, apply: bool = False, model_path: str = "",
             job: Mapping | None = None) -> RunPlan:
    """Decide which of ``expected`` (item id -> attributes) to render; rank 0 of a run.

    Refuses (UserError, OUT untouched) when OUT holds the older layout, or videos of other settings, or other
    versions of some of these items (each listed with what changed) - unless ``force``, which re-renders
    exactly the changed items (their old files are deleted). With ``apply`` (under the OUT lock) it also
    records store.json and job.json, removes stale temporaries and superseded files, quick-checks the
    finished files of these items and moves corrupt ones aside; without, it writes nothing and returns what it
    would do (corrupt files stay where they are but count as not done).
    """
    store.refuse_legacy()
    store.read_token()  # an unreadable store.json is refused before anything is written
    refs = store.item_refs()
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
    old_record = jobrecord.read(store.job_path)
    settings_diff = jobrecord.difference(old_record, settings) if settings is not None else None
    if (changed or settings_diff) and not force:
        raise UserError(_refusal(store, settings_diff, changed, expected))
    if apply:
        store.items_dir.mkdir(parents=True, exist_ok=True)
        store.failed_dir.mkdir(exist_ok=True)
        store.token  # noqa: B018 - makes store.json (the token every item file name ends with) if it is missing
        if settings is not None:
            new_record = jobrecord.updated(old_record, settings, model_path, job or {})
            if new_record != old_record:
                atomic_write_text(store.job_path, json.dumps(new_record, indent=2, sort_keys=True) + "\n")
        store.remove_stale_temporaries()
    plan = RunPlan([], 0)
    done: set[str] = set()
    for item_id, files in changed.items():  # --force: the old versions go; the item is rendered again
        if apply:
            for ref in files:
                ref.path.unlink(missing_ok=True)
        plan.rerendered.append(item_id)
    for item_id, files in candidates.items():
        for ref in files:
            if ref.identity != identities[item_id]:
                if apply:
                    ref.path.unlink(missing_ok=True)  # superseded: a newer version of the item is here
                continue
            if item_id in done:
                continue
            try:
                store.check_header(ref)
            except CorruptItem as exc:
                plan.corrupt.append(store.quarantine(ref, str(exc), item_id, move=apply))
            else:
                done.add(item_id)
    failures = {} if retry_failed else store.failures()
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


def _refusal(store: VideoStore, settings_diff: str | None, changed: Mapping[str, list[ItemRef]],
             expected: Mapping[str, Mapping]) -> str:
    parts = []
    if settings_diff:
        parts.append(f"{store.root} holds videos of a different job configuration ({settings_diff})")
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
        parts.append(f"{'it' if parts else store.root} holds other versions of {len(changed)} item(s) of this "
                     f"prompts file: {', '.join(listed)}{more}")
    if any("seed: " in item for item in parts[-1:]):
        parts[-1] += (" (a JSONL item without a \"seed\" gets run.seed + its line index, so adding, removing "
                      "or moving lines above it changes its seed: give items their own \"seed\")")
    action = (f"--force to re-render exactly those {len(changed)} item(s) (their old videos are deleted)"
              if changed else "--force to add videos with these settings (each video's attributes record its "
              "own)")
    return "; ".join(parts) + f". Use another --out, or {action}"

