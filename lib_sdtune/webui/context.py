"""What every WebUI panel gets: the host's folders, the shared job runner and the user's settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..host import HostFolders
from ..jobs import JobRunner


@dataclass
class UiSettings:
    """Choices the host's settings page (A1111 `on_ui_settings`) or the standalone app's flags provide."""

    precision: str = "auto"  # default mixed precision offered by the Train tab: auto | fp16 | bf16 | no
    tagger_dir: Optional[Path] = None  # folder holding the WD14 ONNX model + selected_tags.csv
    output_dir: Optional[Path] = None  # where merged/repaired checkpoints go (default: the first checkpoint folder)


@dataclass
class UiContext:
    """Passed to each `build_<area>_panel(gr, ctx)`: panels read folders/settings and start jobs through it."""

    folders: HostFolders
    jobs: JobRunner = field(default_factory=JobRunner)
    settings: UiSettings = field(default_factory=UiSettings)
