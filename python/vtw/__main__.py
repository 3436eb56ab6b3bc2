"""The vtw command line: `python -m vtw <command>`."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vtw", description=__doc__ or "")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="the main job: withdraw visual tokens from a small batch and show the result")
    demo.add_argument("--hidden-size", type=int, default=64, help="hidden size of the demo batch (default 64)")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "demo":
        from . import demo as demo_mod

        return demo_mod.run(hidden_size=args.hidden_size)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
