"""``ring-attn capacity``: the longest ``data.seq_len`` that completes a training step on the ranks it runs on.

    torchrun --standalone --nproc_per_node 8 --no-python ring-attn capacity --config run.yaml

Launched like ``train``, each rank runs trials: for a length, every rank starts a fresh ``ring-attn train``
process of that length (``--capacity.steps`` steps, no checkpoints), and the ranks' trial processes form a
process group of their own. A trial that runs out of memory (or fails otherwise) on any rank ends the trial
on every rank: the launching ranks watch their trial processes and agree every half second over a gloo group
of their own, so no trial process waits on a dead peer. A fresh process per trial means every trial starts
from empty device memory. Lengths double from ``--min-seq-len`` until a trial fails, then bisect between the last
that passed and the first that failed, down to ``--resolution`` tokens. Printed: a table of length, peak
memory (the largest of any rank), tokens/s per device and MFU, the answer, and for the first failure, where
it ran out of memory (the innermost frame of this package or transformers in the traceback) beside the part
the memory plan says dominates at that length.

``--predict`` prints the memory plan and its predicted longest length without running anything, for any
number of ranks and device memory (``--ranks 8 --device-memory-gib 80``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from .config import ConfigError, load_config, parse_overrides

POLL_S = 0.5
RESULT_FILE = "capacity.json"
# Where an out-of-memory error was raised, by the file of the innermost frame of ours or of transformers.
PLACES = [("train/loss.py", "the loss"), ("train/tiling.py", "a tiled MLP or norm"),
          ("train/offload.py", "the activation offload"), ("kernels/", "the attention kernel"),
          ("ring/", "ring attention"), ("comm/", "ring attention's buffers"), ("mlp", "an MLP"),
          ("torch/optim", "the optimizer step"), ("torch/distributed/fsdp", "FSDP's gathered weights"),
          ("torch/utils/checkpoint.py", "a recomputed layer"), ("modeling_", "a decoder layer")]


@dataclass
class Trial:
    seq_len: int
    ok: bool
    peak_bytes: Optional[int] = None
    tokens_per_s_per_device: Optional[float] = None
    mfu: Optional[float] = None
    step_s: Optional[float] = None
    out_of_memory: bool = False
    where: Optional[str] = None         # where the failure was raised
    error: Optional[str] = None         # the failing rank's last error line
    plan_dominant: Optional[str] = None
    plan_bytes: Optional[int] = None
    wall_s: float = 0.0


def add_capacity_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "capacity", help="find the longest data.seq_len a training step fits on the launched ranks",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="YAML", help="the run config (as for ring-attn train)")
    # (not --start / --max: torchrun would take abbreviations of its own options in the command after it)
    parser.add_argument("--min-seq-len", type=int, default=None, help="first length tried (default: data.seq_len)")
    parser.add_argument("--max-seq-len", type=int, default=1 << 24, help="longest length tried")
    parser.add_argument("--resolution", type=int, default=None,
                        help="bisect down to this many tokens (default: an eighth of the last length that passed)")
    parser.add_argument("--steps", type=int, default=2,
                        help="optimizer steps per trial (the second holds the optimizer's state: the peak)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one trial may take")
    parser.add_argument("--work-dir", default=None, help="trial logs (default: a temporary directory)")
    parser.add_argument("--out", default=None, help="write the trials and the answer as JSON here")
    parser.add_argument("--predict", action="store_true",
                        help="print the memory plan's prediction only (no trial runs)")
    parser.add_argument("--ranks", type=int, default=None, help="--predict: the number of ranks (default: 1)")
    parser.add_argument("--device-memory-gib", type=float, default=None,
                        help="--predict: memory per rank (default: this machine's first accelerator, or RAM)")
    parser.add_argument("--host-memory-gib", type=float, default=None,
                        help="--predict: host memory per node for what is offloaded (default: this machine's RAM)")
    parser.epilog = "Config overrides as for ring-attn train: --<section>.<key> <value>."
    parser.set_defaults(handler=main_capacity, overrides=[])
    from .command import TrainArgumentParser

    parser.__class__ = TrainArgumentParser  # lets --section.key overrides through, as for train
    return parser


def main_capacity(args: argparse.Namespace) -> int:
    extras = getattr(args, "overrides", None) or []
    try:
        config = load_config(args.config, parse_overrides(list(extras)))
        if args.predict:
            print("\n".join(predict(config, args.ranks or 1, args.device_memory_gib, args.host_memory_gib)))
            return 0
        return search(config, args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2


def predict(config, ranks: int, device_memory_gib: Optional[float], host_memory_gib: Optional[float] = None,
            ranks_per_node: Optional[int] = None) -> List[str]:
    """The memory plan at the config's length and the longest length it predicts, for ``ranks`` ranks on nodes
    of ``ranks_per_node`` (default: all on one)."""
    import torch

    from . import memory_plan
    from .model import build_empty_model

    shape = memory_plan.Shape.of_model(build_empty_model(config, "sdpa"))
    kind = config.parallel.device
    if device_memory_gib is not None:
        kind = "cuda" if kind == "auto" else kind  # memory given: a plan for accelerators, unless told otherwise
        device_bytes = int(device_memory_gib * memory_plan.GIB)
        where = f"{device_memory_gib:g} GiB per rank (given, {kind})"
    else:
        from ..comm import default_device_type

        kind = default_device_type() if kind == "auto" else kind
        device = torch.device(kind if kind == "cpu" else f"{kind}:0")
        device_bytes = memory_plan.device_memory(device, ranks if kind == "cpu" else 1)
        where = f"{memory_plan._gib(device_bytes)} per rank ({kind})"
    per_node = ranks_per_node or ranks
    host_bytes = (int(host_memory_gib * memory_plan.GIB) if host_memory_gib else memory_plan.host_memory()) // per_node
    where += f", {memory_plan._gib(host_bytes)} of host memory per rank"
    settings = memory_plan.Settings.of(config, ranks, kind != "cpu", device_bytes, host_bytes if kind != "cpu" else None)
    plan = memory_plan.plan_step(shape, settings, device_bytes)
    longest = memory_plan.longest_fitting(shape, settings, device_bytes, multiple=2 * config.parallel.cp)
    size = f"{shape.params / 1e9:.2f} B" if shape.params >= 1e9 else f"{shape.params / 1e6:.2f} M"
    return [f"model: {size} parameters ({shape.layers} layers, hidden {shape.hidden}, vocabulary "
            f"{shape.vocab}); {ranks} rank(s), cp = {config.parallel.cp}; {where}", *plan.describe(),
            f"predicted longest data.seq_len: {longest:,} tokens"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _where(text: str) -> Optional[str]:
    """The place of the innermost frame of ours or of transformers in the last traceback of ``text``."""
    frames = re.findall(r'File "([^"]+)", line \d+', text)
    for path in reversed(frames):
        if "ring_flash_attn" in path or "transformers" in path or "torch/optim" in path or "fsdp" in path \
                or "torch/utils/checkpoint.py" in path:
            for fragment, place in PLACES:
                if fragment in path:
                    return place
            return Path(path).name
    return None


class _Ranks:
    """The launching ranks (one, or a gloo group of them): they agree on ports and on each trial's end."""

    def __init__(self):
        from ..comm.launch import detect_launch

        self.launch = detect_launch()
        self.group = None
        if self.launch.world_size > 1:
            import torch.distributed as dist

            dist.init_process_group("gloo")
            self.group = dist.group.WORLD

    @property
    def rank(self) -> int:
        return self.launch.rank

    def broadcast(self, value):
        if self.group is None:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def any_all(self, failed: bool, running: bool):
        """(has any rank's trial failed, is any rank's trial still running)."""
        if self.group is None:
            return failed, running
        import torch
        import torch.distributed as dist

        flags = torch.tensor([int(failed), int(running)])
        dist.all_reduce(flags)
        return bool(flags[0]), bool(flags[1])

    def gather(self, value) -> list:
        if self.group is None:
            return [value]
        import torch.distributed as dist

        values = [None] * self.launch.world_size
        dist.all_gather_object(values, value)
        return values

    def close(self):
        if self.group is not None:
            import torch.distributed as dist

            dist.destroy_process_group()


