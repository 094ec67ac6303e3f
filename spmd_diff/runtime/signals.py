"""Stop requests: SIGTERM, SIGINT, SIGUSR1 (Slurm's time-limit warning) ask the job to stop after the items in
flight; a second SIGINT aborts at once (every finished item is already safe on disk, the store stays consistent)."""

from __future__ import annotations

import os
import signal
import sys
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: "try again" - the Slurm scripts requeue on it


class StopFlag:
    """Set by a signal handler, polled by the role loops between items. ``install()``/``uninstall()``."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self.when = 0.0
        self._previous: dict[int, object] = {}

    def install(self) -> "StopFlag":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def request(self, reason: str) -> None:
        if not self.requested:
            self.requested, self.signal_name, self.when = True, reason, time.time()

    def _handle(self, signum: int, _frame) -> None:
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            sys.stderr.write(f"spmd-diff: second {name}: aborting now (finished items are safe on disk)\n")
            sys.stderr.flush()
            os._exit(130)
        if not self.requested:
            sys.stderr.write(f"spmd-diff: {name} received: finishing the items in flight, then stopping "
                             f"(exit {EXIT_INTERRUPTED}; rerun or requeue to resume)\n")
            sys.stderr.flush()
        self.request(name)
