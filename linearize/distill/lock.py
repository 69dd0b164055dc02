"""One run per output folder: `linearize distill` holds `output_dir/distill.lock` while it runs.

The lock file is created with O_EXCL and holds the owner's pid, host and start time. A second
run on the same folder is refused with the owner named. A lock whose process is gone (killed,
crashed) is stale: it is taken over with a warning. Only the main process of a launch locks. A lock
written on another host is always held (its pid cannot be checked from here). Two runs that
find the same stale lock at the same instant may both take it over: the window is the time
between reading the lock and creating the new one.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = "distill.lock"
# a lock file that cannot be parsed may be one being written right now: held for this long
UNREADABLE_GRACE_S = 30.0


class OutputLockedError(RuntimeError):
    """Another live run holds the output folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _owner(path: Path) -> dict | None:
    """The lock's {pid, host, started} or None when it cannot be read."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("pid"), int) else None


def stale_reason(path: Path) -> str | None:
    """Why the lock at `path` is stale (its process is gone), or None while it is held."""
    owner = _owner(path)
    if owner is None:
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return "it was just released"
        return f"it is unreadable and {age:.0f} s old" if age > UNREADABLE_GRACE_S else None
    if owner.get("host") != socket.gethostname():
        return None  # another machine's process cannot be checked: held
    return None if _alive(owner["pid"]) else f"its process {owner['pid']} is not running"


class OutputLock:
    """`with OutputLock(out, say):` holds `out/distill.lock` for the block.

    Creates `out` (and removes it again on release when the block left it empty). Raises
    OutputLockedError naming the owner when a live run holds it; `say` gets a warning when a
    stale lock is taken over.
    """

    def __init__(self, out: Path, say=print, enabled: bool = True):
        self.path = Path(out) / LOCK_FILE
        self.say = say
        self.enabled = enabled
        self.held = False
        self.created = False

    def acquire(self) -> None:
        self.created = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                why = stale_reason(self.path)
                if why is None:
                    raise OutputLockedError(self.refusal()) from None
                self.say(f"warning: removing the stale lock {self.path} ({why})")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(record)
            self.held = True
            return
        raise OutputLockedError(self.refusal())

    def refusal(self) -> str:
        owner = _owner(self.path) or {}
        who = (f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}" if owner
               else "a process that is writing its lock now")
        return (f"output_dir {self.path.parent} is in use by another linearize distill ({who}): wait for it to "
                "finish or choose another output_dir. If no such run is alive (e.g. on another machine), delete "
                f"{self.path}")

    def release(self) -> None:
        if self.held and (_owner(self.path) or {}).get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
            if self.created:
                with contextlib.suppress(OSError):  # not empty: the run wrote something
                    self.path.parent.rmdir()
        self.held = False

    def __enter__(self) -> OutputLock:
        if self.enabled:
            self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
