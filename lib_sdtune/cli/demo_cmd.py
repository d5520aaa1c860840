"""`demo`: the end-to-end demo on the built-in tiny model and generated dataset.

Today it writes a tiny real-layout checkpoint and a kohya-style dataset, then loads the model
and reports what it is; each feature that lands adds its step here.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the end-to-end demo on a built-in tiny model and dataset",
                       description="Generate a tiny Stable Diffusion checkpoint (real key layout) and a small "
                                   "captioned dataset, then load the model and show what it is. Needs no "
                                   "download and runs on a CPU in seconds.")
    p.add_argument("--out", default="sdtune_demo", help="folder for the demo files (default: ./sdtune_demo)")
    p.add_argument("--arch", default="sd1", choices=("sd1", "sd2", "sd2-v", "sdxl", "sdxl-refiner", "all"),
                   help="which tiny architecture to build (default sd1)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from ..demo.dataset import write_demo_dataset
    from ..demo.tiny_models import TINY_ARCHITECTURES, write_tiny_checkpoint
    from ..models.inspect import format_count, inspect_model
    from . import emit

    out = Path(args.out)
    archs = TINY_ARCHITECTURES if args.arch == "all" else (args.arch,)
    models_dir = out / "models" / "Stable-diffusion"
    dataset = write_demo_dataset(out / "dataset")
    lines = [f"dataset: {len(dataset.items)} captioned images in {dataset.train_dir} "
             f"(trigger word '{dataset.trigger}')"]
    result = {"output": str(out), "dataset": str(dataset.root), "models": []}
    clean = True
    for arch in archs:
        path = write_tiny_checkpoint(arch, models_dir, name=f"sdtune-tiny-{arch}")
        info = inspect_model(path, load=True)
        clean &= not info.missing_keys and not info.unexpected_keys
        result["models"].append(info.to_dict())
        lines.append(
            f"model:   {path.name}: {info.architecture}, {info.prediction_type}, "
            + ", ".join(f"{k} {format_count(v)}" for k, v in info.components.items())
            + f"; loaded in {info.load_seconds:.1f} s with {len(info.missing_keys)} missing / "
            f"{len(info.unexpected_keys)} unexpected keys; AutoV2 {info.hashes['autov2']}")
    result["clean_load"] = clean
    emit(result, args.json, "\n".join(lines))
    return 0 if clean else 1
