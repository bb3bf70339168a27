"""StopSignals: a stop signal always ends the wait, whenever it lands (no handler deadlock)."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# busy loop: most of the time is spent in Python code around the wait, where a handler that took
# the waiter's lock (the former threading.Event.set() handler) deadlocked in ~40 % of the runs
BUSY = """
import sys
from dicomnode.commands.stopsignal import StopSignals
stop = StopSignals()
print("ready", flush=True)
while not stop.wait(0):
    pass
stop.close()
print("stopped", stop.received, flush=True)
"""

BLOCKED = """
import time
from dicomnode.commands.stopsignal import StopSignals
stop = StopSignals()
print("ready", flush=True)
t0 = time.monotonic()
got = stop.wait(30.0)
print("stopped", got, stop.received, round(time.monotonic() - t0, 3), flush=True)
"""


def _run_and_signal(code: str, sig: signal.Signals, delay_s: float) -> str:
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(delay_s)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=10)
        assert proc.returncode == 0
        return out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_signal_during_busy_waiting_always_stops() -> None:
    for i in range(15):
        out = _run_and_signal(BUSY, signal.SIGTERM, 0.02 + 0.01 * i)
        assert out.split() == ["stopped", str(int(signal.SIGTERM))]


def test_signal_ends_a_long_wait_at_once() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        words = _run_and_signal(BLOCKED, sig, 0.2).split()
        assert words[:3] == ["stopped", "True", str(int(sig))]
        assert float(words[3]) < 10.0  # woken by the signal, not by the 30 s timeout
