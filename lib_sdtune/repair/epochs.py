"""Epoch picker: rank the epoch files of a training run and say which one to keep, and why.

A run folder holds `<name>-<epoch:06d>.safetensors` per saved epoch, `<name>.safetensors` for the last one
(its `ss_epoch` says which), and the trainer's log `<name>-log.json` ({"epochs": [{"epoch", "steps",
"train_loss", "validation_loss"}], ...}, train/run_log.py). How the keeper is chosen depends on what is there:
- validation loss and a base: among epochs whose diagnosis passes (text-encoder drift, tag collapse, U-Net
  change), the lowest validation loss; ties (within `validation_tie`) go to the earliest;
- validation loss only: the lowest validation loss, ties to the earliest (drift not measured: say so);
- a base only: the last epoch whose diagnosis still passes (later epochs learned more; the first failing one is
  where over-fitting shows);
- neither: no pick. The training loss falls whether the model learns or over-fits, so it cannot choose.
Step files (`<name>-step<N>.safetensors`) are not epochs and are left out.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ..errors import SdtuneError
from ..io.safetensors_io import read_header
from .diagnose_thresholds import Thresholds

Progress = Callable[[int, int, str], None]
_EPOCH_FILE = re.compile(r"^(?P<name>.+)-(?P<epoch>\d{6})\.safetensors$")
_LOG_SUFFIX = "-log.json"


def earlier_epochs(path: str | Path) -> Optional[Path]:
    """The folder of `path` when other epoch files of the same run lie beside it, else None."""
    p = Path(path)
    m = _EPOCH_FILE.match(p.name)
    name = m.group("name") if m else p.stem
    others = [q for q in p.parent.glob("*.safetensors") if q != p and (mm := _EPOCH_FILE.match(q.name))
              and mm.group("name") == name]
    return p.parent if others else None


@dataclass
class EpochEntry:
    """One epoch: its file (None when pruned), its losses, and with a base its diagnosis numbers."""

    epoch: int
    file: Optional[Path]
    steps: Optional[int] = None
    train_loss: Optional[float] = None
    validation_loss: Optional[float] = None
    control_cosine: Optional[float] = None  # lowest over the text encoders (1.0: no TE part)
    collapse: Optional[float] = None  # highest over the text encoders
    unet_delta: Optional[float] = None  # largest U-Net block ‖ΔW‖/‖W‖
    failed: list[str] = field(default_factory=list)  # triggered verdicts
    diagnosed: bool = False

    @property
    def passes(self) -> Optional[bool]:
        return None if not self.diagnosed else not self.failed

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "file": str(self.file) if self.file else None, "steps": self.steps,
                "train_loss": self.train_loss, "validation_loss": self.validation_loss,
                "control_cosine": _r(self.control_cosine), "collapse": _r(self.collapse),
                "unet_delta": _r(self.unet_delta), "passes": self.passes, "failed": self.failed}


def _r(x: Optional[float]) -> Optional[float]:
    return None if x is None or not math.isfinite(x) else round(x, 6)


def _f(x: Optional[float], digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


@dataclass
class EpochRanking:
    """Epochs best first, the one to keep (`best`, None when nothing can choose), how and why."""

    run_dir: Path
    name: str
    entries: list[EpochEntry]
    best: Optional[Path]
    best_epoch: Optional[int]
    method: str  # "validation loss + diagnosis" | "validation loss" | "diagnosis" | "none"
    reason: str
    base: Optional[str] = None
    notes: list[str] = field(default_factory=list)
    thresholds: Thresholds = field(default_factory=Thresholds)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"run_dir": str(self.run_dir), "name": self.name, "best": str(self.best) if self.best else None,
                "best_epoch": self.best_epoch, "method": self.method, "reason": self.reason, "base": self.base,
                "ranking": [e.to_dict() for e in self.entries], "notes": self.notes,
                "thresholds": self.thresholds.to_dict(), "seconds": round(self.seconds, 3)}

    def format_text(self) -> str:
        keep = f"keep epoch {self.best_epoch}: {self.best}" if self.best else "no epoch picked"
        lines = [f"{self.name} in {self.run_dir}: {len(self.entries)} epochs, ranked by {self.method}",
                 f"  {keep}", f"  why: {self.reason}", "",
                 f"  {'rank':>4} {'epoch':>5} {'val loss':>9} {'train loss':>10} {'TE cos':>7} {'collapse':>8} "
                 f"{'U-Net':>7}  verdict"]
        for i, e in enumerate(self.entries, 1):
            verdict = "-" if e.passes is None else "passes" if e.passes else "fails: " + ", ".join(e.failed)
            if e.file is None:
                verdict = "file gone (pruned)"
            lines.append(f"  {i:>4} {e.epoch:>5} {_f(e.validation_loss):>9} {_f(e.train_loss):>10} "
                         f"{_f(e.control_cosine, 3):>7} {_f(e.collapse, 3):>8} {_f(e.unet_delta, 3):>7}  {verdict}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


def _names(run_dir: Path) -> set[str]:
    names = {p.name[:-len(_LOG_SUFFIX)] for p in run_dir.glob(f"*{_LOG_SUFFIX}")}
    names |= {m.group("name") for p in run_dir.glob("*.safetensors") if (m := _EPOCH_FILE.match(p.name))}
    return names


def _run_name(run_dir: Path, name: Optional[str]) -> str:
    found = _names(run_dir)
    if name is not None:
        if name not in found and not (run_dir / f"{name}.safetensors").is_file():
            raise SdtuneError(f"run_dir: {run_dir} has no run named {name!r} (found: "
                              f"{', '.join(sorted(found)) or 'none'})")
        return name
    if not found:
        raise SdtuneError(f"run_dir: {run_dir} holds no epoch files (<name>-000001.safetensors ...) and no "
                          f"<name>-log.json; is it a training output folder?")
    if len(found) > 1:
        raise SdtuneError(f"run_dir: {run_dir} holds several runs ({', '.join(sorted(found))}); name the one to "
                          f"rank (--name)")
    return next(iter(found))


def _read_log(path: Path) -> dict[int, dict]:
    """epoch -> its log entry; {} without a log. A log that is not the trainer's JSON is refused."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {int(e["epoch"]): e for e in data.get("epochs", [])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise SdtuneError(f"{path}: not a readable sdtune training log ({e}); it should hold "
                          f'{{"epochs": [{{"epoch": 1, "train_loss": ..., "validation_loss": ...}}]}}') from e


