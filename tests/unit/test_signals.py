"""Stop signals: the first SIGTERM/SIGINT/SIGUSR1 asks for a clean stop; a second SIGINT aborts at once."""

import signal
import subprocess
import sys
import time

SCRIPT = """
import sys, time
from spmd_diff.runtime.signals import StopFlag
flag = StopFlag().install()
print("ready", flush=True)
while not flag.requested:
    time.sleep(0.01)
print("stop requested by", flag.signal_name, flush=True)
time.sleep(30)  # "finishing the items in flight"
print("finished", flush=True)
"""


def _start():
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_first_signal_requests_a_stop_second_sigint_aborts():
    proc = _start()
    proc.send_signal(signal.SIGINT)
    assert proc.stdout.readline().strip() == "stop requested by SIGINT"
    assert proc.poll() is None, "the first SIGINT must not kill the process"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 130 and "finished" not in out
    assert "second SIGINT: aborting now" in err and "finishing the items in flight" in err


def test_sigterm_and_usr1_only_request_a_stop():
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        proc = _start()
        proc.send_signal(sig)
        assert proc.stdout.readline().strip() == f"stop requested by {signal.Signals(sig).name}"
        proc.send_signal(sig)  # a repeated TERM/USR1 changes nothing
        time.sleep(0.3)
        assert proc.poll() is None
        proc.kill()
        proc.communicate(timeout=10)
