"""`demo`: the end-to-end demo on the built-in tiny model and generated dataset.

Writes a tiny real-layout checkpoint and a kohya-style dataset, loads the model and reports it, then
plans a LoRA run for the dataset (the planner's TOML, written as a user would get it), trains it on the
CPU with the resolution and epochs shrunk so it takes about a minute, reports the loss curve and the LoRA
file written, and runs the over-fit diagnosis on that LoRA (report in `<out>/diagnosis/`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the end-to-end demo on a built-in tiny model and dataset",
                       description="Generate a tiny Stable Diffusion checkpoint (real key layout) and a small "
                                   "captioned dataset, then load the model and show what it is. Needs no "
                                   "download and runs on a CPU in seconds.")
    p.add_argument("--out", default="sdtune_demo", help="folder for the demo files (default: ./sdtune_demo)")
    p.add_argument("--arch", default="sd1", choices=("sd1", "sd2", "sd2-v", "sdxl", "sdxl-refiner", "all"),
                   help="which tiny architecture to build (default sd1)")
    p.add_argument("--no-train", action="store_true", help="stop after building and loading the model")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=run_demo)


# what the demo changes in the planned config so a CPU finishes in about a minute (tiny 64 px images)
DEMO_OVERRIDES = ("resolution=64", "min_bucket_reso=64", "max_bucket_reso=128", "max_train_epochs=4",
                  "train_batch_size=8", "lr_warmup_steps=0.1")


def _plan_and_train(dataset_dir: Path, model: Path, out: Path, lines: list[str], result: dict) -> bool:
    """Plan (as `plan` does), train the plan on the CPU with DEMO_OVERRIDES, report; False if it failed."""
    from ..networks.lora_info import inspect_lora
    from ..repair.diagnose import DiagnoseConfig, diagnose
    from ..train.config import load_train_config
    from ..train.planner import plan_training
    from ..train.trainer import train

    plan = plan_training(dataset_dir, model, vram_gb=0, output_dir=out / "output")
    plan_path = plan.write(out / "plan.toml")
    lines.append(f"plan:    {plan.steps.epochs} epochs / {plan.steps.total_steps} steps planned for "
                 f"{plan.dataset_facts.n_images} images; config written to {plan_path}")
    cfg, notes = load_train_config(plan_path, DEMO_OVERRIDES)
    lines.append(f"train:   the plan as written, with {', '.join(DEMO_OVERRIDES)} so the CPU finishes quickly")
    started = time.time()
    run = train(cfg, device="cpu", notes=notes)
    seconds = time.time() - started
    losses = run.losses
    per_epoch = max(1, len(losses) // max(1, run.epochs))
    means = [sum(losses[i:i + per_epoch]) / len(losses[i:i + per_epoch]) for i in range(0, len(losses), per_epoch)]
    lora = inspect_lora(run.outputs[-1])
    lines.append(f"         {run.steps} steps in {seconds:.0f} s; mean loss per epoch: "
                 + ", ".join(f"{m:.4f}" for m in means))
    lines.append(f"lora:    {run.outputs[-1]}: {lora.algorithm}, rank {lora.rank}, {lora.te_modules} TE + "
                 f"{lora.unet_modules} U-Net modules, base {lora.base_model_version}")
    lines.append(f"logs:    {', '.join(str(p) for p in run.log_paths)} (loss per step and epoch, loss curve)")
    report = diagnose(DiagnoseConfig(base=str(model), lora=str(run.outputs[-1]), dataset=str(dataset_dir)))
    written = report.write(out / "diagnosis")
    flagged = [v.symptom for v in report.verdicts if v.triggered]
    lines.append(f"check:   repair diagnose: {len(flagged)} of {len(report.verdicts)} over-fit signs "
                 f"{'(' + ', '.join(flagged) + ')' if flagged else 'found'}; report in {written[0].parent}")
    result.update({"plan": str(plan_path), "train": {"steps": run.steps, "seconds": round(seconds, 1),
                                                      "losses": losses, "outputs": [str(p) for p in run.outputs]},
                   "diagnosis": [str(p) for p in written]})
    return bool(run.outputs)


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
    if clean and not args.no_train:
        first = "sd1" if args.arch == "all" else args.arch
        if first == "sdxl-refiner":
            lines.append("train:   skipped (LoRAs are trained on the SDXL base, not the refiner)")
        else:
            model = models_dir / f"sdtune-tiny-{first}.safetensors"
            clean = _plan_and_train(dataset.train_dir, model, out, lines, result)
    emit(result, args.json, "\n".join(lines))
    return 0 if clean else 1
