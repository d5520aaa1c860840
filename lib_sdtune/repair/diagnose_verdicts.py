"""From measurements to verdicts: each symptom with its number, its threshold, and the repair with its command.

Symptoms (the seeds' "tags stop working, strange details, thicker lines"):
- language drift of a text encoder: control prompts read differently -> override the TE with the base's
  (checkpoint) or lower the LoRA's TE strength (`repair lora-te --scale`, the largest tried scale that passes);
- tags stop working: different tags read alike (collapse) -> the same repairs;
- U-Net over-trained: a U-Net block moved far from the base -> merge the U-Net back toward the base by the
  ratio that brings that block to the threshold (checkpoint), or use the LoRA at the strength that does.
When the file has earlier epochs beside it, the advice also names `repair pick-epoch`.
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path
from typing import Optional, Sequence

from .diagnose_report import Verdict
from .diagnose_te import EncoderDrift, encoder_label
from .diagnose_thresholds import Thresholds

CLI = "python -m lib_sdtune"


def _q(path: str | Path) -> str:
    return shlex.quote(str(path))


def _beside(path: str, suffix: str) -> Path:
    """An output name beside `path`: <stem><suffix>.safetensors."""
    p = Path(path)
    return p.with_name(f"{p.stem}{suffix}.safetensors")


def _te_option(family: str, encoders: Sequence[str]) -> str:
    """`--te N` when only one of SDXL's two encoders needs the repair."""
    return f" --te {encoders[0]}" if family == "sdxl" and len(encoders) == 1 else ""


def te_command(kind: str, family: str, model: str, base: str, flagged: Sequence[EncoderDrift]) -> Optional[str]:
    """The repair of the flagged encoders: te-override from the base, or lora-te with the largest passing scale."""
    if not flagged:
        return None
    te = _te_option(family, [e.encoder for e in flagged])
    tag = te.replace(" --te ", "-te") if te else "-te"
    if kind == "checkpoint":
        out = _beside(model, tag + "-base")
        return f"{CLI} repair te-override --model {_q(model)} --donor {_q(base)}{te} -o {_q(out)}"
    scale = min(e.suggested_scale if e.suggested_scale is not None else 0.0 for e in flagged)
    if scale <= 0.0:
        return f"{CLI} repair lora-te --lora {_q(model)} --strip{te} -o {_q(_beside(model, tag + '-stripped'))}"
    return f"{CLI} repair lora-te --lora {_q(model)} --scale {scale:g}{te} -o {_q(_beside(model, f'{tag}{scale:g}'))}"


def _te_advice(kind: str, triggered: bool, e: EncoderDrift, what: str, model: str, strength: float) -> str:
    if not triggered:
        return f"{e.label} {what}"
    if kind == "checkpoint":
        return f"replace {e.label} with the base model's (repair te-override), or blend it back (repair te-blend)"
    if e.suggested_scale is None or e.suggested_scale <= 0.0:
        return f"the LoRA's {e.label} part fails even at the smallest scale tried: strip it (repair lora-te --strip)"
    return (f"lower the LoRA's {e.label} strength to {e.suggested_scale:g} x (repair lora-te --scale); at use time "
            f"in A1111 the same is <lora:{Path(model).stem}:{e.suggested_scale * strength:g}:{strength:g}> (the "
            f"first number is the text-encoder multiplier)")


def te_verdicts(kind: str, family: str, model: str, base: str, drifts: Sequence[EncoderDrift],
                t: Thresholds, strength: float = 1.0) -> list[Verdict]:
    """Language drift and tag collapse per encoder; the command repairs every encoder flagged by either."""
    flagged = [e for e in drifts if e.control_cosine < t.control_cosine or e.collapse > t.collapse]
    command = te_command(kind, family, model, base, flagged)
    out = []
    for e in drifts:
        drift = e.control_cosine < t.control_cosine
        out.append(Verdict(f"language drift in {e.label}", drift, e.control_cosine, t.control_cosine,
                           _te_advice(kind, drift, e, "reads ordinary prompts as the base does", model, strength),
                           command if drift else None,
                           f"mean cosine of {len(e.controls)} control prompts, base vs tuned", "below"))
        collapsed = e.collapse > t.collapse
        out.append(Verdict(f"tags stop working in {e.label}", collapsed, e.collapse, t.collapse,
                           _te_advice(kind, collapsed, e, f"keeps different {e.collapse_over} apart", model,
                                      strength),
                           command if collapsed else None,
                           f"share of the distinctness between {e.collapse_over} lost "
                           f"({e.similarity_base:.3f} -> {e.similarity_tuned:.3f})", "above"))
    return out


def untouched_te_verdicts(family: str, components: Sequence[str], t: Thresholds) -> list[Verdict]:
    """A LoRA without text-encoder modules leaves the encoder(s) exactly as the base's: nothing to measure."""
    out = []
    for c in components:
        label = encoder_label(family, c)
        advice = f"the LoRA has no {label} modules, so {label} is exactly the base's"
        out.append(Verdict(f"language drift in {label}", False, 1.0, t.control_cosine, advice, None,
                           "exact: no text-encoder modules", "below"))
        out.append(Verdict(f"tags stop working in {label}", False, 0.0, t.collapse, advice, None,
                           "exact: no text-encoder modules", "above"))
    return out


def _floor(x: float, step: float = 0.05) -> float:
    return max(step, math.floor(x / step + 1e-9) * step)


def _ceil(x: float, step: float = 0.05) -> float:
    return min(1.0, math.ceil(x / step - 1e-9) * step)


def unet_verdict(kind: str, model: str, base: str, blocks: dict[str, float], t: Thresholds,
                 lora_strength: float = 1.0) -> Optional[Verdict]:
    """The U-Net verdict from the block with the largest relative change (None without U-Net numbers)."""
    if not blocks:
        return None
    slot, value = max(blocks.items(), key=lambda kv: kv[1])
    triggered = value > t.unet_block_delta
    measure = f"largest relative weight change ‖ΔW‖/‖W‖ of a U-Net block ({slot})"
    symptom = "U-Net over-trained (odd details, thick lines)"
    if not triggered:
        return Verdict(symptom, False, value, t.unet_block_delta, "no U-Net block moved far from the base", None,
                       measure)
    ratio = t.unet_block_delta / value
    if kind == "checkpoint":
        alpha = round(_ceil(1.0 - ratio), 2)
        out = _beside(model, f"-unet{alpha:g}-base")
        return Verdict(symptom, True, value, t.unet_block_delta,
                       f"merge the U-Net back toward the base by {alpha:g} (weighted_sum; text encoder and VAE "
                       f"kept), which brings {slot} to the threshold", f"{CLI} merge {_q(model)} {_q(base)} "
                       f"--unet-alpha {alpha:g} --te-alpha 0 --vae-alpha 0 -o {_q(out)}", measure)
    strength = round(_floor(lora_strength * ratio), 2)
    return Verdict(symptom, True, value, t.unet_block_delta,
                   f"use the LoRA at strength {strength:g} or lower (<lora:{Path(model).stem}:{strength:g}>), which "
                   f"brings {slot} to the threshold; or lower that block with LoRA Block Weight", None, measure)


def add_epoch_hint(verdicts: Sequence[Verdict], run_dir: Optional[Path], base: str) -> None:
    """Name `repair pick-epoch` in the advice of every triggered verdict when earlier epochs exist."""
    if run_dir is None:
        return
    hint = f"; or keep an earlier epoch: {CLI} repair pick-epoch {_q(run_dir)} --base {_q(base)}"
    for v in verdicts:
        if v.triggered:
            v.advice += hint
