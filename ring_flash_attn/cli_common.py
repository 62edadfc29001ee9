"""What every ``ring-attn`` sub-command shares: its help formatter, how it prints a line on one of many ranks,
and how its process exits.

This module imports nothing but the standard library at import time, so that building the command line
(``ring-attn --help``) does not import torch; the sub-commands (cli.py's dispatch, check.py, bench.py,
train/) import it, and it imports none of them.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional, TextIO


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps a description's line breaks and shows each option's default after its help, except where there
    is none to show (``None``: the help says what happens then)."""

    def _get_help_string(self, action):
        if action.default is None or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def launch_rank() -> Optional[int]:
    """This process's rank when a launcher (torchrun, mpiexec, srun) started it, else None."""
    from .comm.launch import detect_launch  # imports torch (through the comm package): only when asked

    try:
        launch = detect_launch()
    except ValueError:  # a malformed launcher environment is reported by the command itself
        return None
    return launch.rank if launch.launcher != "none" else None


def rank_prefix() -> str:
    """"[rank N] " under a launcher, "" otherwise."""
    rank = launch_rank()
    return "" if rank is None else f"[rank {rank}] "


def write_lines(text: str, stream: Optional[TextIO] = None) -> None:
    """``text`` and a trailing newline in ONE write, then a flush: ranks that share a terminal or a log file
    (torchrun, mpiexec) then never fuse their lines, as ``print`` may (it writes the text and the newline
    separately, and unbuffered streams, ``python -u`` or ``PYTHONUNBUFFERED``, pass each write on at once)."""
    stream = sys.stderr if stream is None else stream
    stream.flush()
    stream.write(text + "\n")
    stream.flush()


def error_line(message: str) -> None:
    """``[rank N] error: message`` on stderr as one line (newlines inside the message become spaces)."""
    write_lines(f"{rank_prefix()}error: {' '.join(message.split())}")


def run(entry: Callable[[], object]) -> None:
    """The process entry point (the ``ring-attn`` script, ``python -m ring_flash_attn``, ``python -m
    ring_flash_attn.train``): ``entry()``, then exit with its code.

    A process that took part in a process group leaves without Python's interpreter finalization. Gloo's
    worker threads may still be dropping their last references to the tensors of a finished collective
    (even after ``destroy_process_group``); a thread that needs the GIL once finalization has begun is
    unwound by the interpreter inside a C++ destructor, and the process dies of ``std::terminate``
    ("terminate called without an active exception", SIGABRT) after a run that passed. Seen once in CI, on
    one rank of a passing 3-rank ``ring-attn check`` (not reproduced in 15 runs here); the same race is
    described upstream (pytorch/pytorch#179291). Everything the commands write is closed by then (the
    trainer waits for its checkpoints); output streams and logging are flushed here.
    """
    try:
        code = entry()
    except SystemExit as leaving:
        code = leaving.code
    except KeyboardInterrupt:
        import traceback

        traceback.print_exc()
        code = 130  # as Python itself exits on an uncaught Ctrl-C
    except BaseException:  # noqa: B036 - printed like an uncaught exception, then the same exit as below
        import traceback

        traceback.print_exc()
        code = 1
    if isinstance(code, str):  # sys.exit("message"): Python prints it and exits 1
        write_lines(code)
        code = 1
    code = 0 if code is None else int(code)
    if not _took_part_in_a_process_group():
        sys.exit(code)
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach it
            pass
    os._exit(code)


def _took_part_in_a_process_group() -> bool:
    if "torch.distributed" not in sys.modules:
        return False
    from .comm.launch import process_group_started

    return process_group_started()
