"""Commands of the CLI contract that are not built yet: each says so and exits 2."""

from __future__ import annotations

import argparse
import sys

# command -> (subcommands, one-line help, issue that builds it)
# (empty now: `repair` is built in repair_cmd.py, whose diagnose / pick-epoch still use `not_built`)
PENDING: dict[str, tuple[tuple[str, ...], str, int]] = {}


def register(sub: argparse._SubParsersAction) -> None:
    for name, (subs, help_text, issue) in PENDING.items():
        p = sub.add_parser(name, help=f"{help_text} (not built yet)",
                           description=f"{help_text}. Not built yet in this version (issue #{issue}).")
        if subs:
            p.add_argument("subcommand", choices=subs, nargs="?", help="what to do")
        p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        p.set_defaults(func=not_built, issue=issue)


def not_built(args: argparse.Namespace) -> int:
    what = args.command + (f" {args.subcommand}" if getattr(args, "subcommand", None) else "")
    sys.stderr.write(f"sdtune {what}: not built yet in this version (tracked as issue #{args.issue}).\n")
    return 2
