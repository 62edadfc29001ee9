"""The run's directories, claimed by rank 0 before training: ``log.dir`` and ``checkpoint.dir`` created,
shown to be writable, and locked for the run's life.

Two runs on one ``log.dir`` would interleave their metrics and race for the same checkpoint names, and two on
one ``checkpoint.dir`` (with different log.dirs) would overwrite each other's checkpoints and prune them
(``checkpoint.keep``); the second run must fail at its start, naming the first. Rank 0 holds an exclusive
``flock`` on ``.lock`` in each (holding the host, pid and start time of the run) until the run ends; the
operating system releases it when the process dies, however it dies, so a crashed run never leaves a stale
lock. On a file system without ``flock`` (some Lustre mounts) the run goes on unlocked and says so.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from typing import List, TextIO

from .config import ConfigError

LOCK_FILE = ".lock"
PROBE_FILE = ".write_probe"


class RunDirectoryLock:
    """Locks on a run's directories, held while this object is open; :meth:`release` ends them (so does the end
    of the process)."""

    def __init__(self, handles: List[TextIO]):
        self._handles = handles

    def release(self) -> None:
        for handle in self._handles:
            handle.close()  # closing the file releases its flock
        self._handles = []


def _cause(exc: OSError) -> str:
    return f"{type(exc).__name__}: {exc.strerror or exc}"


def _holder() -> str:
    return (f"host {socket.gethostname()}, pid {os.getpid()}, started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime())}")


def _lock(directory: Path, key: str) -> TextIO:
    """Create ``directory`` if needed and lock it for this process (the open lock file); ConfigError naming
    ``key``, the directory and the run that holds it if one does, when it cannot be created, written or locked."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{key} {str(directory)!r}: cannot create it ({_cause(exc)}); choose a directory this "
                          f"user can write") from None
    path = directory / LOCK_FILE
    try:
        handle = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+")
    except OSError as exc:
        raise ConfigError(f"{key} {str(directory)!r}: cannot write in it ({path}: {_cause(exc)}); choose a "
                          f"directory this user can write") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = handle.read().strip() or "holder unknown"
        handle.close()
        raise ConfigError(f"{key} {str(directory)!r} is in use by another run ({holder}; lock file {path}): wait "
                          f"for it to end, or give this run another {key}") from None
    except OSError as exc:  # flock not supported by this file system
        print(f"{key} {directory}: cannot lock it ({_cause(exc)}): a second run started on this directory would "
              f"not be detected", flush=True)
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(_holder() + "\n")
        handle.flush()
    except OSError as exc:
        handle.close()
        raise ConfigError(f"{key} {str(directory)!r}: cannot write in it ({path}: {_cause(exc)}); free space or "
                          f"choose another {key}") from None
    return handle


def lock_log_dir(log_dir: Path) -> RunDirectoryLock:
    """Create ``log_dir`` and lock it for this process (see _lock)."""
    return RunDirectoryLock([_lock(log_dir, "log.dir")])


def _check_writable(directory: Path, key: str) -> None:
    """Create ``directory`` if needed and write (then remove) a file in it; ConfigError naming ``key`` if not."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / PROBE_FILE).write_text("")
        (directory / PROBE_FILE).unlink()
    except OSError as exc:
        raise ConfigError(f"{key} {str(directory)!r}: cannot create or write it ({_cause(exc)}); choose a "
                          f"directory this user can write") from None


def claim(log_dir: Path, checkpoint_dir: Path) -> RunDirectoryLock:
    """Rank 0, at the start of a run: lock log.dir, and checkpoint.dir unless it is inside log.dir (whose lock
    covers it: then it is only created and written once, so that an unwritable one fails now, not at the
    first save); all or none."""
    handles = [_lock(log_dir, "log.dir")]
    try:
        if log_dir.resolve() in checkpoint_dir.resolve().parents:
            _check_writable(checkpoint_dir, "checkpoint.dir")
        else:
            handles.append(_lock(checkpoint_dir, "checkpoint.dir"))
    except ConfigError:
        RunDirectoryLock(handles).release()
        raise
    return RunDirectoryLock(handles)
