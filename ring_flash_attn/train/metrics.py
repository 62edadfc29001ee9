"""What a run reports: a JSONL record per step, a progress bar or lines on rank 0, a loss plot at the end."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch

from .config import ConfigError

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
RANK_SUMMARY = "rank{rank:05d}.json"  # each rank's own figures at the end of a run (its peak memory)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this rank: the accelerator's allocator peak, or the process's peak RSS on the CPU."""
    if device.type != "cpu":
        return int(getattr(torch, device.type).max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class MetricsError(ConfigError):
    """A metrics log that cannot be read back (damaged other than by a kill mid-write); names the file and line."""


def read_metrics(path: Path, notice: bool = False) -> List[dict]:
    """The records of a metrics log. A last line without its newline is a record a killed run was writing: it
    is dropped (with a one-line notice when ``notice``); any other line that is not a JSON record is an error."""
    if not path.is_file():
        return []
    text = path.read_text(errors="replace")
    lines = text.split("\n")
    if lines[-1].strip():  # no newline after it: torn by a kill mid-write
        if notice:
            print(f"{path}: dropped its last line, which a killed run left half-written ({len(lines[-1])} bytes)",
                  flush=True)
    records = []
    for number, line in enumerate(lines[:-1], 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            record = exc
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise MetricsError(f"{path}: line {number} is not a step record ({str(record)[:80]!r}); move the file "
                               f"away (or delete that line) to continue")
        records.append(record)
    return records


class MetricsLog:
    """Appends one JSON line per step on rank 0; on resume, drops the records after the checkpoint's step.

    After a crash the log may hold steps past the last checkpoint, and a half-written last line; the resumed run
    recomputes those steps, so they are cut first and the final log has each step exactly once.
    """

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(path, notice=True) if r["step"] <= resume_step]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._handle = open(path, "a")
        self.failure: Optional[str] = None  # why a record could not be written (then nothing more is)

    def write(self, record: dict) -> None:
        """Append ``record``; a write that fails (a full disk) is kept in ``failure`` for the trainer to stop
        every rank with, not raised on rank 0 alone."""
        if self.failure is not None:
            return
        try:
            self._handle.write(json.dumps(record) + "\n")
            self._handle.flush()
        except OSError as exc:
            self.failure = f"cannot write {self.path} ({type(exc).__name__}: {exc.strerror or exc})"

    def close(self) -> None:
        try:
            self._handle.close()
        except OSError:  # flushing what a failed write left in the buffer fails again
            if self.failure is None:
                raise


def _format_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


class Progress:
    """A tqdm bar on a terminal, plain lines otherwise (logs of torchrun / mpiexec jobs), or nothing."""

    def __init__(self, mode: str, total: int, initial: int, every: int):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode, self.every, self.total = mode, every, total
        self._bar = None
        if mode == "bar":
            try:
                from tqdm import tqdm
            except ImportError:
                print("tqdm is not installed: progress as lines (pip install tqdm)", flush=True)
                self.mode = "lines"
            else:
                self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, record: dict) -> None:
        mfu = f"  MFU {100 * record['mfu']:.1f}%" if record.get("mfu") is not None else ""
        loss = "skipped" if record.get("skipped") else f"{record['loss']:.4f}"
        summary = (f"loss {loss}  {record['tokens_per_s_per_device']:,.0f} tok/s/device  "
                   f"{record['tflops_per_device']:.3g} TFLOP/s/device{mfu}  lr {record['lr']:.2e}  "
                   f"peak mem {_format_bytes(record['peak_memory_bytes'])}")
        if self._bar is not None:
            self._bar.set_postfix_str(summary, refresh=False)
            self._bar.update(1)
        elif self.mode == "lines" and (record["step"] % self.every == 0 or record["step"] == self.total):
            print(f"step {record['step']}/{self.total}  {summary}", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class StepTimer:
    """Wall time of one step, waiting for the device so the figure covers the work and not just its launch."""

    def __init__(self, device: torch.device):
        self.device = device
        self._start = 0.0

    def _sync(self) -> None:
        if self.device.type != "cpu":
            getattr(torch, self.device.type).synchronize(self.device)

    def start(self) -> None:
        self._sync()
        self._start = time.perf_counter()

    def stop(self) -> float:
        self._sync()
        return time.perf_counter() - self._start


def plot_loss(metrics_path: Path, png_path: Path) -> Optional[Path]:
    """Loss vs step as a PNG; None (with a message) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on compute nodes
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the loss plot (pip install 'ring-attention-xpu[plot]')",
              flush=True)
        return None
    records = [r for r in read_metrics(metrics_path) if r.get("loss") is not None]  # skipped steps have none
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path
