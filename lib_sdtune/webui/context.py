"""What every WebUI panel gets: the host's folders, the shared job runner and the user's settings."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..host import HostFolders
from ..jobs import JobRunner

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp16", "bf16", "no")  # "auto": the planner's choice for this GPU


@dataclass
class UiSettings:
    """Choices the host's settings page (A1111 `on_ui_settings`) or the standalone app's flags provide."""

    precision: str = "auto"  # default mixed precision offered by the Train tab: auto | fp16 | bf16 | no
    tagger_dir: Optional[Path] = None  # folder holding the WD14 ONNX model + selected_tags.csv
    output_dir: Optional[Path] = None  # where merged/repaired checkpoints go (default: the first checkpoint folder)
    device: Optional[str] = None  # torch device for GPU jobs (the host's, e.g. "cuda:1"); None: cuda if present
    tagger_roots: tuple[Path, ...] = ()  # where else to look for tagger folders (A1111: models/interrogators ...)


@dataclass
class UiContext:
    """Passed to each `build_<area>_panel(gr, ctx)`: panels read folders/settings and start jobs through it.

    `refresh_host(kind)` tells the host that files of a kind ("lora", "checkpoint") were written, so its own
    lists show them (A1111: the Lora list and the checkpoint list); the standalone app has nothing to refresh.
    """

    folders: HostFolders
    jobs: JobRunner = field(default_factory=JobRunner)
    settings: UiSettings = field(default_factory=UiSettings)
    refresh_host: Optional[Callable[[str], None]] = None
    tag_sessions: dict[Any, Any] = field(default_factory=dict)  # the Dataset tab's open editing sessions
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def outputs_written(self, kind: str) -> None:
        """Ask the host to list new files of this kind; a host that fails to refresh never fails the job."""
        if self.refresh_host is not None:
            try:
                self.refresh_host(kind)
            except Exception as e:  # noqa: BLE001 - the files are written; a stale host list is not an error
                log.warning("sdtune: the host could not refresh its %s list: %s", kind, e)
