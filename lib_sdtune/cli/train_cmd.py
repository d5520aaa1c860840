"""`train CONFIG [--set key=value ...] [--resume DIR]`: train a LoRA/LyCORIS adapter from a kohya-style config."""

from __future__ import annotations

import argparse
import os
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a LoRA/LyCORIS adapter from a kohya-style config",
                       description="Train a LoRA, LoCon, LoHa, LoKr, DoRA or full-diff adapter. CONFIG is an "
                                   "sd-scripts train_network.py config (.toml, argument names as keys, sections "
                                   "flattened) or a kohya_ss GUI .json. The effective config is written beside the "
                                   "outputs and into each file's metadata. Data-parallel over several GPUs: accelerate "
                                   "launch --multi_gpu --num_processes N -m lib_sdtune train CONFIG, or torchrun "
                                   "--nproc_per_node N -m lib_sdtune train CONFIG (also CPU processes).")
    p.add_argument("config", metavar="CONFIG", help="train config (.toml or kohya_ss GUI .json)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting (repeatable), e.g. --set max_train_epochs=4")
    p.add_argument("--resume", metavar="DIR", help="continue from a state folder the trainer wrote")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from ..train.config import load_train_config
    from ..train.trainer import train
    from . import emit

    overrides = list(args.overrides) + ([f'resume="{args.resume}"'] if args.resume else [])
    cfg, notes = load_train_config(args.config, overrides)
    main_process = int(os.environ.get("RANK", "0") or 0) == 0  # under accelerate launch / torchrun
    bar = _progress_bar() if main_process else None
    try:
        result = train(cfg, progress=bar.update if bar else None, device=args.device, notes=notes)
    finally:
        if bar:
            bar.close()
    if not main_process:
        return 0  # the first process reports for all
    summary = {"outputs": [str(p) for p in result.outputs], "final_loss": result.final_loss, "steps": result.steps,
               "epochs": result.epochs, "output": str(result.outputs[-1]) if result.outputs else None,
               "validation_losses": result.validation_losses, "notes": result.notes,
               "config": str(result.config_path) if result.config_path else None}
    lines = [*(f"note: {n}" for n in result.notes),
             f"trained {result.steps} steps in {result.epochs} epoch(s); final loss {result.final_loss}",
             *(f"wrote {p}" for p in result.outputs)]
    emit(summary, args.json, "\n".join(lines))
    return 0


class _Bar:
    """A tqdm bar on stderr fed by the trainer's progress callback."""

    def __init__(self):
        from tqdm import tqdm

        self.bar = tqdm(total=0, unit="step", file=sys.stderr, dynamic_ncols=True)

    def update(self, done: int, total: int, info: dict) -> None:
        self.bar.total = total
        self.bar.n = done
        self.bar.set_postfix(epoch=info.get("epoch"), loss=f"{info.get('avg_loss', 0):.4f}", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _progress_bar():
    try:
        return _Bar()
    except ImportError:  # tqdm comes with diffusers/transformers; without it there is simply no bar
        return None
