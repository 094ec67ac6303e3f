"""Observing a job: per-rank event logs, live progress, the timeline report, video export and store inspection.

Import the pieces from their modules (``spmd_diff.observe.events`` ...); this package imports nothing heavy
(matplotlib, imageio) until a function that needs it is called.
"""

from __future__ import annotations

from spmd_diff.observe.events import EventLog, merge_event_logs, read_events
from spmd_diff.observe.progress import Progress, parse_progress_line

__all__ = ["EventLog", "merge_event_logs", "read_events", "Progress", "parse_progress_line"]
