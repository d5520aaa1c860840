"""The few places where gradio 3.41 (A1111), 4.40 (Forge) and 5/6 (standalone) want different arguments."""

from __future__ import annotations

import inspect
from typing import Any


def major(gr: Any) -> int:
    """gradio's major version (3 in A1111 1.10, 4 in Forge 2)."""
    return int(str(gr.__version__).split(".")[0])


def follower_event(gr: Any) -> dict[str, Any]:
    """Event options for a handler that follows a job for minutes: no gradio spinner over its outputs (the
    panel draws its own progress), and on gradio 4+ no per-event concurrency limit of 1, so a second browser
    tab or a reloaded page can follow the same job."""
    options: dict[str, Any] = {"show_progress": "hidden"}
    if major(gr) >= 4:
        options["concurrency_limit"] = None
    return options


def quick_event(gr: Any) -> dict[str, Any]:
    """Event options for a handler that answers at once (a list refresh, a caption save)."""
    return {"show_progress": "minimal"}


def launch_with_head(blocks: Any, head: str, **launch: Any) -> Any:
    """Launch standalone with `head` (our javascript) where this gradio takes one: gradio 5/6 in launch(),
    4.x as a Blocks attribute; gradio 3.41 has no place for it (the tab works without its shortcuts)."""
    if "head" in inspect.signature(blocks.launch).parameters:
        launch["head"] = head
    elif hasattr(blocks, "head"):
        blocks.head = head
    return blocks.launch(**launch)
