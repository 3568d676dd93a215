"""One writing job per output folder, on local disk and on S3: an exclusive lock file created atomically.

    lock = OutputLock(fs, root, job="clean")
    lock.acquire("s3://bkt/out")         # OutputLocked (a ValueError) when another job holds the folder
    try:
        ...                              # write, sweep, commit the marker
    finally:
        lock.release()

The lock `_lock.json` names its holder (job id, host, pid, start time). It is created with an exclusive create: a hard
link of a fully written file locally, a conditional PUT (`If-None-Match: *`) on S3, so of two jobs that start together
exactly one gets it. It is removed when the job ends, also on an error or Ctrl-C / SIGTERM (the CLI turns both into
exceptions: exit 130 / 143, `process_exit`); the loser of a race exits 2 with the holder named (`OutputLocked`). A job killed outright leaves it behind: a lock whose holder ran on this host under a pid that is no
longer alive is stale and taken over; any other lock is reported with its holder, and removing it is the user's call.
"""
from __future__ import annotations

import json
import os
import posixpath
import socket
import time
import uuid

from fsspec.implementations.local import LocalFileSystem

LOCK_FILE = "_lock.json"


class OutputLocked(ValueError):
    """Another job holds the output folder (message names it and how to clear a dead one's lock)."""


def _create_exclusive(fs, path: str, data: bytes) -> bool:
    """Create `path` holding `data` unless it exists; True when this call created it."""
    if isinstance(fs, LocalFileSystem):
        # write a private file, then hard-link it into place: the link is the atomic, exclusive step, so a rival that
        # loses the race always reads a whole holder record (never the empty file an `open(..., "x")` shows first)
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        staged = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(staged, "wb") as f:
            f.write(data)
        try:
            os.link(staged, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(staged)
    try:
        fs.pipe_file(path, data, mode="create")
        return True
    except (FileExistsError, OSError) as e:
        if fs.exists(path):
            return False
        raise e


def _read(fs, path: str) -> dict | None:
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read())
    except (FileNotFoundError, ValueError):
        return None


def _dead_here(holder: dict) -> bool:
    """The holder ran on this host and its process is gone."""
    if holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(holder.get("pid", -1)), 0)
        return False
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, OSError):
        return False


class OutputLock:
    """The exclusive lock of one output folder (see module docstring); `job_id` names this holder."""

    def __init__(self, fs, root: str, job: str):
        self.fs, self.path = fs, posixpath.join(root, LOCK_FILE)
        self.holder = {"job": job, "job_id": uuid.uuid4().hex[:12], "host": socket.gethostname(),
                       "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.held = False

    @property
    def job_id(self) -> str:
        return self.holder["job_id"]

    def acquire(self, display: str) -> None:
        data = json.dumps(self.holder, sort_keys=True).encode()
        for _ in range(2):
            if _create_exclusive(self.fs, self.path, data):
                self.held = True
                return
            other = _read(self.fs, self.path)
            if other is not None and _dead_here(other):
                self.fs.rm(self.path)            # stale: its holder died on this host; try once more
                continue
            break
        who = (f"job {other['job_id']} ({other.get('job')}, host {other.get('host')}, pid {other.get('pid')}, "
               f"since {other.get('started')})" if other else "another job")
        raise OutputLocked(f"{display} is being written by {who}; wait for it, or choose another --out. If that job "
                           f"is dead, delete {display.rstrip('/')}/{LOCK_FILE} and rerun to resume.")

    def release(self) -> None:
        if self.held:
            current = _read(self.fs, self.path)
            if current is not None and current.get("job_id") == self.job_id:
                self.fs.rm(self.path)
            self.held = False
