"""``ring-attn export``: a training checkpoint as a Hugging Face model directory.

``ring-attn export --checkpoint runs/x/checkpoints --out hf_model`` writes the
consolidated weights (safetensors), ``config.json`` and, when the run used
``data.tokenizer``, the tokenizer, so ``AutoModelForCausalLM.from_pretrained``
(and ``AutoTokenizer``) load it with nothing of this package installed. It runs
in one process: DCP reads the sharded checkpoint whatever mesh wrote it. The
model is rebuilt from the transformers config the checkpoint holds (the
pretrained directory a run started from is not needed); the saved config names
PyTorch's SDPA attention (ring attention is a training-time choice).
"""

from __future__ import annotations

import argparse
import os
import shutil
import warnings
from pathlib import Path
from typing import Optional

from ..cli_common import error_line
from .config import ConfigError

DESCRIPTION = """\
Write a training checkpoint as a Hugging Face model directory: consolidated
safetensors weights, config.json and the run's tokenizer (if it used one), for
AutoModelForCausalLM.from_pretrained. One process; no GPU needed.

  ring-attn export --checkpoint runs/cpu_demo/checkpoints --out runs/cpu_demo/hf_model"""


def _checkpoint_dir(path: Path) -> Path:
    """A checkpoint directory, or the newest complete one under a checkpoints directory."""
    from . import checkpoint

    if (path / checkpoint.MANIFEST).is_file():
        return path
    found = checkpoint.list_checkpoints(path)
    complete = [p for _, p in found if (p / checkpoint.MANIFEST).is_file()]
    if not complete:
        run_dir_hint = ""
        if checkpoint.list_checkpoints(path / "checkpoints"):  # a run's log.dir given for its checkpoints
            run_dir_hint = f" (it looks like a run directory: did you mean --checkpoint {path / 'checkpoints'}?)"
        raise ConfigError(f"--checkpoint {str(path)!r}: neither a complete checkpoint nor a directory holding "
                          f"one{run_dir_hint}")
    return complete[-1]


def export(checkpoint_path: Path, out: Path, tokenizer: Optional[str] = None) -> Path:
    """Write the model of ``checkpoint_path`` to ``out`` (which must not exist or be empty), with ``tokenizer``
    (default: the run's data.tokenizer, if it had one); returns the checkpoint directory used.

    Everything is written into a temporary directory beside ``out``, renamed to ``out`` at the end: an export
    that fails midway (a full disk, an interrupt) leaves no half-written ``out`` to block the retry."""
    import torch
    import torch.distributed.checkpoint as dcp
    from transformers import AutoConfig, AutoModelForCausalLM

    from . import checkpoint
    from .resume import saved_run_config
    from .tokens import load_tokenizer

    source = _checkpoint_dir(checkpoint_path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {str(out)!r}: exists and is not an empty directory; refusing to overwrite it")
    problem = checkpoint.verify(source, check_crc=True)
    if problem is not None:
        raise ConfigError(problem)
    if not (source / checkpoint.MODEL_CONFIG).is_file():
        raise ConfigError(f"--checkpoint {str(source)!r}: has no {checkpoint.MODEL_CONFIG} (written by an older "
                          f"version of ring-attn train), so the model it holds is unknown")
    # Only the tokenizer's path is read from the run's config (checking all of it again would refuse the
    # checkpoints of runs whose config an older version accepted).
    try:
        run_tokenizer = saved_run_config(source).get("data", {}).get("tokenizer")
    except checkpoint.CheckpointError as exc:
        raise ConfigError(str(exc)) from None
    if tokenizer or run_tokenizer:  # before anything is written: a tokenizer moved since the run fails now
        try:
            tokenizer_files = load_tokenizer(tokenizer or run_tokenizer)
        except ConfigError as exc:
            given = "given by --tokenizer" if tokenizer else "the run's, from its run_config.json"
            raise ConfigError(f"{exc} ({given}); give the tokenizer's directory with --tokenizer DIR") from None
    hf_config = AutoConfig.from_pretrained(str(source), local_files_only=True)
    # Meta-device shell, then real memory for the weights only (non-persistent buffers such as rotary
    # frequencies are not saved: from_pretrained recomputes them).
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa")
    model.to_empty(device="cpu")
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # one process by design, not by accident
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(source), no_dist=True)
    model.load_state_dict(state["model"])
    model.config.use_cache = True
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = out.with_name(f".{out.name}.partial-{os.getpid()}")  # mkdir, not mkdtemp: the umask's permissions
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        model.save_pretrained(scratch)
        if tokenizer or run_tokenizer:
            tokenizer_files.save_pretrained(scratch)
        os.replace(scratch, out)  # an empty `out` is replaced; anything else was refused above
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return source


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("export", help="a training checkpoint as a Hugging Face model directory",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="a checkpoint (step_N) or a checkpoints directory (its newest complete one)")
    parser.add_argument("--out", required=True, metavar="DIR", help="the model directory to write (new or empty)")
    parser.add_argument("--tokenizer", metavar="DIR", default=None,
                        help="the tokenizer to write with it (default: the run's data.tokenizer, if it had one)")
    parser.set_defaults(handler=main_export)
    return parser


def main_export(args: argparse.Namespace) -> int:
    try:
        source = export(Path(args.checkpoint), Path(args.out), args.tokenizer)
    except ConfigError as exc:
        error_line(str(exc))
        return 2
    except OSError as exc:  # e.g. a full disk while writing: nothing of it is left at --out
        error_line(f"--out {args.out!r}: the export failed ({type(exc).__name__}: {exc}); nothing was written "
                   f"there, so the same command can be run again")
        return 1
    print(f"exported {source} to {args.out}", flush=True)
    if not (Path(args.out) / "tokenizer_config.json").is_file():
        print("no tokenizer: the run trained on bytes (token ids 0-255, 256 = end of document)", flush=True)
    return 0
