"""Over-fit diagnosis of a tuned checkpoint or a LoRA against its base model, with no image generation.

`diagnose(DiagnoseConfig)` measures (on a CPU, in seconds to minutes):
- text-encoder drift: the dataset's tags (a dataset folder, else the file's `ss_tag_frequency`) and fixed
  control prompts through base and tuned encoder(s) (SDXL: both): cosine per prompt, how much more alike
  different tags became (collapse), which tags drifted most (`diagnose_te`);
- weight drift: per U-Net block (merge/LBW names) ‖ΔW‖/‖W‖; for a LoRA, per module norm, relative norm and
  effective rank and the text-encoder share of the update (`diagnose_weights`);
and turns them into verdicts with the repair to run (`diagnose_verdicts`), judged by `diagnose_thresholds`.
A LoRA's text-encoder drift is measured on the base encoders with the LoRA added in memory at its strength.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional

from ..errors import SdtuneError
from ..io.checkpoint import StateDictSource, open_checkpoint
from ..io.detect import ArchInfo, detect_architecture
from ..merge.blocks import layout_for, slots_for
from ..merge.pipeline import MergeCancelled
from .config import check_number
from .diagnose_report import DiagnosisReport, Verdict
from .diagnose_te import (
    ENCODER_IDS,
    EncoderDrift,
    LoraTePatch,
    PromptSet,
    compare,
    encode_all,
    encoder_label,
    load_text_encoders,
)
from .diagnose_thresholds import CONTROL_PROMPTS, Thresholds
from .diagnose_verdicts import add_epoch_hint, te_verdicts, unet_verdict, untouched_te_verdicts
from .diagnose_weights import LoraStats, checkpoint_drift, drift_keys, lora_stats

__all__ = ["DiagnoseConfig", "DiagnosisReport", "Verdict", "Thresholds", "diagnose"]

Progress = Callable[[int, int, str], None]
_FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "sdxl-refiner": "the SDXL refiner"}


@dataclass(frozen=True)
class DiagnoseConfig:
    """A base checkpoint and exactly one of a tuned checkpoint (`model`) or a LoRA/LyCORIS file (`lora`).

    Tags come from `dataset` (a caption folder), else the file's `ss_tag_frequency`, else only the control
    prompts are used; at most `max_tags` most frequent. `lora_strength` is the strength the LoRA is judged at.
    """

    base: str
    model: Optional[str] = None
    lora: Optional[str] = None
    dataset: Optional[str] = None
    lora_strength: float = 1.0
    max_tags: int = 64
    device: Optional[str] = None
    thresholds: Thresholds = field(default_factory=Thresholds)


class Steps:
    """progress(done, total, info) over stages whose sizes become known as the work goes."""

    def __init__(self, progress: Optional[Progress], cancelled: Optional[Callable[[], bool]]):
        self.progress, self.cancelled = progress, cancelled
        self.done, self.total = 0, 0

    def plan(self, n: int) -> None:
        self.total += n

    def step(self, info: str) -> None:
        self.check()
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, max(self.total, self.done), info)

    def check(self) -> None:
        if self.cancelled is not None and self.cancelled():
            raise SdtuneError("diagnose cancelled; nothing was written")


def _validate(config: DiagnoseConfig) -> None:
    if (config.model is None) == (config.lora is None):
        raise SdtuneError("give exactly one of model (a tuned checkpoint) or lora (a LoRA/LyCORIS file) to diagnose "
                          "against the base")
    for name in ("base", "model", "lora"):
        path = getattr(config, name)
        if path is not None and not Path(path).is_file():
            raise SdtuneError(f"{name}: {path} does not exist (or is not a file)")
    if config.dataset is not None and not Path(config.dataset).is_dir():
        raise SdtuneError(f"dataset: {config.dataset} is not a folder (give the dataset's caption folder)")
    check_number("lora_strength", config.lora_strength)
    if isinstance(config.max_tags, bool) or not isinstance(config.max_tags, int) or not 0 <= config.max_tags <= 1000:
        raise SdtuneError(f"max_tags: {config.max_tags!r}; give a whole number from 0 to 1000")
    t = config.thresholds
    for name in ("control_cosine", "collapse", "unet_block_delta", "validation_tie"):
        check_number(f"thresholds.{name}", getattr(t, name), -1.0, 1e6)


def _tags(config: DiagnoseConfig, metadata: Mapping[str, str]) -> tuple[list[str], str]:
    """The most frequent tags (dataset folder, else ss_tag_frequency) and a sentence saying where they came from."""
    from ..networks.lora_info import _tags as summed_tag_frequency

    if config.dataset is not None:
        from ..tags.stats import StatsConfig, tag_stats

        freq = tag_stats(StatsConfig(Path(config.dataset))).frequency
        where = f"dataset {config.dataset}"
    else:
        freq = list(summed_tag_frequency(dict(metadata)).items())
        where = "the file's ss_tag_frequency"
    tags = [t for t, _ in freq if t.strip()][:config.max_tags]
    if not freq:
        return [], ("none: no --dataset and no ss_tag_frequency in the file; control prompts only" if
                    config.dataset is None else f"none: {where} has no tags; control prompts only")
    return tags, f"{len(tags)} most frequent of {len(freq)} tags from {where}"


def _open(path: str, role: str) -> tuple[StateDictSource, ArchInfo]:
    source = open_checkpoint(path)
    return source, detect_architecture(source.shapes(), what=f"{role} ({path})")


def _block_values(groups: Mapping, family: str) -> dict[str, float]:
    """U-Net slot -> relative change, in slot order, for the slots measured."""
    return {s: groups[s].relative for s in slots_for(layout_for(family))[1:] if s in groups}


def _checkpoint(config: DiagnoseConfig, steps: Steps, device: str) -> DiagnosisReport:
    base, b_arch = _open(config.base, "base")
    model, m_arch = _open(config.model, "model")  # type: ignore[arg-type]
    labels = (config.base, str(config.model))
    if b_arch.family != m_arch.family:
        raise SdtuneError(f"model {config.model} is {m_arch.architecture} but base {config.base} is "
                          f"{b_arch.architecture}; diagnose a model against the base it was trained from")
    tags, tags_source = _tags(config, model.metadata)
    prompts = PromptSet(CONTROL_PROMPTS, tags)
    t = config.thresholds
    encoders = [c for c in ENCODER_IDS if c in b_arch.components and c in m_arch.components]
    keys = drift_keys(base, model, b_arch, labels)
    steps.plan(len(keys) + 2 * len(encoders))
    try:
        groups = checkpoint_drift(base, model, b_arch, keys, steps.step, steps.cancelled)
    except MergeCancelled:
        raise SdtuneError("diagnose cancelled; nothing was written") from None
    drifts: list[EncoderDrift] = []
    if encoders:
        base_enc = encode_all(load_text_encoders(config.base, "base", device), b_arch.family, prompts, device,
                              steps.step)
        model_enc = encode_all(load_text_encoders(labels[1], "model", device), m_arch.family, prompts, device,
                               steps.step)
        for c in encoders:
            d = compare(c, encoder_label(b_arch.family, c), prompts, base_enc[c], model_enc[c])
            d.weight_delta = groups[c].relative if c in groups else None
            drifts.append(d)
    blocks = _block_values(groups, b_arch.family)
    verdicts = te_verdicts("checkpoint", b_arch.family, labels[1], config.base, drifts, t)
    unet = unet_verdict("checkpoint", labels[1], config.base, blocks, t)
    verdicts += [unet] if unet is not None else []
    notes = [] if encoders else [f"no text encoder in both files ({config.model}, {config.base}); TE not measured"]
    return DiagnosisReport("checkpoint", labels[1], config.base, m_arch.architecture, verdicts, drifts, blocks,
                           tags_source=tags_source, notes=notes, thresholds=t)


def _check_lora_base(info, family: str, lora: str, base: str) -> None:
    """Refuse a LoRA made for another architecture than the base, naming both files."""
    from ..networks.lora_info import lora_family

    made_for = lora_family(info.base_model_version)
    target = "sdxl" if family == "sdxl-refiner" else family
    if made_for is not None and made_for != target:
        raise SdtuneError(f"lora {lora} was made for {_FAMILY_NAMES[made_for]} (ss_base_model_version "
                          f"{info.base_model_version}), but base {base} is {_FAMILY_NAMES[family]}; diagnose the "
                          f"LoRA against the {_FAMILY_NAMES[made_for]} model it was trained on")


class LoraBase:
    """The base side of LoRA diagnoses, opened once: pick-epoch diagnoses every epoch file against one of these.

    Its text encoders and their encodings of a prompt set are loaded/computed once and kept; a LoRA's TE part
    is added in place and taken out again after each diagnosis.
    """

    def __init__(self, path: str, device: str):
        self.path, self.device = path, device
        self.source, self.arch = _open(path, "base")
        self._names = None
        self._encoders: dict = {}
        self._encoded: dict[tuple, dict] = {}

    @property
    def names(self):
        """kohya LoRA name (and the other U-Net spellings hosts accept) -> layer of the base."""
        if self._names is None:
            from ..merge.lora_bake import _with_aliases
            from ..merge.lora_common import checkpoint_name_map

            self._names = _with_aliases(checkpoint_name_map(self.source.shapes(), self.arch, self.path))
        return self._names

    def encoders(self, components: list[str]) -> dict:
        """The base's text encoders of `components` (loaded once, only those asked for)."""
        missing = [c for c in components if c not in self._encoders]
        if missing:
            self._encoders.update(load_text_encoders(self.path, "base", self.device, missing))
        return {c: self._encoders[c] for c in components}

    def encoded(self, prompts: PromptSet, components: list[str], step: Callable[[str], None]) -> dict:
        """The base encodings of `prompts` by each of `components` (cached)."""
        cache = self._encoded.setdefault(tuple(prompts.all), {})
        todo = {c: m for c, m in self.encoders(components).items() if c not in cache}
        cache.update(encode_all(todo, self.arch.family, prompts, self.device, step))
        return {c: cache[c] for c in components}


