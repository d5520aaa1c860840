"""`lora ...`: inspect LoRA/LyCORIS files (bake, merge, resize and extract are not built yet)."""

from __future__ import annotations

import argparse

from .pending import not_built

LATER = {"bake": "bake LoRA/LyCORIS files into a checkpoint", "merge": "merge LoRAs (concat, or SVD with --rank)",
         "resize": "change a LoRA's rank", "extract": "extract a LoRA from two checkpoints"}


def register(sub: argparse._SubParsersAction) -> None:
    lora = sub.add_parser("lora", help="inspect, bake, merge, resize and extract LoRAs",
                          description="LoRA/LyCORIS file tools.")
    lsub = lora.add_subparsers(dest="lora_command", metavar="SUBCOMMAND", required=True)
    info = lsub.add_parser("info", help="algorithm, ranks, base model, module counts and trained tags of a LoRA",
                           description="Summarise a LoRA/LyCORIS .safetensors file (sd-scripts, LyCORIS, sdtune or "
                                       "other tools) from its header: algorithm, rank(s), alpha, base model version, "
                                       "text-encoder and U-Net module counts, trained tag frequencies.")
    info.add_argument("file", metavar="FILE", help="a LoRA/LyCORIS .safetensors file")
    info.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    info.set_defaults(func=run_info)
    for name, text in LATER.items():
        p = lsub.add_parser(name, help=f"{text} (not built yet)", description=f"{text}. Not built yet (issue #6).")
        p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        p.set_defaults(func=not_built, issue=6, subcommand=name)


def run_info(args: argparse.Namespace) -> int:
    from ..networks.lora_info import format_lora_info, inspect_lora
    from . import emit

    info = inspect_lora(args.file)
    emit(info.to_dict(), args.json, format_lora_info(info))
    return 0
