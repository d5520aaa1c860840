"""Train LoRA node: the plan (with the node's overrides) trained on ComfyUI's device into ComfyUI's loras folder.

A run writes into `loras/sdtune/<name>/` (a new folder per run: ComfyUI caches LoRAs by name): the LoRA
in kohya names, its epoch files, `<name>-loss.png`, the log and config. Cancel stops at the next step
and leaves `<name>-state` (resumable: queue again with `resume` on) and `<name>-step<N>.safetensors`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import folder_paths
import torch
from comfy_api.latest import io, ui

from .shared import HostProgress, Plan, core_errors, listed_name, log, png_to_image, send_event, whole_device

RUN_FOLDER = "sdtune"  # loras/<RUN_FOLDER>/<name>/ holds a run's files
TE_CHOICES = ["as planned", "on", "off"]
PLAN_TIP = " (0: the plan's)"


def _run_folder(name: str, resume: bool) -> Path:
    """A new folder for this run under loras/sdtune, or with `resume` the newest stopped run of this name."""
    from lib_sdtune.errors import SdtuneError

    if not re.fullmatch(r"[\w.-]+", name) or name.strip(".") == "":
        raise SdtuneError(f"lora_name {name!r}: use letters, digits, '_', '-' and '.' only")
    root = Path(folder_paths.get_folder_paths("loras")[0]) / RUN_FOLDER
    runs = [root / name] + sorted(root.glob(f"{name}_[0-9][0-9][0-9][0-9][0-9]"))
    if resume:
        for run in reversed(runs):
            if (run / f"{run.name}-state").is_dir() and not (run / f"{run.name}.safetensors").exists():
                return run
        raise SdtuneError(f"resume: no stopped run of {name} in {root} (a run stopped with Cancel leaves "
                          f"{name}-state in its folder); turn resume off to start a new run")
    for n in range(100000):
        run = root / (name if n == 0 else f"{name}_{n:05d}")
        if not run.exists():
            return run
    raise SdtuneError(f"{root}: every run folder name {name}_NNNNN is taken")


def _overrides(plan: Any, run: Path, resume: bool, rank: int, alpha: float, unet_lr: float, text_encoder_lr: float,
               text_encoder: str, epochs: int, resolution: int) -> dict[str, Any]:
    """The node's fields as sd-scripts settings on top of the plan (0 / 'as planned' leave the plan's value)."""
    out: dict[str, Any] = {"output_dir": str(run), "output_name": run.name}
    if resume:
        out["resume"] = str(run / f"{run.name}-state")
    if rank:
        out["network_dim"] = rank
    if alpha:
        out["network_alpha"] = alpha
    if unet_lr:
        out["unet_lr"] = unet_lr
    if text_encoder_lr:
        out["text_encoder_lr"] = text_encoder_lr
    if text_encoder != "as planned":
        out["network_train_unet_only"] = text_encoder == "off"
    if epochs:
        out["max_train_epochs"] = epochs
        warmup, total = plan.config.get("lr_warmup_steps"), plan.steps.total_steps
        if warmup and total:
            out["lr_warmup_steps"] = min(0.5, warmup / total)  # the planned share of the (new) run
    if resolution:
        out.update(resolution=resolution, min_bucket_reso=min(256, resolution), max_bucket_reso=2 * resolution)
    return out


class SdtuneTrainLora(io.ComfyNode):
    """Train a LoRA/LyCORIS from a plan; returns its name, the loss curve and (given MODEL/CLIP) the model with it."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SdtuneTrainLora",
            display_name="Train LoRA (sdtune)",
            category="sdtune/train",
            description="Trains the plan on ComfyUI's device (ComfyUI's models are unloaded first) and writes the "
                        "LoRA in kohya names with ss_* metadata into loras/sdtune/<name>/ (it loads in ComfyUI, "
                        "A1111/Forge and kohya). Fields at 0 keep the plan's value. Cancel stops at the next step "
                        "and keeps a resumable state: queue again with resume on. With MODEL/CLIP connected (the "
                        "same checkpoint) they come out with the new LoRA applied by ComfyUI's own LoRA loader.",
            inputs=[
                Plan.Input("plan", tooltip="the plan from Plan LoRA Training (checkpoint, dataset, every setting)"),
                io.String.Input("lora_name", default="",
                                tooltip="the LoRA's name (letters, digits, _ - .); empty: the plan's (the trigger "
                                        "word or the dataset folder). A taken name gets a number: files are never "
                                        "overwritten"),
                io.Int.Input("rank", default=0, min=0, max=1024, tooltip="network dim" + PLAN_TIP),
                io.Float.Input("alpha", default=0.0, min=0.0, max=1024.0, step=0.5,
                               tooltip="network alpha (the update is scaled by alpha/rank)" + PLAN_TIP),
                io.Float.Input("unet_lr", default=0.0, min=0.0, max=10.0, step=1e-5, round=1e-7,
                               tooltip="U-Net learning rate" + PLAN_TIP),
                io.Float.Input("text_encoder_lr", default=0.0, min=0.0, max=10.0, step=1e-5, round=1e-7,
                               tooltip="text-encoder learning rate" + PLAN_TIP),
                io.Combo.Input("text_encoder", options=TE_CHOICES, default="as planned",
                               tooltip="train the text encoder(s) too (on), the U-Net only (off), or as planned"),
                io.Int.Input("epochs", default=0, min=0, max=1000,
                             tooltip="epochs to train (the warm-up keeps its planned share)" + PLAN_TIP),
                io.Int.Input("resolution", default=0, min=0, max=4096, step=64,
                             tooltip="training resolution (bucket range follows)" + PLAN_TIP),
                io.Boolean.Input("resume", default=False,
                                 tooltip="continue the newest run of this name that was stopped with Cancel "
                                         "(same settings), instead of starting a new one"),
                io.Float.Input("strength_model", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="LoRA strength on MODEL (as in Load LoRA)"),
                io.Float.Input("strength_clip", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="LoRA strength on CLIP (as in Load LoRA)"),
                io.Model.Input("model", optional=True,
                               tooltip="optional: the same checkpoint's MODEL, to come out with the new LoRA"),
                io.Clip.Input("clip", optional=True,
                              tooltip="optional: the same checkpoint's CLIP, to come out with the new LoRA"),
            ],
            outputs=[io.String.Output(display_name="lora_name",
                                      tooltip="the LoRA as Load LoRA lists it (sdtune/<name>/<name>.safetensors)"),
                     io.Image.Output(display_name="loss_curve"),
                     io.Model.Output(display_name="model"),
                     io.Clip.Output(display_name="clip"),
                     io.String.Output(display_name="report")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, plan: Any, lora_name: str, rank: int, alpha: float, unet_lr: float, text_encoder_lr: float,
                text_encoder: str, epochs: int, resolution: int, resume: bool, strength_model: float,
                strength_clip: float, model: Optional[Any] = None, clip: Optional[Any] = None) -> io.NodeOutput:
        from lib_sdtune.train.trainer import train

        progress = HostProgress(cls.hidden.unique_id, event="sdtune.train")
        with core_errors(progress):
            run = _run_folder(lora_name.strip() or plan.config.get("output_name", "lora"), resume)
            cfg, notes = plan.train_config(_overrides(plan, run, resume, rank, alpha, unet_lr, text_encoder_lr,
                                                      text_encoder, epochs, resolution), "the Train LoRA node")
            # ComfyUI runs nodes under inference_mode: the run loads its own model, so nothing made outside
            # this block reaches autograd
            with whole_device() as device, torch.inference_mode(False), torch.enable_grad():
                result = train(cfg, progress=progress.progress, cancelled=progress.cancelled, device=device,
                               notes=notes, save_on_cancel=True)
            if result.cancelled:
                log.warning("sdtune: training stopped at step %d; resumable state in %s (queue again with resume on)",
                            result.steps, result.state_dir)
                send_event("sdtune.train.stopped", {"node": cls.hidden.unique_id, "step": result.steps,
                                                    "state": str(result.state_dir)})
                progress.raise_if_interrupted()
        final = result.outputs[-1]
        name = listed_name("loras", final)
        if model is not None or clip is not None:
            model, clip = _apply_lora(final, model, clip, strength_model, strength_clip)
        text = _report(name, result)
        return io.NodeOutput(name, png_to_image(_loss_png(result)), model, clip, text, ui=ui.PreviewText(text))


def _apply_lora(path: Path, model: Any, clip: Any, strength_model: float, strength_clip: float) -> tuple:
    """The LoRA applied as ComfyUI's Load LoRA does it (its loader, its key mapping)."""
    import comfy.sd
    import comfy.utils

    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    return comfy.sd.load_lora_for_models(model, clip, lora, strength_model, strength_clip)


def _loss_png(result: Any) -> bytes:
    """The run's <name>-loss.png, or the curve drawn from the losses when the run wrote none."""
    for path in result.log_paths:
        if str(path).endswith("-loss.png") and Path(path).is_file():
            return Path(path).read_bytes()
    from lib_sdtune.train.run_log import draw_loss_curve

    return draw_loss_curve(result.losses, result.validation_losses, [])


def _report(name: str, result: Any) -> str:
    loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"
    lines = [f"wrote {name}: {result.steps} steps, {result.epochs} epochs, final loss {loss}",
             "files: " + ", ".join(Path(p).name for p in result.outputs)]
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines)
