"""What the Merge, LoRA tools and Repair panels share: output paths, number fields, and running a core call as a job.

Handlers are generators (gradio 3.41 to 6 stream their yields with the queue on): they check the form,
start one background job, and yield (status line, result text, job id) until it ends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

from ..errors import SdtuneError
from ..host import confine, resolve_listed
from .context import UiContext
from .jobs_view import follow, job_status, start_job

LORA_EXTS = (".safetensors",)
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


def subfolders(roots: Iterable[Path]) -> list[str]:
    """Folders directly under the roots (datasets, training runs), relative to their root, for dropdowns."""
    found: list[str] = []
    for root in roots:
        root = Path(root)
        if root.is_dir():
            found += sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    return found


def run_job(ctx: UiContext, title: str, work: Callable[[Any], Any], describe: Callable[[Any], str],
            uses_gpu: bool = False) -> Iterator[Update]:
    """Run `work(job_context)` as a background job, yielding its status line until it ends, then the
    result described for people. A core call that stops at the user's request (it raises its "cancelled;
    nothing was written" error) ends the job as "Stopped", not as an error."""

    def body(jc):
        try:
            return work(jc)
        except SdtuneError:
            if jc.cancelled():
                return None
            raise

    job, error = start_job(ctx.jobs, title, body, uses_gpu=uses_gpu)
    if job is None:
        yield error or "Error: the job did not start", "", None
        return
    for snap in follow(job):
        result = ""
        if snap.state == "done" and snap.result is not None:
            try:
                result = describe(snap.result)
            except Exception as e:  # noqa: BLE001 - the file is written; a summary failing must not hide that
                result = f"Done, but the summary failed: {type(e).__name__}: {e}"
        yield job_status(snap), result, job.id


def guarded(handler: Callable[..., Iterator[Update]]) -> Callable[..., Iterator[Update]]:
    """Turn the SdtuneError a handler raises while checking its form into one "Error: ..." status."""

    def run(*args: Any) -> Iterator[Update]:
        try:
            yield from handler(*args)
        except SdtuneError as e:
            yield f"Error: {e}", "", None

    run.__name__ = run.__qualname__ = handler.__name__
    run.__doc__ = handler.__doc__
    return run


def listed_folder(name: Optional[str], roots: Iterable[Path], what: str) -> str:
    """The folder a dropdown entry (or a typed relative path) names, confined to `roots`."""
    roots = [Path(r) for r in roots]
    if not name or not str(name).strip():
        raise SdtuneError(f"{what}: choose a folder first")
    for root in roots:
        if (root / name).is_dir():
            return str(confine(root / name, roots, what))
    raise SdtuneError(f"{name}: no such {what} folder in {', '.join(str(r) for r in roots)}")


def devices() -> list[str]:
    """The devices a tool may run on here: cpu, and cuda when torch sees one."""
    import torch

    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def stop(ctx: UiContext, job_id: Optional[int]) -> str:
    """The Stop button: ask the panel's job to stop at its next check."""
    if job_id is None:
        return "Nothing is running."
    return "Stopping…" if ctx.jobs.cancel(int(job_id)) else "The job has already ended."