def diagnose_lora(config: DiagnoseConfig, base: LoraBase, steps: Steps, scale_trials: bool = True,
                  epoch_hint: bool = True) -> DiagnosisReport:
    """Diagnose `config.lora` against an opened base (the LoRA half of `diagnose`)."""
    from ..merge.lora_common import target_slot
    from ..merge.lora_delta import group_modules
    from ..networks.kohya_file import load_lora
    from ..networks.lora_info import inspect_lora
    from .epochs import earlier_epochs

    lora, strength, t, arch = str(config.lora), config.lora_strength, config.thresholds, base.arch
    info = inspect_lora(lora)
    _check_lora_base(info, arch.family, lora, config.base)
    state, metadata = load_lora(lora)
    modules = group_modules(lora, state)
    parts = {n: (base.names[n], m) for n, m in modules.items() if n in base.names}
    unmatched = sorted(n for n in modules if n not in base.names)
    if not parts:
        raise SdtuneError(f"none of the {len(modules)} modules of lora {lora} matches a layer of base {config.base} "
                          f"({arch.architecture}; first module: {unmatched[0]}); is the LoRA for another model?")
    tags, tags_source = _tags(config, metadata)
    prompts = PromptSet(CONTROL_PROMPTS, tags)
    te_parts = [(tg, m) for tg, m in parts.values() if tg.component != "unet"]
    encoders = [c for c in ENCODER_IDS if c in arch.components]
    touched = [c for c in encoders if any(tg.component == c for tg, _ in te_parts)]
    steps.plan(len(parts) + 2 * len(touched))

    def group(tg) -> str:
        return tg.component if tg.component != "unet" else target_slot(tg, arch.family)

    try:
        algorithm = info.algorithm + (" + DoRA" if info.dora else "")
        stats: LoraStats = lora_stats(parts, group, base.source, strength, algorithm, unmatched, steps.step,
                                      steps.cancelled)
    except SdtuneError as e:
        if "cancelled" in str(e):
            raise
        raise SdtuneError(f"{e} (base: {config.base})") from e
    drifts: list[EncoderDrift] = []
    if touched:
        base_enc = base.encoded(prompts, touched, steps.step)
        te = base.encoders(touched)
        patch = LoraTePatch(te, te_parts, base.source, config.base)
        try:
            patch.apply({c: strength for c in touched})
            tuned_enc = encode_all(te, arch.family, prompts, base.device, steps.step)
            for c in touched:
                d = compare(c, encoder_label(arch.family, c), prompts, base_enc[c], tuned_enc[c])
                d.weight_delta = stats.groups[c].relative if c in stats.groups else None
                drifts.append(d)
            if scale_trials:
                _scale_trials(drifts, patch, te, arch.family, prompts, base_enc, strength, t, base.device, steps)
        finally:
            patch.restore()
    verdicts: list[Verdict] = te_verdicts("lora", arch.family, lora, config.base, drifts, t, strength)
    verdicts += untouched_te_verdicts(arch.family, [c for c in encoders if c not in touched], t)
    blocks = _block_values(stats.groups, arch.family)
    unet = unet_verdict("lora", lora, config.base, blocks, t, strength)
    verdicts += [unet] if unet is not None else []
    if epoch_hint:
        add_epoch_hint(verdicts, earlier_epochs(lora), config.base)
    notes = []
    if unmatched:
        notes.append(f"{len(unmatched)} of {len(modules)} LoRA modules match no layer of the base and were left out "
                     f"(e.g. {unmatched[0]})")
    return DiagnosisReport("lora", lora, config.base, arch.architecture, verdicts, drifts, blocks, stats,
                           strength, tags_source, notes, t)


