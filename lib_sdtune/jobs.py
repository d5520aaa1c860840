"""Background jobs for the faces: one GPU job at a time, live progress, log lines, cancel, readable errors.

The WebUI runs training, merges and repairs in a worker thread so the page stays live; this module is the
host-neutral part (no gradio, no A1111). A host hands in `before_gpu`/`after_gpu` to unload its own model
from VRAM before a GPU job and reload it after (A1111: `sd_models.unload_model_weights`/`send_model_to_device`),
`on_progress` to mirror a GPU job into its own progress display, and `host_interrupted` so its own
Interrupt button stops the job.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from .errors import SdtuneError

log = logging.getLogger(__name__)

Info = Union[str, dict, None]
MAX_LOG_LINES = 500  # a job's log keeps its last lines only (a long run logs every epoch)


@dataclass(frozen=True)
class JobSnapshot:
    """A consistent copy of a job's state for a UI to show (never changes under the reader)."""

    id: int
    title: str
    state: str  # running | done | failed | cancelled
    done: int
    total: int
    info: dict
    message: str
    log: tuple[str, ...]
    error: Optional[str]
    result: Any
    started: float
    finished: Optional[float]
    series: dict = field(default_factory=dict)  # name -> ((x, y), ...): e.g. the loss per step, for charts
    meta: dict = field(default_factory=dict)  # what the starter attached (kind of job, its output folder ...)

    @property
    def fraction(self) -> float:
        """Share of the work done, 0..1 (0 while the total is unknown)."""
        return min(1.0, self.done / self.total) if self.total > 0 else 0.0

    @property
    def elapsed(self) -> float:
        return (self.finished or time.time()) - self.started

    @property
    def running(self) -> bool:
        return self.state == "running"


@dataclass
class Job:
    """One unit of background work; its fields change only under `_lock`."""

    id: int
    title: str
    uses_gpu: bool
    state: str = "running"
    done: int = 0
    total: int = 0
    info: dict = field(default_factory=dict)
    message: str = ""
    log: list[str] = field(default_factory=list)
    error: Optional[str] = None
    result: Any = None
    started: float = field(default_factory=time.time)
    finished: Optional[float] = None
    cancel_requested: bool = False
    thread: Optional[threading.Thread] = None
    series: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def snapshot(self) -> JobSnapshot:
        with self._lock:
            return JobSnapshot(self.id, self.title, self.state, self.done, self.total, dict(self.info),
                               self.message, tuple(self.log), self.error, self.result, self.started, self.finished,
                               {k: tuple(v) for k, v in self.series.items()}, dict(self.meta))


class JobContext:
    """What the job's function gets: report progress, add log lines, ask whether to stop."""

    def __init__(self, job: Job, runner: Optional[JobRunner] = None):
        self._job = job
        self._runner = runner

    def progress(self, done: int, total: int, info: Info = None) -> None:
        """The core's `progress(done, total, info)` callback: info is a message or a dict of figures."""
        job = self._job
        with job._lock:
            job.done, job.total = int(done), int(total)
            if isinstance(info, dict):
                job.info = dict(info)
            elif info:
                job.message = str(info)
        if self._runner is not None:
            self._runner._notify(job)

    def log(self, line: str) -> None:
        job = self._job
        with job._lock:
            job.log.append(line)
            del job.log[:-MAX_LOG_LINES]

    def record(self, name: str, x: float, y: float) -> None:
        """Add a point to a named series (a chart of the loss per step, say)."""
        job = self._job
        with job._lock:
            job.series.setdefault(name, []).append((float(x), float(y)))

    def cancelled(self) -> bool:
        """The core's `cancelled()` callable: True once someone pressed Stop (or the host's Interrupt)."""
        job = self._job
        if not job.cancel_requested and self._runner is not None and self._runner._host_says_stop(job):
            job.cancel_requested = True
        return job.cancel_requested