def _trial_command(config_path: Optional[str], args, seq_len: int, log_dir: Path, max_bytes: int) -> List[str]:
    overrides = list(getattr(args, "overrides", None) or [])
    command = [sys.executable, "-m", "ring_flash_attn", "train"]
    if config_path:
        command += ["--config", config_path]
    return command + overrides + ["--data.seq_len", str(seq_len), "--train.steps", str(args.steps),
                                  "--train.warmup_steps", "1", "--checkpoint.save", "false",
                                  "--checkpoint.resume", "false", "--log.dir", str(log_dir), "--log.plot", "false",
                                  "--log.progress", "lines", "--data.max_bytes", str(max_bytes)]


def run_trial(ranks: _Ranks, config, args, seq_len: int, work: Path) -> Trial:
    """One length on every rank: fresh trial processes forming their own group; ended on every rank as soon as
    any rank's fails."""
    log_dir = work / f"seq_{seq_len}"
    port = ranks.broadcast(_free_port() if ranks.rank == 0 else None)
    samples = config.train.micro_batch_size * config.train.grad_accum * max(1, ranks.launch.world_size // config.parallel.cp)
    # bytes of corpus for every step's sequences (a tokenizer makes a token of several bytes)
    max_bytes = max(config.data.max_bytes, 6 * (seq_len + 1) * samples * (args.steps + 1))
    env = {key: value for key, value in os.environ.items() if not key.startswith("TORCHELASTIC")}
    env.update(RANK=str(ranks.rank), WORLD_SIZE=str(ranks.launch.world_size), LOCAL_RANK=str(ranks.launch.local_rank),
               MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"), MASTER_PORT=str(port),
               PYTHONUNBUFFERED="1")
    env.setdefault("LOCAL_WORLD_SIZE", str(ranks.launch.world_size))
    log_dir.mkdir(parents=True, exist_ok=True)
    output = log_dir / f"rank{ranks.rank}.log"
    started = time.monotonic()
    with open(output, "w") as handle:
        child = subprocess.Popen(_trial_command(args.config, args, seq_len, log_dir, max_bytes), env=env,
                                 stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        timed_out = killed = False
        while True:
            code = child.poll()
            timed_out = timed_out or (code is None and time.monotonic() - started > args.timeout)
            failed, running = ranks.any_all(code not in (None, 0) or timed_out, code is None)
            if failed or not running:
                break
            time.sleep(POLL_S)
        if child.poll() is None:  # another rank's trial failed (or this one timed out): end this one too
            killed = True
            child.kill()
            child.wait()
    text = output.read_text(errors="replace")
    mine = {"failed": child.returncode != 0 and not killed,
            "oom": "out of memory" in text.lower() or "OutOfMemoryError" in text,
            "where": _where(text), "error": next((line for line in reversed(text.splitlines())
                                                 if "error" in line.lower()), None),
            "peak": _rank_peak(log_dir, ranks.rank), "timed_out": timed_out}
    everyone = ranks.gather(mine)
    trial = Trial(seq_len, ok=not failed, wall_s=round(time.monotonic() - started, 1))
    trial.peak_bytes = max((r["peak"] for r in everyone if r["peak"] is not None), default=None)
    culprit = next((r for r in everyone if r["oom"]), None) or next((r for r in everyone if r["failed"]), None)
    if failed and culprit is not None:
        trial.out_of_memory, trial.where, trial.error = culprit["oom"], culprit["where"], culprit["error"]
    if failed and any(r["timed_out"] for r in everyone):
        trial.error = f"timed out after {args.timeout:g} s"
    records = _metrics(log_dir)
    if records:
        last = records[-1]
        trial.tokens_per_s_per_device, trial.mfu, trial.step_s = (last.get("tokens_per_s_per_device"),
                                                                  last.get("mfu"), last.get("step_time_s"))
    plan = _plan_line(text)
    if plan:
        trial.plan_bytes, trial.plan_dominant = plan
    return trial


def _metrics(log_dir: Path) -> list:
    path = log_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by the trial's end
            pass
    return rows


def _rank_peak(log_dir: Path, rank: int) -> Optional[int]:
    from .metrics import RANK_SUMMARY

    path = log_dir / RANK_SUMMARY.format(rank=rank)
    try:
        return int(json.loads(path.read_text())["peak_memory_bytes"])
    except (OSError, ValueError, KeyError):
        return None


def _plan_line(text: str):
    found = re.search(r"memory plan per rank at [\d,]+ tokens: ([\d.]+) (GiB|MiB) of .*?dominant: ([^)]+)\)", text)
    if not found:
        return None
    size = float(found.group(1)) * (2 ** 30 if found.group(2) == "GiB" else 2 ** 20)
    return int(size), found.group(3)


def _round(n: int, unit: int) -> int:
    return max(unit, n // unit * unit)


def search(config, args) -> int:
    ranks = _Ranks()
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="ring-attn-capacity-"))
    unit = 2 * config.parallel.cp * max(1, config.parallel.ulysses)
    trials: List[Trial] = []
    say = print if ranks.rank == 0 else (lambda *a, **k: None)
    length = _round(args.min_seq_len or config.data.seq_len, unit)
    good, bad = None, None
    try:
        while length <= args.max_seq_len:
            trial = run_trial(ranks, config, args, length, work)
            trials.append(trial)
            say(_row(trial), flush=True)
            if not trial.ok:
                bad = trial
                break
            good = trial
            length *= 2
        if bad is not None and good is not None:
            resolution = args.resolution or max(unit, good.seq_len // 8)
            low, high = good.seq_len, bad.seq_len
            while high - low > resolution:
                middle = _round((low + high) // 2, unit)
                if middle in (low, high):
                    break
                trial = run_trial(ranks, config, args, middle, work)
                trials.append(trial)
                say(_row(trial), flush=True)
                if trial.ok:
                    low, good = middle, trial
                else:
                    high = middle
    finally:
        ranks.close()
    if ranks.rank == 0:
        first_failure = next((t for t in trials if not t.ok), None)
        print(_summary(trials, good, first_failure, args.max_seq_len), flush=True)
        result = {"trials": [t.__dict__ for t in trials], "longest": good.seq_len if good else 0,
                  "world_size": ranks.launch.world_size, "config": config.to_dict()}
        out = Path(args.out) if args.out else work / RESULT_FILE
        out.write_text(json.dumps(result, indent=1))
        print(f"trials and logs: {work}; results: {out}", flush=True)
    return 0 if good is not None else 1


def _gib(n: Optional[int]) -> str:
    return f"{n / 2 ** 30:.1f}" if n is not None else "-"


def _row(t: Trial) -> str:
    speed = f"{t.tokens_per_s_per_device:,.0f}" if t.tokens_per_s_per_device else "-"
    mfu = f"{100 * t.mfu:.1f} %" if t.mfu else "-"
    status = "ok" if t.ok else ("out of memory" if t.out_of_memory else "failed")
    return (f"| {t.seq_len:>10,} | {status:<13} | {_gib(t.peak_bytes):>8} | {_gib(t.plan_bytes):>8} | {speed:>9} | "
            f"{mfu:>6} | {t.wall_s:>6.0f} |")


HEADER = ("| seq_len    | result        | peak GiB | plan GiB | tokens/s  | MFU    | wall s |\n"
          "|------------|---------------|----------|----------|-----------|--------|--------|")


def _summary(trials: List[Trial], good: Optional[Trial], failure: Optional[Trial], longest_tried: int) -> str:
    lines = ["", HEADER, *(_row(t) for t in sorted(trials, key=lambda t: t.seq_len))]
    if good is None:
        lines.append("no length completed a step" + (f": {failure.error}" if failure and failure.error else ""))
        return "\n".join(lines)
    lines.append(f"longest data.seq_len that completed a step: {good.seq_len:,} tokens "
                 f"({_gib(good.peak_bytes)} GiB peak, {good.tokens_per_s_per_device or 0:,.0f} tokens/s per device)")
    if failure is None:
        lines.append(f"every length up to --max-seq-len {longest_tried:,} passed")
    else:
        what = "ran out of memory" if failure.out_of_memory else "failed"
        where = f" in {failure.where}" if failure.where else ""
        plan = f"; the memory plan's largest part there: {failure.plan_dominant}" if failure.plan_dominant else ""
        lines.append(f"first failure: {failure.seq_len:,} tokens {what}{where}{plan}")
        if not failure.out_of_memory and failure.error:
            lines.append(f"  {failure.error}")
    return "\n".join(lines)
