"""The run's directories, claimed by rank 0 before anything else: ``log.dir`` created and locked for the run's
life, ``checkpoint.dir`` created and shown to be writable.

Two runs on one ``log.dir`` would interleave their metrics and race for the same checkpoint names; the second
run must fail at its start, naming the first. Rank 0 holds an exclusive ``flock`` on ``<log.dir>/.lock``
(holding the host, pid and start time of the run) until the run ends; the operating system releases it
when the process dies, however it dies, so a crashed run never leaves a stale lock. On a file system without
``flock`` (some Lustre mounts) the run goes on unlocked and says so.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Optional, TextIO

from .config import ConfigError

LOCK_FILE = ".lock"
PROBE_FILE = ".write_probe"


class RunDirectoryLock:
    """The lock on a log.dir, held while this object is open; :meth:`release` ends it (so does process exit)."""

    def __init__(self, handle: Optional[TextIO], path: Path):
        self._handle, self.path = handle, path

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the file releases its flock
            self._handle = None


def _cause(exc: OSError) -> str:
    return f"{type(exc).__name__}: {exc.strerror or exc}"


def _holder() -> str:
    return (f"host {socket.gethostname()}, pid {os.getpid()}, started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime())}")


def lock_log_dir(log_dir: Path) -> RunDirectoryLock:
    """Create ``log_dir`` if needed and lock it for this process; ConfigError (naming the directory, and the
    run that holds it if one does) when it cannot be created, written or locked."""
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"log.dir {str(log_dir)!r}: cannot create it ({_cause(exc)}); choose a directory this "
                          f"user can write") from None
    path = log_dir / LOCK_FILE
    try:
        handle = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+")
    except OSError as exc:
        raise ConfigError(f"log.dir {str(log_dir)!r}: cannot write in it ({path}: {_cause(exc)}); choose a "
                          f"directory this user can write") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = handle.read().strip() or "holder unknown"
        handle.close()
        raise ConfigError(f"log.dir {str(log_dir)!r} is in use by another run ({holder}; lock file {path}): wait "
                          f"for it to end, or give this run another log.dir") from None
    except OSError as exc:  # flock not supported by this file system
        print(f"log.dir {log_dir}: cannot lock it ({_cause(exc)}): a second run started on this directory would "
              f"not be detected", flush=True)
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(_holder() + "\n")
        handle.flush()
    except OSError as exc:
        handle.close()
        raise ConfigError(f"log.dir {str(log_dir)!r}: cannot write in it ({path}: {_cause(exc)}); free space or "
                          f"choose another log.dir") from None
    return RunDirectoryLock(handle, path)


def check_writable(directory: Path, key: str) -> None:
    """Create ``directory`` if needed and write (then remove) a file in it; ConfigError naming ``key`` if not."""
    probe = directory / PROBE_FILE
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{key} {str(directory)!r}: cannot create or write it ({_cause(exc)}); choose a "
                          f"directory this user can write") from None


def claim(log_dir: Path, checkpoint_dir: Path) -> RunDirectoryLock:
    """Rank 0, at the start of a run: lock log.dir, check checkpoint.dir; release the lock if the check fails."""
    lock = lock_log_dir(log_dir)
    try:
        check_writable(checkpoint_dir, "checkpoint.dir")
    except ConfigError:
        lock.release()
        raise
    return lock