class JobRunner:
    """Starts jobs in worker threads; refuses a second GPU job while one runs (one GPU job per host process)."""

    def __init__(self, before_gpu: Optional[Callable[[], None]] = None,
                 after_gpu: Optional[Callable[[], None]] = None, keep: int = 20, *,
                 on_progress: Optional[Callable[[JobSnapshot], None]] = None,
                 host_interrupted: Optional[Callable[[], bool]] = None):
        self._before_gpu, self._after_gpu, self._keep = before_gpu, after_gpu, keep
        self._on_progress, self._host_interrupted = on_progress, host_interrupted
        self._jobs: dict[int, Job] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def start(self, title: str, fn: Callable[[JobContext], Any], *, uses_gpu: bool = True,
              meta: Optional[dict] = None) -> Job:
        """Run `fn(ctx)` in a thread; its return value becomes the job's result, its exception the error text.
        `meta` travels with the job's snapshots (a UI finds its own kind of job again by it)."""
        with self._lock:
            busy = self._gpu_job()
            if uses_gpu and busy is not None:
                raise SdtuneError(f"'{busy.title}' is still running; wait for it or press Stop before starting "
                                  f"'{title}' (one GPU job at a time)")
            job = Job(next(self._ids), title, uses_gpu, meta=dict(meta or {}))
            self._jobs[job.id] = job
            for old in sorted(self._jobs)[:-self._keep]:
                if self._jobs[old].state != "running":
                    del self._jobs[old]
        job.thread = threading.Thread(target=self._run, args=(job, fn), name=f"sdtune-job-{job.id}", daemon=True)
        job.thread.start()
        return job

    def _run(self, job: Job, fn: Callable[[JobContext], Any]) -> None:
        ctx = JobContext(job, self)
        state, result, error = "done", None, None
        try:
            self._notify(job)
            if job.uses_gpu and self._before_gpu:
                with job._lock:
                    job.message = "freeing the GPU (unloading the WebUI's model)"
                self._before_gpu()
                with job._lock:
                    job.message = ""
            result = fn(ctx)
            if job.cancel_requested:
                state = "cancelled"
        except SdtuneError as e:
            state, error = "failed", str(e)
        except Exception as e:  # noqa: BLE001 - a UI shows the message; the console keeps the traceback
            log.error("sdtune job %r failed:\n%s", job.title, traceback.format_exc())
            state, error = "failed", f"{type(e).__name__}: {e}"
        finally:
            if job.uses_gpu and self._after_gpu:
                try:
                    self._after_gpu()
                except Exception as e:  # noqa: BLE001 - the job's own outcome matters more
                    log.warning("sdtune: giving the GPU back to the host failed: %s", e)
            with job._lock:
                job.state, job.result, job.error, job.finished = state, result, error, time.time()
                if error:
                    job.log.append(f"Error: {error}")
            self._notify(job)

    def _notify(self, job: Job) -> None:
        """Show a GPU job in the host's own progress display (a failing host hook never stops the job)."""
        if not (job.uses_gpu and self._on_progress):
            return
        try:
            self._on_progress(job.snapshot())
        except Exception as e:  # noqa: BLE001 - the host's display is a courtesy
            log.warning("sdtune: showing progress in the host failed: %s", e)

    def _host_says_stop(self, job: Job) -> bool:
        """True when the host's own Interrupt was pressed during a GPU job."""
        if not (job.uses_gpu and self._host_interrupted):
            return False
        try:
            return bool(self._host_interrupted())
        except Exception:  # noqa: BLE001 - a broken host hook must not stop a run
            return False

    def _gpu_job(self) -> Optional[Job]:
        return next((j for j in self._jobs.values() if j.uses_gpu and j.state == "running"), None)

    def busy(self) -> Optional[JobSnapshot]:
        """The running GPU job, if any (hosts block generation while one runs)."""
        job = self._gpu_job()
        return job.snapshot() if job else None

    def get(self, job_id: int) -> Optional[Job]:
        return self._jobs.get(job_id)

    def jobs(self) -> list[JobSnapshot]:
        """Every kept job, newest first."""
        return [self._jobs[i].snapshot() for i in sorted(self._jobs, reverse=True)]

    def cancel(self, job_id: Optional[int] = None) -> bool:
        """Ask a job (default: every running one) to stop at its next check; True if one was running."""
        targets = [self._jobs[job_id]] if job_id in self._jobs else [] if job_id else list(self._jobs.values())
        hit = False
        for job in targets:
            if job.state == "running":
                job.cancel_requested, hit = True, True
        return hit

    def wait(self, job_id: int, timeout: Optional[float] = None) -> JobSnapshot:
        """Block until the job ends (or the timeout passes) and return its snapshot."""
        job = self._jobs[job_id]
        if job.thread is not None:
            job.thread.join(timeout)
        return job.snapshot()
