"""What every sdtune node needs from ComfyUI: folders, errors, progress and Cancel, the device, IMAGE tensors.

Only ComfyUI's public host calls are used (`folder_paths`, `comfy.model_management`, `comfy.utils`,
`server.PromptServer`), all of them here, so a change in ComfyUI touches this file and not the nodes.
"""

from __future__ import annotations

import contextlib
import io as _bytes_io
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import comfy.model_management as mm
import comfy.utils
import folder_paths
import numpy as np
import torch
from comfy_api.latest import io
from PIL import Image

from lib_sdtune.errors import SdtuneError
from lib_sdtune.host import confine

log = logging.getLogger("sdtune")

# Socket types of our own (one class each: io.Custom makes a new class per call)
Dataset = io.Custom("SDTUNE_DATASET")
Plan = io.Custom("SDTUNE_PLAN")



@dataclass(frozen=True)
class DatasetHandle:
    """What an SDTUNE_DATASET socket carries: the (confined) dataset folder and its caption extension."""

    path: Path
    caption_extension: str = ".txt"


# extra_model_paths.yaml key whose folders may hold datasets (besides ComfyUI's input folder):
#   sdtune:
#     sdtune_datasets: /data/datasets
DATASET_FOLDER_KEY = "sdtune_datasets"
TAGGER_FOLDER_KEY = "sdtune_taggers"
NONE = "none"  # the empty choice of optional model combos
_NAME = re.compile(r"^[\w.\- /]+$")


# --- folders -------------------------------------------------------------------------------------------------

def model_list(kind: str, with_none: bool = False) -> list[str]:
    """The files ComfyUI lists for a model folder (checkpoints, loras), for a combo."""
    names = folder_paths.get_filename_list(kind)
    return [NONE, *names] if with_none else names


def model_path(kind: str, name: str) -> str:
    """The file a combo entry names (ComfyUI resolves it inside its own folders)."""
    return folder_paths.get_full_path_or_raise(kind, name)


def optional_model_path(kind: str, name: str) -> Optional[str]:
    """Like model_path, but `none` gives None."""
    return None if name in ("", NONE) else model_path(kind, name)


def dataset_roots() -> list[Path]:
    """Where dataset folders may be: ComfyUI's input folder, then the `sdtune_datasets` folders configured."""
    roots = [Path(folder_paths.get_input_directory())]
    if DATASET_FOLDER_KEY in folder_paths.folder_names_and_paths:
        roots += [Path(p) for p in folder_paths.get_folder_paths(DATASET_FOLDER_KEY)]
    return roots


def dataset_folder(folder: str) -> Path:
    """A dataset folder typed by the user, confined to dataset_roots() (relative names: in the input folder)."""
    if not folder.strip():
        raise SdtuneError("folder: give a dataset folder inside ComfyUI's input folder (e.g. my_dataset), or an "
                          f"absolute path inside a folder listed under '{DATASET_FOLDER_KEY}' in "
                          "extra_model_paths.yaml")
    path = confine(folder.strip(), dataset_roots(), "dataset")
    if not path.is_dir():
        raise SdtuneError(f"folder: {path} is not a folder")
    return path


def tagger_roots() -> list[Path]:
    """Folders searched for WD14 taggers: `sdtune_taggers` in extra_model_paths.yaml, then models/<tagger dirs>."""
    from lib_sdtune.tags.wd14_model import model_roots

    configured = folder_paths.get_folder_paths(TAGGER_FOLDER_KEY) \
        if TAGGER_FOLDER_KEY in folder_paths.folder_names_and_paths else []
    return model_roots(configured, folder_paths.models_dir)


def new_output(kind: str, name: str) -> tuple[Path, str]:
    """A new .safetensors file in the first folder of `kind` (ComfyUI caches models by name: never overwrite).

    `name` may hold sub-folders (sdtune/my_merge); a number is added when the name is taken.
    Returns (path, the name ComfyUI will list it under).
    """
    name = name.strip().removesuffix(".safetensors").strip("/ ")
    if not name or not _NAME.match(name) or any(part in ("", ".", "..") for part in name.split("/")):
        raise SdtuneError(f"output name {name!r}: use letters, digits, '_', '-', '.', spaces and '/' for sub-folders")
    root = Path(folder_paths.get_folder_paths(kind)[0])
    for n in range(100000):
        candidate = f"{name}.safetensors" if n == 0 else f"{name}_{n:05d}.safetensors"
        path = confine(root / candidate, [root], kind)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            return path, path.relative_to(root.resolve()).as_posix()
    raise SdtuneError(f"{root}: every name {name}_NNNNN.safetensors is taken")


