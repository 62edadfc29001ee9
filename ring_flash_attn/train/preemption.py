"""Stopping cleanly on SIGTERM / SIGINT: finish the step, checkpoint, exit.

Schedulers send SIGTERM before a job's time runs out or when they preempt it
(Slurm, PBS), and Ctrl-C sends SIGINT. The handler only sets a flag; at the end
of every step the ranks agree on it with a MAX all-reduce of one number, so a
signal that reaches a single rank still stops all of them at the same step and
they all save that step's checkpoint. A second Ctrl-C stops at once.

A process stuck in a collective would otherwise ignore SIGTERM (the flag is
never read), and launchers send SIGTERM to the survivors when one rank fails:
if the next step boundary is not reached within ``grace_s`` of the signal, the
process exits there and then.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Optional, Tuple

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(RuntimeError):
    """The run stopped early on a signal, after saving a checkpoint; ``exit_code`` is 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopRequest:
    """Context manager: while active, SIGTERM / SIGINT ask for a stop instead of killing the process."""

    def __init__(self, grace_s: float):
        self.signum: Optional[int] = None
        self.grace_s = grace_s
        self._previous = {}
        self._deadline: Optional[threading.Timer] = None

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # Python only lets the main thread set handlers
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        self._cancel_deadline()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now, without the checkpoint
        self.signum = signum
        print(f"received {signal.Signals(signum).name}: stopping after this step with a checkpoint", flush=True)
        if self._deadline is None:
            self._deadline = threading.Timer(self.grace_s, os._exit, args=(128 + signum,))
            self._deadline.daemon = True
            self._deadline.start()

    def agreed_stop(self, device: torch.device, failed: bool = False) -> Tuple[Optional[int], bool]:
        """(the signal any rank received or None, whether any rank reported ``failed``); every rank calls this at
        the same point of every step: one all-reduce of both, so a rank that cannot go on (rank 0 cannot write
        the metrics log) stops every rank at the same step instead of leaving them waiting for it."""
        flags = torch.tensor([float(self.signum or 0), float(failed)], device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        signum, any_failed = flags.tolist()
        agreed = int(signum) or None
        if agreed is not None or any_failed:
            self._cancel_deadline()  # every rank is alive at the boundary: the checkpoint may take its time
        return agreed, bool(any_failed)
