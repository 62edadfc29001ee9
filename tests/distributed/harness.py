"""Start a world of CPU ranks (gloo on 127.0.0.1, a free port, a timeout) and collect what each returns.

Ranks are forked from a fork server, not from the test process (OpenMP in the test process, which has
run computations, is not fork-safe): the server is started once, imports torch and has run nothing, so
each world starts without paying torch's import per rank (about 2 s of CPU each, the largest part of a
small world's time on CI's 2 cores). A rank that raises reports its traceback; a world that outlives the
timeout is killed and the test fails, so a hang can never pass.
"""

from __future__ import annotations

import os
import socket
import traceback
from datetime import timedelta

import torch.multiprocessing as mp

DEFAULT_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, queue, timeout_s, environ, cwd):
    import torch
    import torch.distributed as dist

    # The fork server's environment and directory are those of its start: take the test's current ones.
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
        result = fn(rank, world_size, *args)
        queue.put((rank, "ok", result))
    except BaseException:  # report everything, including assertion errors, to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


_FORK_SERVER_PRELOAD = ["torch", "torch.distributed"]


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_FORK_SERVER_PRELOAD)
    return ctx


def run_world(world_size: int, fn, *args, timeout_s: float = DEFAULT_TIMEOUT_S):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` ranks; return the results in rank order."""
    ctx = _context()
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, timeout_s, dict(os.environ),
                                               os.getcwd()), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, {}
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout_s)
            (results if status == "ok" else errors)[rank] = payload
    except Exception as exc:  # queue.Empty: some rank never finished
        missing = sorted(set(range(world_size)) - set(results) - set(errors))
        raise AssertionError(f"ranks {missing} did not finish within {timeout_s} s (hang?); "
                             f"errors so far: {errors}") from exc
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("\n".join(f"rank {r} failed:\n{tb}" for r, tb in sorted(errors.items())))
    return [results[r] for r in range(world_size)]
