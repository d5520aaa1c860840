"""The diagnosis chart, drawn with Pillow (no plotting library), like the trainer's loss curve.

One panel per text encoder (each prompt's cosine base vs tuned: control prompts blue, tags orange, most drifted
first, the control threshold as a red line), one for the U-Net blocks (|dW|/|W| per block against its threshold),
and the verdicts in red (triggered) or green.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from .diagnose_report import DiagnosisReport

WIDTH = 1000
PAD = 56
PANEL = 190
BLUE, ORANGE, RED, GREEN, GREY = (40, 100, 200), (230, 120, 20), (200, 30, 30), (20, 140, 60), (170, 170, 170)
MAX_TAG_BARS = 40


def _panel(d: ImageDraw.ImageDraw, top: int, title: str, values: Sequence[tuple[str, float, tuple]],
           lo: float, hi: float, threshold: float, label_bars: bool) -> None:
    """Bars of `values` (label, value, colour) between lo and hi, with a red threshold line."""
    left, right, bottom = PAD, WIDTH - 12, top + PANEL - (34 if label_bars else 22)
    d.text((left, top), title, fill="black")
    y0 = top + 16
    d.rectangle([left, y0, right, bottom], outline=GREY)
    hi = hi if hi > lo else lo + 1e-6

    def y(v: float) -> float:
        return bottom - (bottom - y0) * (min(max(v, lo), hi) - lo) / (hi - lo)

    d.text((4, y0 - 4), f"{hi:.3g}", fill="black")
    d.text((4, bottom - 8), f"{lo:.3g}", fill="black")
    n = max(1, len(values))
    step = (right - left) / n
    base = y(max(lo, 0.0))
    for i, (label, v, colour) in enumerate(values):
        x0 = left + i * step + step * 0.15
        x1 = left + (i + 1) * step - step * 0.15
        d.rectangle([x0, min(y(v), base), max(x0 + 1, x1), max(y(v), base)], fill=colour)
        if label_bars:
            d.text((x0, bottom + 4), label, fill="black")
    ty = y(threshold)
    for x in range(left, right, 12):
        d.line([(x, ty), (min(x + 6, right), ty)], fill=RED, width=2)
    label = f"threshold {threshold:g}"
    box = d.textbbox((left + 6, ty - 15), label)
    d.rectangle([box[0] - 2, box[1] - 1, box[2] + 2, box[3] + 1], fill="white")
    d.text((left + 6, ty - 15), label, fill=RED)


def draw_report(report: DiagnosisReport) -> bytes:
    """The report's chart as PNG bytes."""
    t = report.thresholds
    height = 40 + PANEL * (len(report.encoders) + (1 if report.blocks else 0)) + 18 * len(report.verdicts) + 24
    im = Image.new("RGB", (WIDTH, height), "white")
    d = ImageDraw.Draw(im)
    what = "LoRA" if report.kind == "lora" else "checkpoint"
    d.text((PAD, 8), f"sdtune over-fit diagnosis: {what} {Path(report.model).name} vs base "
                     f"{Path(report.base).name} ({report.architecture})", fill="black")
    top = 30
    for e in report.encoders:
        bars = [("", c, BLUE) for c in e.controls.values()]
        bars += [("", c, ORANGE) for _, c in e.most_drifted(MAX_TAG_BARS)]
        lo = max(-1.0, math.floor((min([t.control_cosine, *(v for _, v, _ in bars)]) - 0.02) * 20) / 20)
        _panel(d, top, f"{e.label}: cosine base vs tuned per prompt (blue: {len(e.controls)} control prompts, "
                       f"orange: tags, most drifted first); collapse {e.collapse:.3f}", bars, lo, 1.0,
               t.control_cosine, False)
        top += PANEL
    if report.blocks:
        bars = [(slot, v, RED if v > t.unet_block_delta else BLUE) for slot, v in report.blocks.items()]
        hi = max([t.unet_block_delta * 1.2, *(v for _, v, _ in bars)])
        _panel(d, top, "U-Net blocks: relative weight change |dW|/|W| per block", bars, 0.0, hi, t.unet_block_delta,
               True)
        top += PANEL
    for v in report.verdicts:
        colour = RED if v.triggered else GREEN
        d.text((PAD, top), f"{'TRIGGERED' if v.triggered else 'ok':>9}  {v.symptom}: {v.line()}", fill=colour)
        top += 18
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()
