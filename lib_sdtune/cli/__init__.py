"""The command line: one sub-parser module per command group; errors become one paragraph and exit 1."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Optional, Sequence

from .. import __version__
from ..errors import SdtuneError
from . import demo_cmd, lora_cmd, merge_cmd, model_cmd, plan_cmd, repair_cmd, tag_cmd, train_cmd, ui_cmd

EXIT_ERROR = 1


def build_parser() -> argparse.ArgumentParser:
    """The full `sdtune` argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m lib_sdtune",
        description="sdtune: train LoRA/LyCORIS adapters, merge and repair Stable Diffusion models, edit tags.",
    )
    parser.add_argument("--version", action="version", version=f"sdtune {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    model_cmd.register(sub)
    demo_cmd.register(sub)
    lora_cmd.register(sub)
    merge_cmd.register(sub)
    repair_cmd.register(sub)
    ui_cmd.register(sub)
    tag_cmd.register(sub)
    plan_cmd.register(sub)
    train_cmd.register(sub)
    return parser


def emit(result: dict, as_json: bool, human: str) -> None:
    """Print a result: one JSON object on stdout with --json, else the human text."""
    if as_json:
        json.dump(result, sys.stdout, indent=2, sort_keys=False, default=str)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(human.rstrip() + "\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; returns the process exit code."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # offline by default: nothing here needs a hub
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except SdtuneError as e:
        sys.stderr.write(f"sdtune {args.command}: error: {e}\n")
        return EXIT_ERROR
    except KeyboardInterrupt:
        sys.stderr.write(f"sdtune {args.command}: interrupted\n")
        return 130
