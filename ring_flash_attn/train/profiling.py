"""``ring-attn train --profile N``: a PyTorch profiler trace of N training steps after warm-up.

Steps ``log.profile_after + 1`` to ``log.profile_after + N`` of the run (the first steps compile, allocate
and tune kernels, which a steady step does not) are recorded on every rank, CPU and accelerator activity
with shapes, and written as a Chrome trace (open it in https://ui.perfetto.dev or chrome://tracing) to
``<log.dir>/profile/rank<N>.json``. Rank 0 then prints the ops that took the most time on the device (on a
CPU run: on the host), so a first answer to "where does a step's time go" needs no viewer.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import torch

TOP_OPS = 25


def _activities(device: torch.device):
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    elif device.type == "xpu":
        activities.append(torch.profiler.ProfilerActivity.XPU)
    return activities


def top_ops_table(profile, device: torch.device, rows: int = TOP_OPS) -> str:
    sort_by = "self_cpu_time_total" if device.type == "cpu" else "self_device_time_total"
    return profile.key_averages().table(sort_by=sort_by, row_limit=rows, max_name_column_width=60)


class StepProfiler:
    """Profiles ``steps`` steps after ``after`` warm-up steps of this run (counted from its first step)."""

    def __init__(self, steps: int, after: int, device: torch.device, rank: int, log_dir: Path):
        self.device, self.rank = device, rank
        self.trace = log_dir / "profile" / f"rank{rank:05d}.json"
        self._profile: Optional[torch.profiler.profile] = None
        self._stack = contextlib.ExitStack()
        if steps > 0:
            schedule = torch.profiler.schedule(wait=max(0, after - 1), warmup=min(1, after), active=steps,
                                               repeat=1)
            self._profile = torch.profiler.profile(activities=_activities(device), schedule=schedule,
                                                   record_shapes=True, on_trace_ready=self._ready)

    def __enter__(self) -> "StepProfiler":
        if self._profile is not None:
            self._stack.enter_context(self._profile)
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def step_done(self) -> None:
        if self._profile is not None:
            self._profile.step()

    def _ready(self, profile) -> None:
        self.trace.parent.mkdir(parents=True, exist_ok=True)
        profile.export_chrome_trace(str(self.trace))
        if self.rank == 0:
            where = "host" if self.device.type == "cpu" else "device"
            print(f"profile: trace of rank 0 in {self.trace} (every rank writes its own); top ops by self {where} "
                  f"time:\n{top_ops_table(profile, self.device)}", flush=True)
