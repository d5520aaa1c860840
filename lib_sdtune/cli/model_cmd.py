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
    info.add_argument("ckpt", metavar="CKPT", help=".safetensors (or .ckpt/.pt, read as plain tensors only)")
    info.add_argument("--load", action="store_true", help="load every component and report key mismatches")
    info.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    info.add_argument("--no-hash", action="store_true", help="skip hashing (faster on multi-GB files)")
    vp = info.add_mutually_exclusive_group()
    vp.add_argument("--v-pred", action="store_true", help="the model predicts v (SD2 768-v and v-pred finetunes)")
    vp.add_argument("--eps", action="store_true", help="the model predicts noise (eps)")
    info.set_defaults(func=run_info)


def _fmt_count(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return str(n)


def run_info(args: argparse.Namespace) -> int:
    from ..models.inspect import inspect_model
    from . import emit

    hints = None
    if args.v_pred or args.eps:
        hints = ModelHints(prediction_type="v_prediction" if args.v_pred else "epsilon", source="command line")
    info = inspect_model(args.ckpt, load=args.load, hashes=not args.no_hash, hints=hints)
    lines = [
        f"file:          {info.file} ({info.size_bytes / 2**20:.1f} MiB)",
        f"architecture:  {info.architecture}" + (f" ({info.variant})" if info.variant else ""),
        f"prediction:    {info.prediction_type} (from {info.prediction_source})",
        f"dtype:         {info.dtype}",
        "components:    " + ", ".join(f"{k} {_fmt_count(v)}" for k, v in info.components.items()),
    ]
    if info.hashes:
        h = info.hashes
        lines.append(f"hashes:        AutoV2 {h['autov2']}  (A1111 short hash)   legacy {h['autov1']}")
        lines.append(f"               sha256 {h['sha256']}")
        if "sshs_model_hash" in h:
            lines.append(f"               sshs_model_hash {h['sshs_model_hash']}")
    if info.metadata:
        lines.append(f"metadata:      {len(info.metadata)} entries ({', '.join(sorted(info.metadata)[:5])}"
                     + (", ...)" if len(info.metadata) > 5 else ")"))
    if info.loaded:
        lines.append(f"loaded in {info.load_seconds:.1f} s: missing keys {len(info.missing_keys)}, "
                     f"unexpected keys {len(info.unexpected_keys)}, ignored extras {len(info.ignored_keys)}")
        for k in (info.missing_keys + info.unexpected_keys)[:20]:
            lines.append(f"  ! {k}")
    emit(info.to_dict(), args.json, "\n".join(lines))
    return 0
