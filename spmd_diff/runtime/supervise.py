"""``spmd-diff launch LAUNCHER ...``: run mpirun or srun so that Ctrl-C and SIGTERM stop the job gracefully.

Neither launcher can be told to pass SIGINT or SIGTERM on to the ranks and wait: Open MPI's mpirun (4.x and 5.x)
turns either into an abort (SIGCONT, SIGTERM, then SIGKILL to every rank a second later, exit status 1; the
``odls_base_sigkill_timeout`` of 4.x only delays both signals, and the status stays 1), and srun turns SIGTERM into
SIGKILL and a single Ctrl-C into a status report. Both *forward* SIGUSR1 to every rank, which spmd-diff treats like
SIGTERM: finish the items in flight, publish the view, exit 75.

So this process starts the launcher in a session of its own (a terminal's Ctrl-C reaches only us, and stdin is
/dev/null so the launcher never reads the terminal) and translates:

- the first SIGINT, SIGTERM or SIGHUP -> SIGUSR1 to the launcher (a graceful stop: exit 75 when items are left);
- a second one -> SIGTERM to the launcher (its abort: the items in flight are lost, finished ones are safe);
- a third -> SIGKILL to the launcher's whole session;
- SIGUSR1 and SIGUSR2 -> passed on as they are.

The exit status is the launcher's (128 + N if a signal N killed it). A launch stopped before the ranks installed
their handlers dies of the forwarded SIGUSR1 with nothing in flight; that is reported as 75 too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from spmd_diff.errors import UserError

EXIT_INTERRUPTED = 75  # the same as spmd_diff.runtime.signals.EXIT_INTERRUPTED (no heavy import here)
_STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_PASSED_ON = (signal.SIGUSR1, signal.SIGUSR2)


class Supervisor:
    """One launcher child and the signal translation around it. ``run()`` returns the exit status."""

    def __init__(self, command: list[str]) -> None:
        if not command:
            raise UserError("spmd-diff launch: give the launcher command, e.g. "
                            "`spmd-diff launch mpirun -n 4 spmd-diff run JOB --prompts P --out OUT`")
        self.command = command
        self.child: subprocess.Popen | None = None
        self.stops = 0
        self._early: list[int] = []

    def _say(self, text: str) -> None:
        sys.stderr.write(f"spmd-diff launch: {text}\n")
        sys.stderr.flush()

    def _send(self, sig: int) -> None:
        if self.child is None:
            self._early.append(sig)
            return
        try:
            if sig == signal.SIGKILL:
                os.killpg(self.child.pid, signal.SIGKILL)  # the launcher leads its own session and group
            else:
                os.kill(self.child.pid, sig)
        except ProcessLookupError:
            pass

    def _handle(self, signum: int, _frame) -> None:
        name = signal.Signals(signum).name
        if signum in _PASSED_ON:
            self._send(signum)
            return
        self.stops += 1
        if self.stops == 1:
            self._say(f"{name}: asking every rank to finish the items in flight and stop (exit "
                      f"{EXIT_INTERRUPTED}); {name} again to abort at once")
            self._send(signal.SIGUSR1)
        elif self.stops == 2:
            self._say(f"{name} again: aborting the job (finished items are safe; the items in flight are lost)")
            self._send(signal.SIGTERM)
        else:
            self._say(f"{name} a third time: killing the launcher")
            self._send(signal.SIGKILL)

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._handle) for sig in (*_STOPS, *_PASSED_ON)}
        try:
            try:
                self.child = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, start_new_session=True)
            except OSError as exc:
                raise UserError(f"spmd-diff launch: cannot start {self.command[0]!r}: {exc.strerror or exc}") \
                    from None
            for sig in self._early:  # a signal that came while the launcher was starting
                self._send(sig)
            while True:
                try:
                    status = self.child.wait()
                    break
                except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for clarity
                    continue
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self._exit_status(status)

    def _exit_status(self, status: int) -> int:
        if status < 0:
            status = 128 - status
        if self.stops == 1 and status in (128 + signal.SIGUSR1, EXIT_INTERRUPTED):
            return EXIT_INTERRUPTED  # stopped before (or after) the ranks could take the signal: nothing lost
        return status


def launch(command: list[str]) -> int:
    """Run ``command`` (a launcher line) under a Supervisor; returns its exit status."""
    started = time.monotonic()
    supervisor = Supervisor(command)
    status = supervisor.run()
    if supervisor.stops:
        supervisor._say(f"the job ended with status {status} after {time.monotonic() - started:.0f} s")
    return status
