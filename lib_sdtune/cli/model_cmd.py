"""`model info`: what a checkpoint is, its hashes, and (with --load) how cleanly it loads."""

from __future__ import annotations

import argparse

from ..models.hints import ModelHints


def register(sub: argparse._SubParsersAction) -> None:
    model = sub.add_parser("model", help="inspect checkpoints", description="Inspect Stable Diffusion checkpoints.")
    msub = model.add_subparsers(dest="model_command", metavar="SUBCOMMAND", required=True)
    info = msub.add_parser(
        "info", help="architecture, components, dtype and hashes of a checkpoint",
        description="Architecture (sd1 / sd2 / sd2-v / sdxl / sdxl-refiner), parameter count per component, "
                    "dtype and the hashes A1111, Civitai and sd-scripts show. With --load, every component is "
                    "loaded into diffusers/transformers modules and missing / unexpected keys are reported.")
    info.add_argument("ckpt", metavar="CKPT",
                      help=".safetensors, .ckpt/.pt (read as plain tensors only), or a diffusers model folder")
    info.add_argument("--load", action="store_true", help="load every component and report key mismatches")
    info.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    info.add_argument("--no-hash", action="store_true", help="skip hashing (faster on multi-GB files)")
    vp = info.add_mutually_exclusive_group()
    vp.add_argument("--v-pred", action="store_true", help="the model predicts v (SD2 768-v and v-pred finetunes)")
    vp.add_argument("--eps", action="store_true", help="the model predicts noise (eps)")
    info.set_defaults(func=run_info)


def run_info(args: argparse.Namespace) -> int:
    from ..models.inspect import format_model_info, inspect_model
    from . import emit

    hints = None
    if args.v_pred or args.eps:
        hints = ModelHints(prediction_type="v_prediction" if args.v_pred else "epsilon", source="command line")
    info = inspect_model(args.ckpt, load=args.load, hashes=not args.no_hash, hints=hints)
    emit(info.to_dict(), args.json, format_model_info(info))
    return 0
