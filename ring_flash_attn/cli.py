"""``ring-attn``: the command-line entry point (also ``python -m ring_flash_attn``).

Sub-commands: ``check`` (ring vs full attention on the launched ranks), ``train``
(long-context training), ``capacity`` (the longest sequence a training step fits), ``bench`` (one rank's ring schedule against the best
kernel, on one device), ``env`` (what to attach to a bug report).
"""

from __future__ import annotations

import argparse
import os
import sys


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps a description's line breaks and shows each option's default after its help, except where there
    is none to show (``None``: the help says what happens then)."""

    def _get_help_string(self, action):
        if action.default is None or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _main_env(args) -> int:
    from .train.envinfo import collect_env, format_env

    if args.json:
        import json

        print(json.dumps(collect_env(), indent=1, default=str))
    else:
        print(format_env())
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .check import add_check_parser
    from .train import add_train_parser
    from .train.capacity import add_capacity_parser
    from .train.export import add_export_parser

    parser = argparse.ArgumentParser(prog="ring-attn", description="Context-parallel (ring) attention: check it "
                                     "on a cluster, train with it, time it, report the environment.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_check_parser(sub)
    add_train_parser(sub)
    add_capacity_parser(sub)
    add_export_parser(sub)
    # Listed for --help only: main() hands ``bench``'s arguments to the benchmark's own parser.
    sub.add_parser("bench", help="time one rank's ring schedule against the best kernel on one device "
                                 "(ring-attn bench --help for its options)", add_help=False)
    env = sub.add_parser("env", help="device, backends, versions, ranks and environment for a bug report")
    env.add_argument("--json", action="store_true", help="print as JSON")
    env.set_defaults(handler=_main_env)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        from .bench import main as bench_main

        bench_main(argv[1:])
        return 0
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


def run(entry=None) -> None:
    """The process entry point (the ``ring-attn`` script, ``python -m ring_flash_attn``, ``python -m
    ring_flash_attn.train``): ``entry()`` (default :func:`main`), then exit with its code.

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
        code = (entry or main)()
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
        print(code, file=sys.stderr)
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


if __name__ == "__main__":
    run()