def _final_epoch(path: Path, log: dict[int, dict]) -> Optional[int]:
    """The epoch of `<name>.safetensors`: its ss_epoch, else the log's last epoch."""
    meta = read_header(path)[1]
    try:
        return int(meta["ss_epoch"])
    except (KeyError, ValueError):
        return max(log) if log else None


def _entries(run_dir: Path, name: str, log: dict[int, dict], notes: list[str]) -> list[EpochEntry]:
    files: dict[int, Path] = {}
    for p in run_dir.glob(f"{name}-*.safetensors"):
        m = _EPOCH_FILE.match(p.name)
        if m and m.group("name") == name:
            files[int(m.group("epoch"))] = p
    final = run_dir / f"{name}.safetensors"
    if final.is_file():
        epoch = _final_epoch(final, log)
        if epoch is None:
            notes.append(f"{final.name} has no ss_epoch and there is no log; it is left out")
        elif epoch not in files:
            files[epoch] = final
    out = []
    for epoch in sorted(set(files) | set(log)):
        e = log.get(epoch, {})
        out.append(EpochEntry(epoch, files.get(epoch), e.get("steps"), e.get("train_loss"), e.get("validation_loss")))
    return out


def _diagnose_all(entries: list[EpochEntry], base: str, device: Optional[str], thresholds: Thresholds,
                  progress: Optional[Progress], cancelled: Optional[Callable[[], bool]]) -> None:
    """Diagnose every epoch file against `base` (opened once), filling the entries' numbers."""
    from .diagnose import DiagnoseConfig, LoraBase, Steps, diagnose, diagnose_lora

    steps = Steps(progress, cancelled)
    lora_base: Optional[LoraBase] = None
    for e in entries:
        if e.file is None:
            continue
        steps.check()
        if any(k.startswith("lora_") for k in read_header(e.file)[0]):
            lora_base = lora_base or LoraBase(base, device or "cpu")
            report = diagnose_lora(DiagnoseConfig(base, lora=str(e.file), device=device, thresholds=thresholds),
                                   lora_base, steps, scale_trials=False, epoch_hint=False)
        else:
            report = diagnose(DiagnoseConfig(base, model=str(e.file), device=device, thresholds=thresholds),
                              steps.progress, cancelled)
        by = {v.symptom: v for v in report.verdicts}
        cosines = [v.value for s, v in by.items() if s.startswith("language drift")]
        collapses = [v.value for s, v in by.items() if s.startswith("tags stop working")]
        e.control_cosine = min(cosines) if cosines else None
        e.collapse = max(collapses) if collapses else None
        e.unet_delta = max(report.blocks.values()) if report.blocks else None
        e.failed = [v.symptom for v in report.verdicts if v.triggered]
        e.diagnosed = True


def _earliest_within(candidates: list[EpochEntry], tie: float) -> EpochEntry:
    """The earliest epoch whose validation loss is within `tie` (a share) of the lowest."""
    best = min(c.validation_loss for c in candidates)  # type: ignore[type-var]
    limit = best + tie * abs(best)
    return min((c for c in candidates if c.validation_loss <= limit), key=lambda c: c.epoch)  # type: ignore


