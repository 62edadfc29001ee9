"""``ring-attn train``: the command line of the trainer.

``ring-attn train --config cpu_demo.yaml --train.steps 20 --parallel.cp 4 --resume``

Any config key can be overridden as ``--<section>.<key> <value>`` (or
``--<section>.<key>=<value>``); the value is read as YAML. A few common ones
have short flags (``--cp``, ``--steps``, ...). Every error exits non-zero on
every rank with a one-line message, after the traceback when the error came from
inside a training step or was unexpected. A run stopped by SIGTERM / SIGINT
exits with 128 + the signal number after saving a checkpoint.
"""

from __future__ import annotations

import argparse
import difflib
import traceback
from typing import List, Optional

from ..cli_common import error_line, rank_prefix, write_lines
from .config import ConfigError, load_config, parse_overrides

EXIT_CONFIG_ERROR = 2
EXIT_FAILED = 1

# What `ring-attn train --help` shows: for users, so plain text (the docstring above is for readers of the code).
DESCRIPTION = """\
Train a decoder-only language model on long sequences: each sequence is split
over the context-parallel ranks (parallel.cp) of the job, the other ranks are
data-parallel replicas, and the model is sharded over every rank (FSDP2).
Launch one process per device with torchrun, mpiexec or srun, e.g. on 4 CPU
processes (about a minute):

  torchrun --standalone --nproc_per_node 4 -m ring_flash_attn train --config cpu_demo.yaml

Bad input stops every rank with a one-line error and a non-zero exit. SIGTERM
or Ctrl-C saves a checkpoint and exits with 128 + the signal number; continue
with --resume. Guide: docs/training.md."""

# Short flags for the overrides people type most.
SHORTCUTS = {"cp": "parallel.cp", "variant": "parallel.variant", "steps": "train.steps", "device": "parallel.device",
             "seq_len": "data.seq_len", "log_dir": "log.dir", "profile": "log.profile_steps"}


class TrainArgumentParser(argparse.ArgumentParser):
    """Collects ``--section.key value`` config overrides into ``args.overrides`` instead of rejecting them.

    argparse has no notion of open-ended option names; overriding ``parse_known_args`` is what lets the
    overrides through when this parser is a sub-command of a parent that calls ``parse_args``.
    """

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        overrides, rest, i = [], [], 0
        while i < len(extras):
            arg = extras[i]
            if arg.startswith("--") and "." in arg.split("=", 1)[0]:
                takes_next = "=" not in arg and i + 1 < len(extras)
                overrides.extend(extras[i: i + (2 if takes_next else 1)])
                i += 2 if takes_next else 1
            else:
                rest.append(arg)
                i += 1
        for arg in rest:
            if arg.startswith("-"):
                self.error(self._unknown_option(arg.split("=", 1)[0]))
        namespace.overrides = list(getattr(namespace, "overrides", None) or []) + overrides
        return namespace, rest

    def _unknown_option(self, option: str) -> str:
        """argparse's "unrecognized arguments", with the closest option or config key (config keys get the
        same from config.py)."""
        options = [s for action in self._actions for s in action.option_strings if s.startswith("--")]
        close = difflib.get_close_matches(option, options, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return (f"unknown option {option}{hint}; options: {', '.join(sorted(options))}, or a config key as "
                f"--<section>.<key> <value>")


def _configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", metavar="YAML",
                        help="run config file, or the name of an example config shipped with the package (e.g. "
                             "cpu_demo.yaml); keys it leaves out take their defaults")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest complete checkpoint in checkpoint.dir (start from step 0 "
                             "if there is none)")
    parser.add_argument("--check", action="store_true",
                        help="train check.steps steps with context parallelism, then the same steps with full "
                             "attention on one rank, and exit non-zero if the losses differ by more than check.rtol")
    for flag, key in SHORTCUTS.items():
        parser.add_argument(f"--{flag.replace('_', '-')}", dest=f"shortcut_{flag}", metavar="VALUE",
                            help=f"same as --{key}")
    parser.epilog = ("Override any config key with --<section>.<key> <value>, e.g. --train.steps 20 "
                     "--checkpoint.every 10 (sections: model, data, train, parallel, checkpoint, log, check; "
                     "every key is listed in docs/training.md).")
    parser.set_defaults(handler=main_train, overrides=[])
    return parser


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``train`` sub-command to an ``argparse`` sub-parser collection; returns its parser."""
    parser = subparsers.add_parser("train", help="long-context training with context parallelism",
                                   description=DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.__class__ = TrainArgumentParser  # see TrainArgumentParser: lets --section.key overrides through
    return _configure(parser)


def main_train(args: argparse.Namespace) -> int:
    """Run ``ring-attn train`` from parsed ``args``; returns the process exit code."""
    from .checkpoint import CheckpointError
    from .preemption import TrainingInterrupted
    from .trainer import CheckFailed, NonFiniteLoss, StepFailed, run_from_config

    try:
        overrides = parse_overrides(list(args.overrides))
        overrides += [(key, getattr(args, f"shortcut_{flag}")) for flag, key in SHORTCUTS.items()
                      if getattr(args, f"shortcut_{flag}", None) is not None]
        if args.resume:
            overrides.append(("checkpoint.resume", "true"))
        config = load_config(args.config, overrides)
        run_from_config(config, check_mode=args.check)
    except ConfigError as exc:
        error_line(str(exc))
        return EXIT_CONFIG_ERROR
    except TrainingInterrupted as exc:
        write_lines(f"{rank_prefix()}{exc}")
        return exc.exit_code
    except (CheckpointError, CheckFailed, NonFiniteLoss) as exc:
        error_line(str(exc))
        return EXIT_FAILED
    except StepFailed as exc:
        # gloo raises plain RuntimeErrors, so a dead peer and a bug inside the step look alike: keep the traceback.
        traceback.print_exc()
        error_line(str(exc))
        return EXIT_FAILED
    except Exception as exc:  # anything else: still one clear line per rank, with the traceback for a bug report
        traceback.print_exc()
        error_line(f"{type(exc).__name__}: {exc}")
        return EXIT_FAILED
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m ring_flash_attn.train ...``: the train command without the ``ring-attn`` front end."""
    parser = _configure(TrainArgumentParser(prog="ring-attn train", description=DESCRIPTION,
                                            formatter_class=argparse.RawDescriptionHelpFormatter))
    return main_train(parser.parse_args(argv))
