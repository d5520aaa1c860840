"""sdtune's settings in a host (A1111/Forge: Settings -> sdtune) and how their values become UiSettings.

Host-neutral: the A1111 face registers `SETTINGS` with `shared.OptionInfo` and reads them back through
`read_values(opts)`, which falls back to the defaults (with `--nowebui` the settings page is never built and
an unregistered option would raise AttributeError).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..tags.wd14_model import TAGGER_SUBFOLDERS
from .context import PRECISIONS, UiSettings


@dataclass(frozen=True)
class Setting:
    """One option: its key in the host's config, default, label, help line and (for a radio) its choices."""

    key: str
    default: Any
    label: str
    info: str = ""
    choices: tuple[str, ...] = ()


SETTINGS = (
    Setting("sdtune_datasets_dir", "", "Dataset folders",
            "training datasets live below these folders; several are separated by ';'. "
            "Empty: the 'datasets' folder of the WebUI's data directory"),
    Setting("sdtune_output_dir", "", "Folder for merged and repaired checkpoints",
            "empty: the checkpoint folder (models/Stable-diffusion, or --ckpt-dir)"),
    Setting("sdtune_precision", "auto", "Default mixed precision for training",
            "auto: the planner's choice for this GPU (bf16 where supported, else fp16)", PRECISIONS),
    Setting("sdtune_tagger_dir", "", "WD14 tagger folder",
            "a folder holding model.onnx + selected_tags.csv, or a folder of such folders. Empty: "
            + ", ".join(f"models/{s}" for s in TAGGER_SUBFOLDERS)),
)
DEFAULTS = {s.key: s.default for s in SETTINGS}


def read_values(opts: Any) -> dict[str, Any]:
    """The current value of every setting from a host's options object (its default where unset)."""
    return {s.key: getattr(opts, s.key, s.default) for s in SETTINGS}


def split_paths(text: Optional[str]) -> tuple[Path, ...]:
    """Folders typed into one setting, separated by ';' (or the OS path separator), blanks dropped."""
    parts = (text or "").replace(os.pathsep, ";").split(";")
    return tuple(Path(p.strip()).expanduser() for p in parts if p.strip())


def dataset_roots(values: dict[str, Any], data_dir: str | os.PathLike) -> tuple[Path, ...]:
    """The dataset folders a user configured, else `<data_dir>/datasets`."""
    return split_paths(values.get("sdtune_datasets_dir")) or (Path(data_dir) / "datasets",)


def ui_settings(values: dict[str, Any], models_dir: str | os.PathLike, device: Optional[str] = None) -> UiSettings:
    """UiSettings from the settings' values; tagger folders default to the host's models/<tagger folder>s."""
    precision = values.get("sdtune_precision") or "auto"
    output = split_paths(values.get("sdtune_output_dir"))
    tagger = split_paths(values.get("sdtune_tagger_dir"))
    return UiSettings(precision=precision if precision in PRECISIONS else "auto",
                      tagger_dir=tagger[0] if tagger else None,
                      output_dir=output[0] if output else None, device=device,
                      tagger_roots=tuple(Path(models_dir) / s for s in TAGGER_SUBFOLDERS))
