"""The plan as text for people: the dataset, each value with its reason and source, the steps math, warnings."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .planner import TrainingPlan

# sections of the text, in the order a beginner should read them (batch size first: seed 001)
SECTIONS = (
    ("Batch and resolution", ("train_batch_size", "resolution", "enable_bucket", "min_bucket_reso", "max_bucket_reso",
                              "bucket_reso_steps")),
    ("Learning rates", ("optimizer_type", "unet_lr", "text_encoder_lr", "learning_rate", "lr_scheduler",
                        "lr_warmup_steps", "max_grad_norm", "min_snr_gamma", "noise_offset")),
    ("Network", ("network_module", "network_dim", "network_alpha", "network_args", "network_train_unet_only")),
    ("How long, saving and validation", ("max_train_epochs", "save_every_n_epochs", "validation_split",
                                         "validation_seed", "validate_every_n_epochs")),
    ("Memory", ("mixed_precision", "no_half_vae", "gradient_checkpointing", "cache_latents",
                "cache_text_encoder_outputs", "save_precision")),
    ("Captions", ("caption_extension", "shuffle_caption", "keep_tokens", "max_token_length", "clip_skip",
                  "flip_aug")),
)


def _fmt(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(str(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def format_plan(plan: TrainingPlan) -> str:
    """Human-readable plan; every value line ends with its source in brackets."""
    f, s = plan.dataset_facts, plan.steps
    device = f"{plan.vram_gb:g} GB GPU" if plan.vram_gb else "CPU only"
    lines = [f"Plan for {plan.dataset}",
             f"  model: {plan.model.architecture} ({plan.model.how}"
             + (f": {plan.model.path.name}" if plan.model.path else "") + f"), method: {plan.method}, {device}",
             f"  {f.n_images} training image(s)" + (f", {f.n_reg} reg image(s)" if f.n_reg else "")
             + f", captions: {'tags' if f.tag_captions else 'sentences or none'}"
             + (f", on every image: {', '.join(f.shared_tags[:5])}" if f.shared_tags else ""), ""]
    shown = set()
    by_key = {v.key: v for v in plan.values}
    for title, keys in SECTIONS:
        rows = [by_key[k] for k in keys if k in by_key and by_key[k].value is not None]
        if not rows:
            continue
        lines.append(title + ":")
        for v in rows:
            shown.add(v.key)
            lines.append(f"  {v.key} = {_fmt(v.value)}")
            if v.reason:
                lines.append(f"      {v.reason} [{v.source}]")
        if title.startswith("How long"):
            lines.append(f"  steps: {s.train_samples_per_epoch} training samples/epoch"
                         + (f" + {s.samples_per_epoch - s.train_samples_per_epoch} reg" if
                            s.samples_per_epoch > s.train_samples_per_epoch else "")
                         + f"; batches/epoch = sum over {len(s.buckets)} bucket(s) of ceil(samples/{s.batch_size}) = "
                         + f"{s.batches_per_epoch}; {s.epochs} epochs x {s.batches_per_epoch} = {s.total_steps} steps")
            for b in s.buckets[:8]:
                lines.append(f"      bucket {b.resolution[0]}x{b.resolution[1]}: {b.samples} samples -> "
                             f"{b.batches} batch(es)")
            if len(s.buckets) > 8:
                lines.append(f"      ... {len(s.buckets) - 8} more bucket(s)")
        lines.append("")
    rest = [v for v in plan.values if v.key not in shown and v.value is not None]
    if rest:
        lines.append("Files:")
        lines += [f"  {v.key} = {_fmt(v.value)}" for v in rest]
        lines.append("")
    if plan.repeats_advice:
        lines.append("Repeats:")
        lines += [f"  rename {Path(a.folder).name} for {a.suggested} repeats (now {a.current})"
                  for a in plan.repeats_advice]
        lines.append("")
    if plan.warnings:
        lines.append(f"Warnings ({len(plan.warnings)}):")
        for w in plan.warnings:
            lines.append(f"  [{w.kind}] {w.message}" + (f" [{w.source}]" if w.source else ""))
    return "\n".join(lines).rstrip() + "\n"