def _pick(entries: list[EpochEntry], has_base: bool, t: Thresholds) -> tuple[Optional[EpochEntry], str, str, list]:
    """(keeper, method, reason, ranked entries)."""
    with_file = [e for e in entries if e.file is not None]
    gone = [e for e in entries if e.file is None]
    val = [e for e in with_file if e.validation_loss is not None]
    tie = f"within {t.validation_tie:.0%}"
    if val:
        passing = [e for e in val if e.passes] if has_base else val
        if has_base and not passing:
            keeper = max(val, key=lambda e: (e.control_cosine or 0.0, -e.epoch))
            reason = (f"every epoch with a validation loss fails its diagnosis; epoch {keeper.epoch} drifted least "
                      f"(TE cosine {_f(keeper.control_cosine, 3)}): keep it and repair it (`repair diagnose`), or "
                      f"train again with a lower learning rate")
        else:
            keeper = _earliest_within(passing, t.validation_tie)
            lowest = min(passing, key=lambda e: e.validation_loss)  # type: ignore[arg-type]
            reason = (f"lowest validation loss {_f(lowest.validation_loss)} at epoch {lowest.epoch}"
                      + (f"; epoch {keeper.epoch} ({_f(keeper.validation_loss)}) is {tie} and earlier"
                         if keeper is not lowest else "")
                      + ("; it passes the drift diagnosis" if has_base else
                         "; no base given, so text-encoder drift was not measured (give --base B)"))
        ranked = sorted(val, key=lambda e: (has_base and not e.passes, e.validation_loss, e.epoch))
        rest = sorted((e for e in with_file if e.validation_loss is None), key=lambda e: -e.epoch)
        return keeper, "validation loss + diagnosis" if has_base else "validation loss", reason, ranked + rest + gone
    if has_base:
        passing = [e for e in with_file if e.passes]
        failing = sorted((e for e in with_file if not e.passes), key=lambda e: (-(e.control_cosine or 0), e.epoch))
        ranked = sorted(passing, key=lambda e: -e.epoch) + failing + gone
        if passing:
            keeper = ranked[0]
            first_fail = min((e.epoch for e in failing if e.epoch > keeper.epoch), default=None)
            reason = ("no validation loss in the log (train with validation_split > 0 for one): the last epoch "
                      f"whose diagnosis passes is {keeper.epoch}"
                      + (f"; epoch {first_fail} is the first that fails" if first_fail else ""))
            return keeper, "diagnosis", reason, ranked
        keeper = failing[0] if failing else None
        reason = ("no validation loss in the log, and every epoch fails its diagnosis; "
                  + (f"epoch {keeper.epoch} drifted least: keep it and repair it (`repair diagnose`)" if keeper
                     else "no epoch file is left"))
        return keeper, "diagnosis", reason, ranked
    ranked = sorted(with_file, key=lambda e: -e.epoch) + gone
    reason = ("no validation loss in the log and no base given: nothing here tells over-fitting from learning (the "
              "training loss falls either way). Give --base B (the model the run trained on) to measure drift, or "
              "train with validation_split > 0")
    return None, "none", reason, ranked


def pick_epoch(run_dir: str, base: Optional[str] = None, progress: Optional[Progress] = None,
               cancelled: Optional[Callable[[], bool]] = None, *, name: Optional[str] = None,
               device: Optional[str] = None, thresholds: Optional[Thresholds] = None) -> EpochRanking:
    """Rank the epochs of the run in `run_dir` (against `base` when given); see the module doc for the rules."""
    started = time.perf_counter()
    folder = Path(run_dir)
    if not folder.is_dir():
        raise SdtuneError(f"run_dir: {run_dir} is not a folder (give the training output folder)")
    if base is not None and not Path(base).is_file():
        raise SdtuneError(f"base: {base} does not exist (or is not a file)")
    t = thresholds or Thresholds()
    run = _run_name(folder, name)
    log_path = folder / f"{run}{_LOG_SUFFIX}"
    log = _read_log(log_path)
    notes: list[str] = []
    if not log:
        notes.append(f"no training log {log_path.name}: no losses")
    entries = _entries(folder, run, log, notes)
    if not any(e.file for e in entries):
        raise SdtuneError(f"run_dir: {run_dir} has no epoch files of {run} left (pruned?); nothing to rank")
    if base is not None:
        _diagnose_all(entries, base, device, t, progress, cancelled)
    keeper, method, reason, ranked = _pick(entries, base is not None, t)
    return EpochRanking(folder, run, ranked, keeper.file if keeper else None, keeper.epoch if keeper else None,
                        method, reason, base, notes, t, time.perf_counter() - started)
