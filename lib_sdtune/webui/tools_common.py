"""What the Merge, LoRA tools and Repair panels share: output paths, number fields, running a core call as a job,
and the Run / Stop / progress / result controls that show it.

Handlers are generators (gradio 3.41 to 6 stream their yields with the queue on): they check the form,
start one background job, and yield (status line, result, job id) until it ends; the tests call them directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

from ..errors import SdtuneError
from ..host import confine, resolve_listed
from .compat import follower_event, quick_event
from .context import UiContext
from .jobs_view import POLL_SECONDS, error_text, follow, job_status, progress_html, start_job

LORA_EXTS = (".safetensors",)
POLL = POLL_SECONDS  # seconds between status updates while a job runs (tests shorten it)
Update = tuple[str, str, Optional[int]]  # status line, result text, job id (kept in a gr.State for Stop)


def checkpoint_output_roots(ctx: UiContext) -> list[Path]:
    """Where merged/repaired checkpoints go: the configured output folder first, else the checkpoint folders."""
    roots = [Path(p) for p in ctx.folders.checkpoints]
    return [Path(ctx.settings.output_dir), *roots] if ctx.settings.output_dir else roots


def lora_output_roots(ctx: UiContext) -> list[Path]:
    """Where LoRA files go: the LoRA folders (the first one for a bare name)."""
    return [Path(p) for p in ctx.folders.loras]


def output_path(name: str, roots: Sequence[Path], overwrite: bool, create: bool = False, what: str = "output"
                ) -> Path:
    """The file a typed output name means: `.safetensors` added, confined to `roots` (a bare name goes to the
    first), refused when it exists and `overwrite` is off. `create` makes a missing sub-folder (at Run only)."""
    name = (name or "").strip()
    if not name:
        raise SdtuneError(f"{what}: enter a file name for the result")
    suffix = Path(name).suffix.lower()
    if suffix in (".ckpt", ".pt", ".pth", ".bin"):
        raise SdtuneError(f"{what}: {name} — results are written as .safetensors only; use that extension")
    if suffix != ".safetensors":
        name += ".safetensors"
    path = confine(name, roots, what)
    if path.is_dir():
        raise SdtuneError(f"{what}: {path} is a folder; enter a file name")
    if path.exists() and not overwrite:
        raise SdtuneError(f"{what}: {path} already exists; choose another name, or tick 'Overwrite' to replace it")
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
    return path


def listed(name: Optional[str], roots: Iterable[Path], what: str) -> str:
    """The path of a dropdown entry (confined to the folders it was listed from), as a string for the configs."""
    if not name:
        raise SdtuneError(f"{what}: choose a file first")
    return str(resolve_listed(name, roots, what))


def optional_float(text: Any, what: str) -> Optional[float]:
    """A number typed into a text box; blank means None (the default)."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    try:
        return float(text)
    except (TypeError, ValueError):
        raise SdtuneError(f"{what}: {text!r} is not a number (leave it blank for the default)") from None


def optional_int(value: Any, what: str) -> Optional[int]:
    """A rank-like field: 0 or blank means None (the default), else a positive whole number."""
    if value is None or value == "" or value == 0:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SdtuneError(f"{what}: {value!r} is not a whole number") from None
    if number != int(number) or number < 0:
        raise SdtuneError(f"{what}: {value!r} must be a whole number of 0 or more (0: the default)")
    return int(number)


def run_job(ctx: UiContext, title: str, work: Callable[[Any], Any], describe: Callable[[Any], Any],
            uses_gpu: bool = False, writes: Optional[str] = None) -> Iterator[Update]:
    """Run `work(job_context)` as a background job, yielding its status line until it ends, then the result
    described for people. `writes` ("checkpoint" or "lora") asks the host to list the new file. A core call that
    stops at the user's request (its "cancelled; nothing was written" error) ends the job as "Stopped"."""

    def body(jc):
        try:
            result = work(jc)
        except SdtuneError:
            if jc.cancelled():
                return None
            raise
        if writes is not None:
            ctx.outputs_written(writes)
        return result

    job, error = start_job(ctx.jobs, title, body, uses_gpu=uses_gpu, meta={"kind": "tools", "title": title})
    if job is None:
        yield error or "Error: the job did not start", "", None
        return
    for snap in follow(job, POLL):
        result: Any = ""
        if snap.state == "done" and snap.result is not None:
            try:
                result = describe(snap.result)
            except Exception as e:  # noqa: BLE001 - the file is written; a summary failing must not hide that
                result = f"Done, but the summary failed: {error_text(e)}"
        yield job_status(snap), result, job.id


def guarded(handler: Callable[..., Iterator[Update]]) -> Callable[..., Iterator[Update]]:
    """Turn an error a handler raises while checking its form into one "Error: ..." status (never a traceback)."""

    def run(*args: Any) -> Iterator[Update]:
        try:
            yield from handler(*args)
        except Exception as e:  # noqa: BLE001 - shown as one line; error_text logs the traceback of a bug
            yield error_text(e), "", None

    run.__name__ = run.__qualname__ = handler.__name__
    run.__doc__ = handler.__doc__
    return run


def devices(ctx: UiContext) -> list[str]:
    """The devices a tool may run on here: cpu, and the host's GPU device (or cuda) when torch sees one."""
    import torch

    return ["cpu", ctx.settings.device or "cuda"] if torch.cuda.is_available() else ["cpu"]


def stop(ctx: UiContext, job_id: Optional[int]) -> str:
    """The Stop button: ask the panel's job to stop at its next check."""
    if job_id is None:
        return "Nothing is running."
    return "Stopping…" if ctx.jobs.cancel(int(job_id)) else "The job has already ended."


def status_html(ctx: UiContext, line: str, job_id: Optional[int]) -> str:
    """A job's progress bar with its status line, or just the line (an error, "Stopping…") without a job."""
    job = ctx.jobs.get(job_id) if job_id is not None else None
    return progress_html(job.snapshot() if job is not None else None, line)


@dataclass
class JobControls:
    """Run and Stop buttons, the progress bar with the status line, the result box and the job id state."""

    run: Any
    status: Any
    result: Any
    job_id: Any


def job_controls(gr, ctx: UiContext, prefix: str, label: str, result_lines: int = 4, result_label: str = "Result"
                 ) -> JobControls:
    """Add Run / Stop, a progress bar and a result box; Stop asks the job whose id the state holds to stop."""
    with gr.Row():
        run = gr.Button(label, variant="primary", elem_id=f"sdtune_{prefix}_run")
        halt = gr.Button("Stop", elem_id=f"sdtune_{prefix}_stop")
    status = gr.HTML(elem_id=f"sdtune_{prefix}_status")
    result = gr.Textbox(label=result_label, lines=result_lines, interactive=False, elem_id=f"sdtune_{prefix}_result")
    job_id = gr.State(None)
    # not queued: a queue that runs one event at a time (gradio 3.41 standalone) would hold Stop behind the job
    halt.click(fn=lambda jid: status_html(ctx, stop(ctx, jid), None), inputs=[job_id], outputs=[status],
               queue=False, **quick_event(gr))
    return JobControls(run, status, result, job_id)


def wire_job(gr, ctx: UiContext, controls: JobControls, handler: Callable[..., Iterator[Update]],
             inputs: list) -> None:
    """Run `handler(ctx, *inputs)` on the Run button, streaming its progress bar, result and job id."""

    def go(*values):
        for line, result, jid in handler(ctx, *values):
            yield status_html(ctx, line, jid), result, jid

    controls.run.click(fn=go, inputs=inputs, outputs=[controls.status, controls.result, controls.job_id],
                       **follower_event(gr))
