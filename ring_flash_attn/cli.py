"""``ring-attn``: the command-line entry point (also ``python -m ring_flash_attn``)."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from .check import add_check_parser

    parser = argparse.ArgumentParser(prog="ring-attn", description="Context-parallel ring attention")
    sub = parser.add_subparsers(dest="command", required=True)
    add_check_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