def _scale_trials(drifts: list[EncoderDrift], patch: LoraTePatch, te: dict, family: str, prompts: PromptSet,
                  base_enc: dict, strength: float, t: Thresholds, device: str, steps: Steps) -> None:
    """For each flagged encoder, the largest TE scale (of `t.lora_te_scales`) whose drift passes; 0 if none."""
    def passes(cosine: float, collapse: float) -> bool:
        return cosine >= t.control_cosine and collapse <= t.collapse

    todo = {d.component: d for d in drifts if not passes(d.control_cosine, d.collapse)}
    for scale in sorted(t.lora_te_scales, reverse=True):
        if not todo:
            return
        steps.plan(len(todo))
        patch.apply({c: strength * scale for c in todo})
        tuned = encode_all({c: te[c] for c in todo}, family, prompts, device, steps.step)
        for c, d in list(todo.items()):
            trial = compare(c, d.label, prompts, base_enc[c], tuned[c])
            d.scale_trials[scale] = (trial.control_cosine, trial.collapse)
            if passes(trial.control_cosine, trial.collapse):
                d.suggested_scale = scale
                del todo[c]
    for d in todo.values():
        d.suggested_scale = 0.0


def diagnose(config: DiagnoseConfig, progress: Optional[Progress] = None,
             cancelled: Optional[Callable[[], bool]] = None) -> DiagnosisReport:
    """Diagnose `config.model` or `config.lora` against `config.base`; see DiagnoseConfig and the module doc."""
    started = time.perf_counter()
    _validate(config)
    steps = Steps(progress, cancelled)
    device = config.device or "cpu"
    if config.model is not None:
        report = _checkpoint(config, steps, device)
    else:
        report = diagnose_lora(config, LoraBase(config.base, device), steps)
    for v in report.verdicts:
        if isinstance(v.value, float) and math.isinf(v.value):
            report.notes.append(f"{v.symptom}: the base weights are zero where the tuned ones are not")
    report.seconds = time.perf_counter() - started
    return report
