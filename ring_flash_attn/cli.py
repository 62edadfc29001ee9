"""``ring-attn``: the command-line entry point (also ``python -m ring_flash_attn``).

Sub-commands: ``check`` (ring vs full attention on the launched ranks), ``train``
(long-context training), ``capacity`` (the longest sequence a training step fits), ``export`` (a
training checkpoint as a Hugging Face model), ``bench`` (one rank's ring schedule against the best kernel, on
one device), ``env`` (what to attach to a bug report). Building the command line imports no sub-command's
work: each imports torch and the rest when it runs, so ``ring-attn --help`` is quick.
"""

from __future__ import annotations

import argparse
import sys

from .cli_common import HelpFormatter, launch_rank, run as run_process, write_lines

__all__ = ["HelpFormatter", "build_parser", "main", "run"]


def _main_env(args) -> int:
    from .train.envinfo import collect_env, format_env

    if args.json:
        import json

        text = json.dumps(collect_env(), indent=1, default=str)
    else:
        text = format_env()
    rank = launch_rank()
    if rank is not None:  # under torchrun / mpiexec every rank prints its own block: say whose each line is
        text = "\n".join(f"[rank {rank}] {line}" for line in text.splitlines())
    write_lines(text, sys.stdout)  # one write: the ranks' blocks do not interleave line by line
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
    env = sub.add_parser("env", help="device, backends, versions, ranks and environment for a bug report "
                                     "(under a launcher, each line starts with its rank)")
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
    """The ``ring-attn`` script: :func:`main` (or ``entry``) as a process (see cli_common.run: how it exits)."""
    run_process(entry or main)


if __name__ == "__main__":
    run()
