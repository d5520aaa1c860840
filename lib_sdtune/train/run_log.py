"""The run's log: per-step and per-epoch losses as JSON, a loss-curve PNG, TensorBoard when installed,
and the it/s-collapse detector.

The JSON (`<name>-log.json`) and the PNG (`<name>-loss.png`) are rewritten atomically after every epoch, so
a crashed run keeps the curve up to its last epoch. The PNG is drawn with Pillow (no plotting library).
A sudden, lasting drop of the step rate (VRAM spilling into shared system memory on Windows drivers is
the usual cause) is reported once with what to change.
"""

from __future__ import annotations

import io
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from PIL import Image, ImageDraw

from ..io.atomic import atomic_write, atomic_write_text

__all__ = ["RunLog", "draw_loss_curve"]

COLLAPSE_FACTOR = 3.0  # a step this many times slower than the recent median ...
COLLAPSE_STEPS = 5  # ... this many times in a row is a collapse, not a hiccup
COLLAPSE_WINDOW = 20


@dataclass
class RunLog:
    """Losses and timings of one run, written beside its outputs."""

    out_dir: Path
    name: str
    logging_dir: Optional[str] = None
    steps: list[dict[str, Any]] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    collapse_reported: bool = False
    _tb: Any = None

    def __post_init__(self) -> None:
        if self.logging_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional; the JSON log and PNG are always written
                return
            self._tb = SummaryWriter(str(Path(self.logging_dir) / self.name))

    def continue_from(self, step: int) -> None:
        """On resume: keep the earlier log's entries up to `step` (a cancelled run's partial epoch included)."""
        try:
            old = json.loads(self.json_path.read_text())
        except (OSError, ValueError):
            return
        self.steps = [s for s in old.get("steps", []) if s["step"] <= step]
        kept, total = [], 0
        for e in old.get("epochs", []):
            if total + e["steps"] > len(self.steps):
                break
            kept.append(e)
            total += e["steps"]
        self.epochs = kept

    def add_step(self, step: int, loss: float, lr: float, seconds: float) -> Optional[str]:
        """Record one optimizer step; returns a warning the first time the step rate collapses."""
        self.steps.append({"step": step, "loss": loss, "lr": lr})
        if self._tb is not None:
            self._tb.add_scalar("loss/current", loss, step)
            self._tb.add_scalar("lr/unet", lr, step)
        recent = self.step_seconds[-COLLAPSE_WINDOW:]
        self.step_seconds.append(seconds)
        if self.collapse_reported or len(recent) < COLLAPSE_WINDOW:
            return None
        base = statistics.median(recent[:COLLAPSE_WINDOW - COLLAPSE_STEPS + 1])
        tail = self.step_seconds[-COLLAPSE_STEPS:]
        if base > 0 and all(t > COLLAPSE_FACTOR * base for t in tail):
            self.collapse_reported = True
            return (f"training slowed from {1 / base:.2f} to {1 / statistics.median(tail):.2f} steps/s at step "
                    f"{step}: the GPU memory is probably spilling into shared system memory. Lower "
                    "train_batch_size or resolution, set gradient_checkpointing = true, or turn off the NVIDIA "
                    "driver's 'CUDA - Sysmem Fallback Policy' so it fails fast instead")
        return None

    def end_epoch(self, epoch: int, validation_loss: Optional[float]) -> None:
        """Close an epoch: its mean training loss and validation loss; rewrite the JSON and the PNG."""
        done = sum(e["steps"] for e in self.epochs)
        mine = self.steps[done:]
        mean = sum(s["loss"] for s in mine) / len(mine) if mine else None
        self.epochs.append({"epoch": epoch, "steps": len(mine), "train_loss": mean,
                            "validation_loss": validation_loss})
        if self._tb is not None:
            if mean is not None:
                self._tb.add_scalar("loss/epoch_average", mean, epoch)
            if validation_loss is not None:
                self._tb.add_scalar("loss/validation/epoch_average", validation_loss, epoch)
        self.write()

    @property
    def json_path(self) -> Path:
        return self.out_dir / f"{self.name}-log.json"

    @property
    def png_path(self) -> Path:
        return self.out_dir / f"{self.name}-loss.png"

    def write(self) -> None:
        """Write the JSON log and the loss-curve PNG (atomically)."""
        atomic_write_text(self.json_path, json.dumps({"epochs": self.epochs, "steps": self.steps}, indent=1))
        ends = [sum(e["steps"] for e in self.epochs[:i + 1]) for i in range(len(self.epochs))]
        validation = [(end, e["validation_loss"]) for end, e in zip(ends, self.epochs)
                      if e["validation_loss"] is not None]
        png = draw_loss_curve([s["loss"] for s in self.steps], validation, ends)
        with atomic_write(self.png_path) as fh:
            fh.write(png)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def draw_loss_curve(losses: list[float], validation: list[tuple[int, float]], epoch_ends: list[int],
                    size: tuple[int, int] = (800, 400)) -> bytes:
    """A PNG of the training loss (grey: per step, blue: moving average) and validation loss (orange dots at
    the step count where each was measured), with epoch boundaries as light lines."""
    w, h = size
    pad = 48
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    d.rectangle([pad, 10, w - 10, h - pad], outline=(160, 160, 160))
    values = list(losses) + [v for _, v in validation]
    if not losses:
        d.text((pad + 10, h // 2), "no steps yet", fill="black")
        buf = io.BytesIO()
        im.save(buf, "PNG")
        return buf.getvalue()
    lo, hi = min(values), max(values)
    hi = hi if hi > lo else lo + 1e-6
    n = max(1, len(losses) - 1)

    def xy(i: float, v: float) -> tuple[float, float]:
        return pad + (w - 10 - pad) * i / n, 10 + (h - pad - 10) * (hi - v) / (hi - lo)

    for end in epoch_ends[:-1]:
        x = xy(end - 1, lo)[0]
        d.line([(x, 10), (x, h - pad)], fill=(225, 225, 225))
    d.line([xy(i, v) for i, v in enumerate(losses)] or [(0, 0)], fill=(190, 190, 190))
    smooth = _moving_average(losses, max(1, len(losses) // 20))
    d.line([xy(i, v) for i, v in enumerate(smooth)] or [(0, 0)], fill=(30, 90, 200), width=2)
    for end, v in validation:
        x, y = xy(max(0, end - 1), v)
        d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(230, 120, 20))
    d.text((4, 10), f"{hi:.4f}", fill="black")
    d.text((4, h - pad - 10), f"{lo:.4f}", fill="black")
    d.text((pad, h - pad + 8), f"step 1 .. {len(losses)}   grey: loss, blue: moving average, "
                               f"orange: validation loss per epoch", fill="black")
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()
