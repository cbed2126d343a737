"""Per-key lease files: who is computing a key (pid, host, heartbeat). A lease expires by itself."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Optional

LEASE_TTL = 60.0  # seconds without a heartbeat after which a lease is stale
HEARTBEAT = 5.0


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def pid_alive(pid: int) -> bool:
    """True if process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """A per-key lease file that says who is computing a key.

    Keys are content-addressed, so two runs computing the same key is only
    wasted time, never corruption; the lease lets the second run wait and reuse
    the first one's result. A lease whose holder died (same host, pid gone) or
    whose heartbeat is older than ``ttl`` seconds is broken automatically, so no
    manual unlock is ever needed.
    """

    def __init__(self, path: Path, ttl: float = LEASE_TTL, heartbeat: float = HEARTBEAT):
        self.path = Path(path)
        self.ttl = ttl
        self.heartbeat = heartbeat
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.held = False

    def _info(self) -> Optional[dict]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _judge(self) -> tuple[bool, Optional[dict]]:
        """``(stale, what was read)`` for the current lease file."""
        info = self._info()
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return False, None
        if info is None:
            return age > 5.0, None  # a half-written lease older than a few seconds
        try:
            pid = int(info.get("pid", -1))
        except (TypeError, ValueError):
            pid = -1
        if info.get("host") == socket.gethostname() and not pid_alive(pid):
            return True, info
        return age > self.ttl, info

    def stale(self) -> bool:
        """True if the current lease file belongs to a dead process or has no recent heartbeat."""
        return self._judge()[0]

    def _break_stale(self, judged: Optional[dict]) -> bool:
        """Remove the lease file judged stale; return False if it was replaced since the judgement.

        The file is renamed aside first (atomic), then its content is compared with what was judged.
        If another waiter broke the stale lease and took a fresh one in between, we have moved *that*
        lease: it is put back (unless yet another lease appeared), so no holder ever loses its lease.
        """
        aside = self.path.with_name(self.path.name + f".stale.{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except OSError:
            return False  # gone already: someone else broke it
        try:
            moved = json.loads(aside.read_text())
        except (OSError, ValueError):
            moved = None
        same = (moved is None) if judged is None else (moved is not None and moved.get("token") == judged.get("token"))
        if not same:
            with contextlib.suppress(OSError):
                os.link(aside, self.path)  # put the fresh lease back; fails if a newer one exists
        with contextlib.suppress(OSError):
            os.unlink(aside)
        return same

    def try_acquire(self) -> bool:
        """Take the lease if it is free or stale; return whether we hold it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                stale, judged = self._judge()
                if stale:
                    self._break_stale(judged)
                    continue
                return False
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(), "token": self.token, "since": _now()}, f)
            self.held = True
            self._thread = threading.Thread(target=self._beat, daemon=True)
            self._thread.start()
            return True
        return False

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def holder(self) -> Optional[dict]:
        return self._info()

    def release(self) -> None:
        """Give the lease back (only if it is still ours)."""
        self._stop.set()
        if self.held:
            info = self._info()
            if info and info.get("token") == self.token:
                with contextlib.suppress(OSError):
                    self.path.unlink()
            self.held = False
