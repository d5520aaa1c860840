"""Helpers shared by the WebUI panel tests: host folders under a tmp root, a handler's final update, file tensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lib_sdtune.host import HostFolders
from lib_sdtune.webui.context import UiContext


def tensors(path: Path) -> dict[str, torch.Tensor]:
    from lib_sdtune.io.safetensors_io import SafetensorsFile

    with SafetensorsFile(path) as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(autouse=True)
def quick_polls(monkeypatch):
    """Handlers poll their job every 0.5 s for the UI; a test need not wait that long."""
    from lib_sdtune.webui import tools_common

    monkeypatch.setattr(tools_common, "POLL", 0.02)


def last(updates) -> tuple:
    """Run a handler generator to its end, as gradio would, and return its final (status, result, job id)."""
    *_, final = list(updates)
    return final


def folders_under(root: Path) -> UiContext:
    """Host folders under `root`; the context records the host refreshes it asks for in `ctx.refreshed`."""
    for name in ("ckpt", "lora", "data"):
        (root / name).mkdir(parents=True, exist_ok=True)
    refreshed: list[str] = []
    ctx = UiContext(HostFolders(checkpoints=(root / "ckpt",), loras=(root / "lora",), datasets=(root / "data",)),
                    refresh_host=refreshed.append)
    ctx.refreshed = refreshed  # type: ignore[attr-defined]
    return ctx
