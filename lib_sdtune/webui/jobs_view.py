"""How a panel shows a background job: start it (or say why not), then follow it with a status line.

Gradio generator handlers (they work from gradio 3.41 to 6 with the queue on) call `follow` and yield the
status after each poll, so progress stays live without gr.Timer (absent in A1111's gradio 3.41).
"""

from __future__ import annotations

import html
import logging
import time
import traceback
from typing import Any, Callable, Iterator, Optional

from ..errors import SdtuneError
from ..jobs import Job, JobContext, JobRunner, JobSnapshot

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5


def start_job(jobs: JobRunner, title: str, fn: Callable[[JobContext], Any], uses_gpu: bool = True,
              meta: Optional[dict] = None) -> tuple[Optional[Job], Optional[str]]:
    """Start a job; (job, None), or (None, readable reason) when another GPU job holds the GPU."""
    try:
        return jobs.start(title, fn, uses_gpu=uses_gpu, meta=meta), None
    except SdtuneError as e:
        return None, f"Error: {e}"


def follow(job: Job, interval: float = POLL_SECONDS) -> Iterator[JobSnapshot]:
    """Snapshots of the job every `interval` seconds while it runs, then its final one."""
    while True:
        snap = job.snapshot()
        yield snap
        if not snap.running:
            return
        time.sleep(interval)


def clock(seconds: float) -> str:
    """m:ss, or h:mm:ss from an hour on."""
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def job_status(snap: JobSnapshot) -> str:
    """One line for people: what runs, how far, the latest figures, or how it ended."""
    if snap.state == "failed":
        return f"Error: {snap.error}"
    head = {"running": "Running", "done": "Done", "cancelled": "Stopped"}[snap.state]
    parts = [f"{head}: {snap.title}"]
    if snap.total:
        parts.append(f"{snap.done}/{snap.total} ({snap.fraction:.0%})")
    figures = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in snap.info.items()
                        if isinstance(v, (int, float, str)))
    if figures:
        parts.append(figures)
    if snap.message:
        parts.append(snap.message)
    parts.append(f"elapsed {clock(snap.elapsed)}")
    return " | ".join(parts)


def progress_html(snap: Optional[JobSnapshot], line: str = "") -> str:
    """A progress bar with a status line under it (inline styles: the host loads no CSS for it); without a job,
    the line alone (an error, "Nothing is running")."""
    if snap is None:
        return f'<div class="sdtune-status">{html.escape(line)}</div>' if line else ""
    colour = {"running": "#3b82f6", "done": "#22c55e", "cancelled": "#f59e0b", "failed": "#ef4444"}[snap.state]
    width = 100 if snap.state == "done" else round(100 * snap.fraction, 1)
    text = html.escape(line or job_status(snap))
    return (f'<div class="sdtune-progress" data-state="{snap.state}">'
            f'<div style="height:8px;border-radius:4px;background:rgba(128,128,128,.25);overflow:hidden">'
            f'<div style="height:100%;width:{width}%;background:{colour}"></div></div>'
            f'<div style="margin-top:4px;font-size:90%">{text}</div></div>')


def error_text(e: BaseException) -> str:
    """An exception as one line for the UI: our own errors as written, others with their type (traceback logged)."""
    if isinstance(e, SdtuneError):
        return f"Error: {e}"
    log.error("sdtune: a WebUI handler failed:\n%s", traceback.format_exc())
    return f"Error: {type(e).__name__}: {e}"
