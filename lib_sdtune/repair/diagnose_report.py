"""The over-fit diagnosis report: verdicts with their numbers, the measurements behind them, as JSON, text and PNG.

`write(out_dir)` puts report.json, report.txt and report.png into a folder, each written atomically.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..io.atomic import atomic_write, atomic_write_text
from .diagnose_te import EncoderDrift
from .diagnose_thresholds import Thresholds
from .diagnose_weights import LoraStats

REPORT_FILES = ("report.json", "report.txt", "report.png")


@dataclass
class Verdict:
    """One symptom: triggered or not, the number measured and the threshold it was judged by, what to do."""

    symptom: str
    triggered: bool
    value: float
    threshold: float
    advice: str
    command: Optional[str] = None  # the sdtune command that repairs it, when one does
    measure: str = ""  # what `value` is
    direction: str = "above"  # the symptom shows when value is "above" / "below" the threshold

    def to_dict(self) -> dict:
        return {"symptom": self.symptom, "triggered": self.triggered, "value": _num(self.value),
                "threshold": self.threshold, "direction": self.direction, "measure": self.measure,
                "advice": self.advice, "command": self.command}

    def line(self) -> str:
        """"value < threshold" or "value >= threshold" as judged."""
        if self.direction == "below":
            op = "<" if self.triggered else ">="
        else:
            op = ">" if self.triggered else "<="
        return f"{_fmt(self.value)} {op} {_fmt(self.threshold)}"


def _num(x: float) -> Optional[float]:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else round(float(x), 6)


def _fmt(x: Optional[float]) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.3f}" if abs(x) < 100 else f"{x:.3g}"


@dataclass
class DiagnosisReport:
    """What `diagnose` found; `verdicts` first, the measurements after."""

    kind: str  # "checkpoint" | "lora"
    model: str  # the tuned checkpoint or the LoRA file
    base: str
    architecture: str
    verdicts: list[Verdict]
    encoders: list[EncoderDrift] = field(default_factory=list)
    blocks: dict[str, float] = field(default_factory=dict)  # U-Net block slot -> ‖ΔW‖/‖W‖
    lora: Optional[LoraStats] = None
    lora_strength: float = 1.0
    tags_source: str = ""
    notes: list[str] = field(default_factory=list)
    thresholds: Thresholds = field(default_factory=Thresholds)
    seconds: float = 0.0

    @property
    def triggered(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.triggered]

    def to_dict(self) -> dict:
        """JSON-ready: verdicts, encoders, U-Net blocks, LoRA module numbers, thresholds with reasons."""
        return {"kind": self.kind, "model": self.model, "base": self.base, "architecture": self.architecture,
                "lora_strength": self.lora_strength if self.kind == "lora" else None,
                "triggered": len(self.triggered), "verdicts": [v.to_dict() for v in self.verdicts],
                "tags_source": self.tags_source, "encoders": [e.to_dict() for e in self.encoders],
                "unet_blocks": {k: _num(v) for k, v in self.blocks.items()},
                "lora": self.lora.to_dict() if self.lora is not None else None, "notes": self.notes,
                "thresholds": self.thresholds.table(), "seconds": round(self.seconds, 3)}

    def format_text(self) -> str:
        """The human-readable report: verdicts and advice first, then the numbers."""
        what = "LoRA" if self.kind == "lora" else "checkpoint"
        lines = [f"sdtune over-fit diagnosis of a {what} ({self.architecture}), {self.seconds:.1f} s",
                 f"  {'lora' if self.kind == 'lora' else 'model'}: {self.model}"
                 + (f"  (strength {self.lora_strength:g})" if self.kind == "lora" else ""),
                 f"  base:  {self.base}", f"  tags:  {self.tags_source}", "", "Verdicts"]
        for v in self.verdicts:
            lines.append(f"  [{'!!' if v.triggered else 'ok'}] {v.symptom}: {v.line()}  ({v.measure})")
            lines.append(f"       {v.advice}")
            if v.command and v.triggered:
                lines.append(f"       $ {v.command}")
        if self.encoders:
            lines += ["", "Text encoder (cosine base vs tuned, 1 = unchanged)"]
            for e in self.encoders:
                weights = f", weights ‖ΔW‖/‖W‖ {_fmt(e.weight_delta)}" if e.weight_delta is not None else ""
                lines.append(f"  {e.label}: control prompts {_fmt(e.control_cosine)}, similarity of different "
                             f"{e.collapse_over} {_fmt(e.similarity_base)} -> {_fmt(e.similarity_tuned)} "
                             f"(collapse {_fmt(e.collapse)}){weights}")
                if e.tags:
                    top = ", ".join(f"{t} {_fmt(c)}" for t, c in e.most_drifted(8))
                    lines.append(f"    most drifted tags: {top}")
                if e.scale_trials:
                    trials = ", ".join(f"x{s:g}: {_fmt(c)} / {_fmt(k)}" for s, (c, k) in e.scale_trials.items())
                    lines.append(f"    TE scale trials (cosine / collapse): {trials}")
        if self.blocks:
            lines += ["", "U-Net blocks (‖ΔW‖/‖W‖)"]
            items = [f"{k} {_fmt(v)}" for k, v in self.blocks.items()]
            lines += ["  " + "  ".join(items[i:i + 7]) for i in range(0, len(items), 7)]
        if self.lora is not None:
            d = self.lora.to_dict(top=5)
            lines += ["", f"LoRA: {d['algorithm']}, {d['modules']} modules matched, update share text encoder "
                          f"{d['te_share']:.1%} / U-Net {d['unet_share']:.1%}, median effective rank "
                          f"{d['median_effective_rank']:.2f}"]
            for m in d["largest_relative"]:
                lines.append(f"  {m['name']} ({m['group']}): ‖ΔW‖/‖W‖ {_fmt(m['relative'])}, rank {m['rank']}, "
                             f"effective rank {m['effective_rank']:.2f}")
            if self.lora.unmatched:
                lines.append(f"  {len(self.lora.unmatched)} modules match no layer of the base, e.g. "
                             f"{self.lora.unmatched[0]}")
        lines += [""] + [f"note: {n}" for n in self.notes]
        lines += ["Thresholds (DiagnoseConfig.thresholds; lib_sdtune/repair/diagnose_thresholds.py says why):",
                  "  " + ", ".join(f"{t['name']} {t['value']}" for t in self.thresholds.table())]
        return "\n".join(lines).rstrip() + "\n"

    def chart_png(self) -> bytes:
        """A PNG: per-prompt TE cosines, U-Net block deltas, each against its threshold, and the verdicts."""
        from .diagnose_chart import draw_report

        return draw_report(self)

    def write(self, out_dir: str | os.PathLike) -> list[Path]:
        """report.json, report.txt and report.png into `out_dir` (created if missing), each atomically."""
        folder = Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        paths = [folder / name for name in REPORT_FILES]
        atomic_write_text(paths[0], json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n")
        atomic_write_text(paths[1], self.format_text())
        with atomic_write(paths[2]) as fh:
            fh.write(self.chart_png())
        return paths
