"""Fault injection for testing recovery: ``RING_FLASH_ATTN_TRAIN_FAULT="<action>@<step>:<rank>"``.

``kill@5:1``  rank 1 SIGKILLs itself as step 5 starts (a crashed node);
``hang@3:0``  rank 0 stops answering at step 3 (a stuck node): the others must fail within the timeout;
``term@4:1``  rank 1 gets SIGTERM at step 4 (a preempted job): every rank must stop after step 4 with a checkpoint;
``oom@1:1:4096``  rank 1 raises torch.OutOfMemoryError as step 1 starts when data.seq_len is 4096 or more
(``ring-attn capacity``'s trials; without the third number, at any length).

It fires only in the first attempt of an elastic job (``TORCHELASTIC_RESTART_COUNT`` unset or 0), so the
restarted run can show that it recovers. Unset, it does nothing.
"""

from __future__ import annotations

import os
import re
import signal
import time
from typing import Optional, Tuple

ENV_VAR = "RING_FLASH_ATTN_TRAIN_FAULT"
_SPEC = re.compile(r"^(kill|hang|term|oom)@(\d+):(\d+)(?::(\d+))?$")


def parse(spec: Optional[str]) -> Optional[Tuple[str, int, int, int]]:
    """(action, step, rank, the shortest data.seq_len it fires at)."""
    if not spec:
        return None
    match = _SPEC.match(spec)
    if not match or (match.group(4) and match.group(1) != "oom"):
        raise ValueError(f"{ENV_VAR}: expected '<kill|hang|term>@<step>:<rank>' or 'oom@<step>:<rank>[:<seq_len>]', "
                         f"got {spec!r}")
    return match.group(1), int(match.group(2)), int(match.group(3)), int(match.group(4) or 0)


class FaultInjector:
    def __init__(self, rank: int, seq_len: int = 0):
        fault = parse(os.environ.get(ENV_VAR))
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        chosen = fault is not None and fault[2] == rank and seq_len >= fault[3]
        self._fault = fault if chosen and first_attempt else None

    def at_step(self, step: int) -> None:
        if self._fault is None or self._fault[1] != step:
            return
        action = self._fault[0]
        print(f"{ENV_VAR}: injecting '{action}' at step {step}", flush=True)
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "term":
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if action == "oom":
            import torch

            raise torch.OutOfMemoryError(f"{ENV_VAR}: injected out of memory at step {step}")
        while True:  # hang: alive but silent, like a stuck device or a network partition
            time.sleep(3600)
