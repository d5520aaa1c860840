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


def launch_with_js(blocks: Any, js: str, **launch: Any) -> Any:
    """Launch standalone with our javascript: a <head> script in gradio 5/6 (launch) and 4.x (Blocks.head),
    a page-load event in gradio 3.41 (which has no head)."""
    if not js:
        return blocks.launch(**launch)
    head = f"<script>\n{js}\n</script>"
    if "head" in inspect.signature(blocks.launch).parameters:
        launch["head"] = head
    elif hasattr(blocks, "head"):
        blocks.head = head
    else:
        with blocks:
            blocks.load(None, None, None, _js=f"() => {{\n{js}\n}}")
    return blocks.launch(**launch)
