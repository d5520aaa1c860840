"""The A1111/Forge side of sdtune's jobs: free the WebUI's VRAM around a GPU job, pause its generation meanwhile,
show the job in its progress state, stop the job on its Interrupt, and read its folders and settings.

The WebUI's modules (`shared`, `sd_models`, `processing`, the queue lock) are handed in, so this file never
imports `modules.*` and the tests drive it with stand-ins. Facts it relies on (A1111 v1.10.1, Forge 2):
- A1111 `sd_models.unload_model_weights(m)` moves the model to the CPU, `send_model_to_device(m)` moves it
  back (what the WebUI's "Unload SD checkpoint to RAM" / "Load ... to VRAM" buttons do); calling it with no
  model loaded would *load* one first, so an empty model slot is left alone. Forge's `unload_model_weights`
  frees every model (`memory_management.unload_all_models`) and reloads lazily at the next generation; its
  `send_model_to_device` is a no-op.
- Every generation (txt2img, img2img, the API, scripts such as X/Y/Z) runs `processing.process_images`, which
  calls the module-level `process_images_inner`; an exception raised there reaches the user as the red
  "Error" text under the gallery (or the API's error response) and the WebUI carries on.
- A generation holds `call_queue.queue_lock`; taking it before unloading waits for a running generation.
- `shared.state` (job, job_count, sampling_step(s), textinfo, interrupted) feeds `/sdapi/v1/progress`; the
  Interrupt button and `/sdapi/v1/interrupt` set `state.interrupted`.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional

from ..errors import SdtuneError
from ..host import HostFolders
from ..jobs import JobRunner, JobSnapshot
from .context import UiContext
from .jobs_view import job_status
from .settings import SETTINGS, dataset_roots, read_values, ui_settings

log = logging.getLogger(__name__)

GUARD_MARK = "_sdtune_guarded"  # attribute on our wrappers of process_images_inner / reload_model_weights


class GenerationPaused(SdtuneError):
    """Raised into a WebUI generation while an sdtune job holds the GPU (its name is what the user reads)."""


class WebUIHost:
    """One per WebUI process: the job runner every sdtune tab shares, wired to the WebUI's model and state."""

    def __init__(self, shared: Any, sd_models: Any, processing: Any, *, models_dir: str | os.PathLike,
                 data_dir: str | os.PathLike, queue_lock: Any = None, forge: bool = False):
        self.shared, self.sd_models, self.processing = shared, sd_models, processing
        self.models_dir, self.data_dir = Path(models_dir), Path(data_dir)
        self.queue_lock, self.forge = queue_lock, forge
        self._moved: Any = None  # the model we sent to the CPU (A1111), to send back
        self._shown: Optional[int] = None  # the job id shown in shared.state
        self._lock = threading.Lock()
        self.jobs = JobRunner(before_gpu=self.free_gpu, after_gpu=self.restore_gpu,
                              on_progress=self.show_progress, host_interrupted=self.interrupted)

    @classmethod
    def from_webui(cls) -> WebUIHost:
        """Build from the running WebUI's modules (A1111 1.10 or Forge)."""
        import importlib.util

        from modules import call_queue, paths, processing, sd_models, shared

        forge = importlib.util.find_spec("modules_forge") is not None
        return cls(shared, sd_models, processing, models_dir=paths.models_path, data_dir=paths.data_path,
                   queue_lock=call_queue.queue_lock, forge=forge)

    # --- folders and settings ------------------------------------------------------------------------
    def folders(self) -> HostFolders:
        """The WebUI's own folders: honours --ckpt-dir, --lora-dir, --vae-dir, --models-dir, --data-dir."""
        opts = self.shared.cmd_opts
        checkpoints = [Path(self.sd_models.model_path)]
        if getattr(opts, "ckpt_dir", None):
            checkpoints.append(Path(opts.ckpt_dir))
        loras = [Path(getattr(opts, "lora_dir", None) or self.models_dir / "Lora")]
        lyco = getattr(opts, "lyco_dir_backcompat", None)
        if lyco and Path(lyco).is_dir() and Path(lyco) != loras[0]:
            loras.append(Path(lyco))
        vaes = [self.models_dir / "VAE"]
        if getattr(opts, "vae_dir", None):
            vaes.insert(0, Path(opts.vae_dir))
        return HostFolders(checkpoints=tuple(checkpoints), loras=tuple(loras),
                           datasets=dataset_roots(read_values(self.shared.opts), self.data_dir), vaes=tuple(vaes))

    def settings(self):
        device = str(getattr(self.shared, "device", "") or "")
        return ui_settings(read_values(self.shared.opts), self.models_dir,
                           device if device.startswith("cuda") else None)

    def context(self) -> UiContext:
        """A UiContext for a freshly built tab: current folders and settings, the process-wide job runner."""
        return UiContext(self.folders(), self.jobs, self.settings(), refresh_host=self.refresh_lists)

    def add_settings(self) -> None:
        """`on_ui_settings`: the sdtune section of the WebUI's Settings page."""
        import gradio as gr

        shared = self.shared
        # a (key, title) pair: the settings page unpacks exactly two; the category goes in its own argument
        section = ("sdtune", "sdtune")
        for s in SETTINGS:
            info = shared.OptionInfo(s.default, s.label, gr.Radio if s.choices else None,
                                     {"choices": list(s.choices)} if s.choices else None, section=section,
                                     category_id="training")
            shared.opts.add_option(s.key, info.info(s.info) if s.info else info)

    def update_context(self, ctx: UiContext) -> None:
        """Settings changed: give an open tab the new folders and settings (the job runner stays)."""
        ctx.folders, ctx.settings = self.folders(), self.settings()

    def refresh_lists(self, kind: str) -> None:
        """New files were written: rescan the WebUI's LoRA list (built-in Lora extension) or checkpoints."""
        if kind == "lora":
            networks = sys.modules.get("networks")  # A1111's and Forge's built-in Lora extension
            if networks is not None and hasattr(networks, "list_available_networks"):
                networks.list_available_networks()
        elif kind == "checkpoint" and hasattr(self.sd_models, "list_models"):
            self.sd_models.list_models()

    # --- VRAM around a GPU job -----------------------------------------------------------------------
    def free_gpu(self) -> None:
        """Wait for a running generation, then take the WebUI's model off the GPU."""
        with self.queue_lock if self.queue_lock is not None else nullcontext():
            if self.forge:
                self.sd_models.unload_model_weights()
                return
            model = getattr(getattr(self.sd_models, "model_data", None), "sd_model", None)
            if model is None:
                return  # nothing loaded: asking A1111 to unload would load the model first
            self.sd_models.unload_model_weights(model)
            self._moved = model

    def restore_gpu(self) -> None:
        """Give the WebUI its model back on the GPU (Forge reloads by itself at the next generation)."""
        model, self._moved = self._moved, None
        if model is not None and not self.forge:
            self.sd_models.send_model_to_device(model)

    # --- the WebUI's progress state and Interrupt ----------------------------------------------------
    def show_progress(self, snap: JobSnapshot) -> None:
        """Mirror a GPU job into `shared.state` (what /sdapi/v1/progress and the console report)."""
        state = self.shared.state
        with self._lock:
            if snap.running:
                if self._shown != snap.id:
                    state.begin(job=f"sdtune: {snap.title}")
                    self._shown = snap.id
                state.job = f"sdtune: {snap.title}"
                state.job_count, state.job_no = 1, 0
                state.sampling_steps, state.sampling_step = max(1, snap.total), snap.done
                state.textinfo = job_status(snap)
            elif self._shown == snap.id:
                self._shown = None
                state.textinfo = None
                state.interrupted = False  # our stop must not cancel the next generation
                state.end()

    def interrupted(self) -> bool:
        """True once the WebUI's Interrupt (button or /sdapi/v1/interrupt) was pressed during our job."""
        return self._shown is not None and bool(getattr(self.shared.state, "interrupted", False))

    # --- pausing generation while a GPU job runs -----------------------------------------------------
    def check_generation_allowed(self) -> None:
        """Refuse a WebUI generation (or a checkpoint load) while an sdtune GPU job holds the GPU."""
        busy = self.jobs.busy()
        if busy is not None:
            raise GenerationPaused(f"sdtune is running '{busy.title}' on the GPU, so generation and model loading "
                                   "are paused until it ends. Open the sdtune tab to follow it or press Stop there.")

    def _guarded(self) -> list[tuple[Any, str]]:
        """What asks `check_generation_allowed` first: generation, and in A1111 loading a checkpoint (a checkpoint
        change, or the first use of `shared.sd_model`): it would put a model on the GPU mid-run, and A1111 patches
        torch's module initialisation and state-dict loading process-wide while it loads, under the running job.
        Forge loads lazily, at the next generation, which is guarded."""
        targets = [(self.processing, "process_images_inner")]
        if not self.forge:
            targets += [(self.sd_models, name) for name in ("reload_model_weights", "load_model")
                        if hasattr(self.sd_models, name)]
        return targets

    def install_guard(self) -> None:
        """Wrap each guarded WebUI function once (a "Reload UI" finds our wrapper and leaves it)."""
        host = self
        for owner, name in self._guarded():
            current = getattr(owner, name)
            if getattr(current, GUARD_MARK, None) is not None:
                continue

            def guarded(*args, _original=current, **kwargs):
                host.check_generation_allowed()
                return _original(*args, **kwargs)

            setattr(guarded, GUARD_MARK, current)
            guarded.__name__, guarded.__doc__ = name, current.__doc__
            setattr(owner, name, guarded)

    def remove_guard(self) -> None:
        """Put back the original functions (only where ours is still the outermost wrapper)."""
        for owner, name in self._guarded():
            original = getattr(getattr(owner, name), GUARD_MARK, None)
            if original is not None:
                setattr(owner, name, original)


# One host per WebUI process, kept across "Reload UI" (which re-runs scripts/ but keeps this package loaded),
# so a job that is still running stays visible in the new tab and generation stays paused until it ends.
_HOSTS: list[WebUIHost] = []


def webui_host() -> WebUIHost:
    """The process's WebUIHost, built on first use from the running WebUI."""
    if not _HOSTS:
        _HOSTS.append(WebUIHost.from_webui())
    return _HOSTS[0]


def release_webui_host() -> None:
    """`on_script_unloaded`: undo the generation guard unless a job still runs (then it stays until exit)."""
    if _HOSTS and _HOSTS[0].jobs.busy() is None:
        _HOSTS.pop().remove_guard()
