"""Whether a run whose results.json says "running" is still running, or died without saying so.

A process killed by SIGKILL (the OOM killer, a preempted node) cannot write "failed". So rank 0 records in
results.json where it runs (`host`, `pid`, and the process's start time, which tells a reused pid apart) and a
`heartbeat` (Unix time) that a background thread refreshes every `BEAT_S` seconds, whatever the run is doing
(preparing the corpus, waiting for or training its dense seed, training, saving), and that each logged step
refreshes too. A "running" run is reported as `died` when
- it runs on this host and its process is gone (or the pid now belongs to another process), or
- it runs elsewhere and its heartbeat is older than `STALE_AFTER_S`.
The sweep and `make status` show such runs as `died` and resume them like a killed run.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from dropup.files import write_json_atomic

BEAT_S = 60.0
# a heartbeat this old means the run is gone: 15 missed beats, far longer than any pause of a live process
STALE_AFTER_S = 15 * 60.0


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def here() -> dict:
    """This process's identity, as recorded in results.json."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _start_time(os.getpid()),
            "heartbeat": time.time()}


def _alive_here(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    now = _start_time(pid)
    return started is None or now is None or now == started


def state(results: dict, path: Path | None = None, now: float | None = None) -> str:
    """results["status"], with "running" turned into "died" when its process is gone (module docstring). A
    results.json written before heartbeats existed is judged by the file's modification time."""
    status = results.get("status", "missing")
    if status != "running":
        return status
    if results.get("host") == socket.gethostname() and results.get("pid"):
        return "running" if _alive_here(int(results["pid"]), results.get("pid_start")) else "died"
    beat = results.get("heartbeat")
    if beat is None and path is not None:
        try:
            beat = path.stat().st_mtime
        except OSError:
            return status
    if beat is None:
        return status
    return "died" if (now if now is not None else time.time()) - float(beat) > STALE_AFTER_S else "running"


def alive_elsewhere(results: dict) -> str | None:
    """A description of the live process that is writing this run (on this host), or None."""
    if results.get("status") == "running" and state(results) == "running" and \
            results.get("host") == socket.gethostname() and results.get("pid") not in (None, os.getpid()):
        return f"pid {results['pid']} on {results['host']}"
    return None


class Heartbeat:
    """Writes results.json for rank 0 and keeps its heartbeat fresh from a daemon thread until `stop`. Every
    write goes through `write` under one lock; the thread only touches the file while it still says this
    process is running it."""

    def __init__(self, path: Path, interval_s: float = BEAT_S):
        self.path, self.interval_s = Path(path), interval_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last = 0.0

    def write(self, results: dict) -> None:
        with self._lock:
            if results.get("status") == "running":
                results.update(here())
            write_json_atomic(self.path, results)
            self._last = time.monotonic()

    def beat(self, min_interval_s: float = 5.0) -> None:
        """Refresh the heartbeat now (a logged step), at most every `min_interval_s`."""
        if time.monotonic() - self._last < min_interval_s:
            return
        with self._lock:
            try:
                results = json.loads(self.path.read_text())
            except (OSError, ValueError):
                return
            if results.get("status") != "running" or results.get("pid") != os.getpid():
                return
            results["heartbeat"] = time.time()
            write_json_atomic(self.path, results)
            self._last = time.monotonic()

    def start(self) -> "Heartbeat":
        def loop():
            while not self._stop.wait(self.interval_s):
                self.beat(min_interval_s=0.0)

        self._thread = threading.Thread(target=loop, name="dropup-heartbeat", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
