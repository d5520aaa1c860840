"""`plan DATASET`: the planner's recommendation with reasons, and (with -o) a config `train` accepts as is."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan", help="recommend batch, LR, rank, epochs and memory settings for a dataset; write a train config",
        description="Scan a dataset (the parent of '<repeats>_<name>' folders, or a dataset_config .toml) and "
                    "recommend batch size, learning rates, rank/alpha, epochs, saving, validation and memory "
                    "settings for the base model and GPU, each with its reason and source; with -o, write the "
                    "config (sd-scripts argument names) that `train` runs as is.")
    p.add_argument("dataset", metavar="DATASET", help="training folder (parent of '<repeats>_<name>' folders) or a "
                                                      "dataset_config .toml/.json")
    p.add_argument("--model", metavar="CKPT", help="the base checkpoint (its family and v-prediction are detected)")
    p.add_argument("--method", choices=("lora", "locon", "loha", "lokr"), default="lora",
                   help="network type (default lora)")
    p.add_argument("--vram", type=float, metavar="GB", help="GPU memory in GB, 0 for no GPU (default: this "
                                                            "machine's CUDA GPU, else the CPU)")
    p.add_argument("--family", choices=("sd1", "sd2", "sd2-v", "sdxl", "sdxl-v"),
                   help="the model family when no --model is given")
    p.add_argument("--optimizer", metavar="NAME", help="AdamW, AdamW8bit, Lion, Prodigy, DAdaptAdam, ... (default: "
                                                       "AdamW8bit on a GPU, AdamW on the CPU)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="the GPU runs bf16 (RTX 30xx or newer); default: ask this machine's GPU")
    p.add_argument("--reg", metavar="DIR", help="regularisation folder (parent of '<repeats>_<class>' folders)")
    p.add_argument("--output-dir", metavar="DIR", help="where training writes the LoRA files (default: beside the "
                                                       "config, else beside the dataset)")
    p.add_argument("--output-name", metavar="NAME", help="the LoRA file name (default: the trigger word or folder)")
    p.add_argument("--no-duplicates", action="store_true", help="skip the near-duplicate check (decodes every image)")
    p.add_argument("-o", "--output", metavar="CONFIG.toml", help="write the config here (atomically)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    from ..train.planner import plan_training
    from . import emit

    output_dir = args.output_dir
    if output_dir is None and args.output:
        output_dir = str(Path(args.output).expanduser().resolve().parent / "output")
    plan = plan_training(args.dataset, args.model, args.method, args.vram, args.family, optimizer=args.optimizer,
                         reg_data_dir=args.reg, output_dir=output_dir, output_name=args.output_name, bf16=args.bf16,
                         check_duplicates=not args.no_duplicates)
    result = plan.to_dict()
    human = plan.to_text()
    if args.output:
        written = plan.write(args.output)
        result["output"] = str(written)
        human += f"\nconfig written to {written}\n"
    emit(result, args.json, human)
    return 0
