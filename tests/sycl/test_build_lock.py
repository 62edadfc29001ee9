"""An interrupted SYCL test build does not block later runs (issue 13, item 6).

The compile is replaced by a stand-in that takes ``torch.utils.cpp_extension``'s
own ``FileBaton`` on ``<build dir>/lock`` exactly as ``load`` does, so the test runs
in seconds without AdaptiveCpp. A first build (its own process) is killed with
SIGKILL while it holds the baton; a second build must then complete.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

from torch.utils.file_baton import FileBaton

from .acpp_build import build_exclusively

REPO = Path(__file__).resolve().parents[2]


def stand_in_build(build_dir: Path, seconds: float) -> None:
    """What cpp_extension.load does around the compile, with a sleep for the compile."""
    baton = FileBaton(str(build_dir / "lock"))
    if baton.try_acquire():
        try:
            time.sleep(seconds)
            (build_dir / "module.so").write_text("built")
        finally:
            baton.release()
    else:
        baton.wait()


FIRST_BUILD = ("import sys; from pathlib import Path; from tests.sycl.acpp_build import build_exclusively; "
               "from tests.sycl.test_build_lock import stand_in_build; d = Path(sys.argv[1]); "
               "build_exclusively(d, lambda: stand_in_build(d, 60))")


def _kill_a_build_midway(build_dir: Path) -> None:
    first = subprocess.Popen([sys.executable, "-c", FIRST_BUILD, str(build_dir)], cwd=REPO)
    deadline = time.monotonic() + 60
    try:
        while not (build_dir / "lock").exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first build never took the lock"
            time.sleep(0.05)
    finally:
        first.kill()
        first.wait(timeout=10)
    assert (build_dir / "lock").exists() and not (build_dir / "module.so").exists()


def _in_thread(fn):
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread


def test_a_killed_build_leaves_a_stale_lock_and_the_next_build_clears_it(tmp_path):
    _kill_a_build_midway(tmp_path)

    bare = _in_thread(lambda: stand_in_build(tmp_path, 0))  # the baton alone, as every later run did before
    bare.join(timeout=2)
    assert bare.is_alive(), "the stand-in should wait on the stale lock like cpp_extension.load"

    second = _in_thread(lambda: build_exclusively(tmp_path, lambda: stand_in_build(tmp_path, 0)))
    second.join(timeout=30)
    assert not second.is_alive(), "the second build waited on the stale lock"
    assert (tmp_path / "module.so").read_text() == "built" and not (tmp_path / "lock").exists()
    bare.join(timeout=5)  # the lock is gone, so the bare waiter returns too
    assert not bare.is_alive()