def listed_name(kind: str, path: Path) -> str:
    """The name ComfyUI lists a file of its `kind` folders under (relative, '/' separated)."""
    path = Path(path).resolve()
    for root in folder_paths.get_folder_paths(kind):
        root = Path(root).resolve()
        if root in path.parents:
            return path.relative_to(root).as_posix()
    return path.name


# --- errors, progress, Cancel --------------------------------------------------------------------------------

class HostProgress:
    """The core's `progress(done, total, info)` and `cancelled()` for ComfyUI.

    Progress goes to ComfyUI's progress bar (and, with `event`, every step's figures to the browser through
    PromptServer.send_sync). ComfyUI's Cancel only sets a flag: `cancelled()` reads it, so the core stops at
    its next check and writes what it writes on a cancel; `raise_if_interrupted()` then raises ComfyUI's
    InterruptProcessingException as ComfyUI's own nodes do.
    """

    def __init__(self, node_id: Optional[str] = None, event: Optional[str] = None):
        self.node_id = node_id
        self.event = event
        self.interrupted = False
        self.bar = comfy.utils.ProgressBar(1, node_id=node_id)

    def progress(self, done: int, total: int, info: object = None) -> None:
        if self.cancelled():
            return  # the bar's hook would raise mid-step; the core stops cleanly at its next check
        try:
            self.bar.update_absolute(done, max(1, total))
        except mm.InterruptProcessingException:  # Cancel pressed between our check and the hook's
            self.interrupted = True
            return
        if self.event and isinstance(info, dict):
            send_event(self.event, {"node": self.node_id, "step": done, "total": total,
                                    **{k: v for k, v in info.items() if isinstance(v, (int, float, str))}})

    def cancelled(self) -> bool:
        if not self.interrupted and mm.processing_interrupted():
            self.interrupted = True
        return self.interrupted

    def raise_if_interrupted(self) -> None:
        if self.interrupted:
            mm.throw_exception_if_processing_interrupted()  # clears ComfyUI's flag and raises
            raise mm.InterruptProcessingException()  # the progress hook had cleared the flag already


def send_event(event: str, data: dict) -> None:
    """A websocket message to the browser that queued the prompt (nothing without ComfyUI's server)."""
    try:
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if server is not None:
        server.send_sync(event, data, server.client_id)


@contextlib.contextmanager
def core_errors(progress: Optional[HostProgress] = None) -> Iterator[None]:
    """SdtuneError -> ValueError with the message (ComfyUI shows it as is); a cancel -> ComfyUI's interrupt."""
    try:
        yield
    except SdtuneError as e:
        if progress is not None and progress.interrupted:
            progress.raise_if_interrupted()
        raise ValueError(str(e)) from None
    if progress is not None:
        progress.raise_if_interrupted()


@contextlib.contextmanager
def whole_device() -> Iterator[torch.device]:
    """For training and merging: ComfyUI's models leave the device first, its caches are emptied after."""
    mm.unload_all_models()
    mm.soft_empty_cache()
    try:
        yield mm.get_torch_device()
    finally:
        mm.soft_empty_cache()


def device_facts() -> tuple[float, bool]:
    """(GPU memory in GB, bf16 supported) of ComfyUI's device; (0, False) when ComfyUI runs on the CPU."""
    dev = mm.get_torch_device()
    if dev.type == "cpu":
        return 0.0, False
    total = round(mm.get_total_memory(dev) / 1024 ** 3, 1)
    return total, dev.type == "cuda" and bool(torch.cuda.is_bf16_supported())


# --- conversions ---------------------------------------------------------------------------------------------

def png_to_image(png: bytes) -> torch.Tensor:
    """A PNG as ComfyUI's IMAGE: float32 [1, H, W, 3] in 0..1."""
    with Image.open(_bytes_io.BytesIO(png)) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(rgb)[None].to(mm.intermediate_device())
