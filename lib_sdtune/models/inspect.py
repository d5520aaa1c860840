"""What a model file is, in one call shared by the CLI, the WebUI tab and the ComfyUI node."""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

from ..io.checkpoint import open_checkpoint
from ..io.detect import component_keys, detect_architecture
from ..io.hashes import file_hashes
from ..io.safetensors_io import SafetensorsFile
from .diffusers_folder import detect_folder_architecture, folder_weight_files, is_diffusers_folder
from .hints import ModelHints, resolve_hints
from .loader import load_checkpoint


@dataclass
class ModelInfo:
    """The answer of `model info`; field names are the CLI's JSON contract."""

    file: str
    size_bytes: int
    architecture: str
    family: str
    prediction_type: str
    prediction_source: str
    variant: str
    components: dict[str, int]
    dtype: str
    hashes: dict[str, str]
    metadata: dict[str, str]
    loaded: bool = False
    load_seconds: Optional[float] = None
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    ignored_keys: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        if not self.loaded:
            for k in ("load_seconds", "missing_keys", "unexpected_keys", "ignored_keys"):
                d.pop(k)
        return d


def _dtype_name(dtypes: Counter) -> str:
    """The dominant dtype ("float16"), or "mixed (...)" when no dtype holds 90% of the weights."""
    total = sum(dtypes.values()) or 1
    name, count = dtypes.most_common(1)[0] if dtypes else ("unknown", 0)
    if count / total >= 0.9:
        return name
    return "mixed (" + ", ".join(f"{n} {c / total:.0%}" for n, c in dtypes.most_common()) + ")"


def inspect_model(path: str | os.PathLike, *, load: bool = False, hashes: bool = True,
                  hints: Optional[ModelHints] = None) -> ModelInfo:
    """Architecture, parameter counts, dtype and hashes; with `load`, load every component and report keys."""
    p = Path(path)
    if is_diffusers_folder(p):
        return _inspect_folder(p, load=load, hints=hints)
    source = open_checkpoint(p)
    shapes = source.shapes()
    arch = detect_architecture(shapes, str(p))
    resolved = resolve_hints(arch.family, p, hints)
    if resolved.prediction_type:
        arch = replace(arch, prediction_type=resolved.prediction_type)
    counts, dtypes = {}, Counter()
    for name, keys in component_keys(shapes, arch).items():
        counts[name] = sum(source.numel(k) for k in keys)
        for k in keys:
            dtypes[str(source.dtype(k)).replace("torch.", "")] += source.numel(k)
    info = ModelInfo(
        file=str(p), size_bytes=p.stat().st_size, architecture=arch.architecture, family=arch.family,
        prediction_type=arch.prediction_type,
        prediction_source=resolved.source if resolved.prediction_type else "checkpoint keys",
        variant=arch.variant, components=counts, dtype=_dtype_name(dtypes),
        hashes=file_hashes(p).to_dict() if hashes else {}, metadata=dict(source.metadata),
    )
    undecided = info.prediction_type == "undecided"
    if load or undecided:
        start = time.perf_counter()
        loaded = load_checkpoint(source, components=None if load else ("unet",), hints=hints)
        info.architecture = loaded.arch.architecture
        info.prediction_type = loaded.arch.prediction_type
        if undecided:
            info.prediction_source = "A1111 v-prediction test (no yaml, no flag)"
        if load:
            info.loaded = True
            info.load_seconds = round(time.perf_counter() - start, 3)
            info.missing_keys = loaded.report.missing_keys
            info.unexpected_keys = loaded.report.unexpected_keys
            info.ignored_keys = loaded.report.ignored_keys
    return info


def _inspect_folder(folder: Path, *, load: bool, hints: Optional[ModelHints]) -> ModelInfo:
    """`model info` for a diffusers folder: counts and dtype from the safetensors headers."""
    arch = detect_folder_architecture(folder)
    source = str(folder / "scheduler" / "scheduler_config.json")
    if hints is not None and hints.prediction_type:
        arch, source = replace(arch, prediction_type=hints.prediction_type), hints.source
    files = folder_weight_files(folder, arch)
    counts, dtypes = {}, Counter()
    for name, path in files.items():
        sf = SafetensorsFile(path)
        counts[name] = sum(_numel(i.shape) for i in sf.tensors.values())
        for k, i in sf.tensors.items():
            dtypes[str(sf.dtype(k)).replace("torch.", "")] += _numel(i.shape)
    info = ModelInfo(file=str(folder), size_bytes=sum(f.stat().st_size for f in files.values()),
                     architecture=arch.architecture, family=arch.family, prediction_type=arch.prediction_type,
                     prediction_source=source, variant=arch.variant, components=counts,
                     dtype=_dtype_name(dtypes), hashes={}, metadata={})
    if load:
        start = time.perf_counter()
        loaded = load_checkpoint(folder, hints=hints)
        info.loaded, info.load_seconds = True, round(time.perf_counter() - start, 3)
        info.missing_keys, info.unexpected_keys = loaded.report.missing_keys, loaded.report.unexpected_keys
    return info


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def format_count(n: int) -> str:
    """1234567 -> "1.23 M" (parameter counts as people read them)."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return str(n)


def format_model_info(info: ModelInfo) -> str:
    """The human-readable report of `model info` (CLI, WebUI tab and ComfyUI node show the same text)."""
    lines = [
        f"file:          {info.file} ({info.size_bytes / 2**20:.1f} MiB)",
        f"architecture:  {info.architecture}" + (f" ({info.variant})" if info.variant else ""),
        f"prediction:    {info.prediction_type} (from {info.prediction_source})",
        f"dtype:         {info.dtype}",
        "components:    " + ", ".join(f"{k} {format_count(v)}" for k, v in info.components.items()),
    ]
    if info.hashes:
        h = info.hashes
        lines.append(f"hashes:        AutoV2 {h['autov2']} (A1111 short hash), legacy {h['autov1']}")
        lines.append(f"               sha256 {h['sha256']}")
        if "sshs_model_hash" in h:
            lines.append(f"               sshs_model_hash {h['sshs_model_hash']}")
    if info.metadata:
        names = sorted(info.metadata)
        lines.append(f"metadata:      {len(names)} entries ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})")
    if info.loaded:
        lines.append(f"loaded in {info.load_seconds:.1f} s: missing keys {len(info.missing_keys)}, "
                     f"unexpected keys {len(info.unexpected_keys)}, ignored extras {len(info.ignored_keys)}")
        lines += [f"  ! {k}" for k in (info.missing_keys + info.unexpected_keys)[:20]]
    return "\n".join(lines)
