"""Start a world of CPU ranks (gloo on 127.0.0.1, a free port, a timeout) and collect what each returns.

Processes are spawned, not forked (OpenMP in the parent is not fork-safe). A
rank that raises reports its traceback; a world that outlives the timeout is
killed and the test fails, so a hang can never pass.
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


def _worker(rank, world_size, port, fn, args, queue, timeout_s):
    import torch
    import torch.distributed as dist

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


def run_world(world_size: int, fn, *args, timeout_s: float = DEFAULT_TIMEOUT_S):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` ranks; return the results in rank order."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, timeout_s), daemon=True)
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
