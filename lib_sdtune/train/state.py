"""Resumable training state: everything needed to continue a killed run to the same result.

A state folder `<name>-<epoch:06d>-state` (or `<name>-state` when cancelled or at the end) holds the
adapter tensors (`network.state`: safetensors, fp32), the optimizer and scheduler state and the RNG states
(`optimizer.state`: read back with `torch.load(weights_only=True)`, tensors and plain values only, no code),
and `train_state.json` (epoch, step, batch position, config fingerprint). Written to a temp folder and
renamed, so a kill while saving leaves the previous state intact. The names end in `.state`, not
`.safetensors`/`.pt`: runs are saved into the hosts' LoRA folders, which list every model file below them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import SdtuneError
from ..io.safetensors_io import SafetensorsFile, save_safetensors

__all__ = ["TrainPosition", "config_fingerprint", "save_state", "load_state"]

STATE_FORMAT = "sdtune-train-state-1"
NETWORK_FILE, OPTIMIZER_FILE = "network.state", "optimizer.state"
OLD_NAMES = {NETWORK_FILE: "network.safetensors", OPTIMIZER_FILE: "optimizer.pt"}  # sdtune 0.2.0 wrote these


@dataclass
class TrainPosition:
    """Where a run is: the next epoch/batch to train and the optimizer steps done."""

    epoch: int  # 1-based epoch being trained
    batch_index: int  # batches of that epoch already trained
    step: int  # optimizer steps done
    seed: int
    fingerprint: str  # what must not change between the save and the resume


def config_fingerprint(values: dict[str, Any]) -> str:
    """A hash of the settings that decide the result (paths of outputs and resume excluded)."""
    skip = {"output_dir", "output_name", "resume", "save_every_n_epochs", "save_every_n_steps", "save_last_n_epochs",
            "save_last_n_steps", "save_state", "save_state_on_train_end", "max_data_loader_n_workers",
            "training_comment"} | {k for k in values if k.startswith("metadata_")}
    kept = {k: v for k, v in sorted(values.items()) if k not in skip}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_state(folder: Path, network_tensors: dict[str, torch.Tensor], optimizer_state: dict,
               scheduler_state: dict, rng: dict[str, torch.Tensor], position: TrainPosition) -> Path:
    """Write the state folder atomically (temp folder + rename)."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_safetensors({k: v.detach().float().cpu().contiguous() for k, v in network_tensors.items()},
                     tmp / NETWORK_FILE, {"format": STATE_FORMAT})
    torch.save({"optimizer": optimizer_state, "scheduler": scheduler_state, "rng": rng}, tmp / OPTIMIZER_FILE)
    (tmp / "train_state.json").write_text(json.dumps({"format": STATE_FORMAT, **asdict(position)}, indent=2))
    old = folder.with_name(f".{folder.name}.{os.getpid()}.old")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    if old.exists():
        shutil.rmtree(old)
    return folder


def load_state(folder: Path) -> tuple[dict[str, torch.Tensor], dict, dict, dict, TrainPosition]:
    """Read a state folder (safe loading only); errors name the folder and what is missing."""
    folder = Path(folder)
    info_path = folder / "train_state.json"
    if not info_path.exists():
        raise SdtuneError(f"{folder}: not a training state folder (no train_state.json); give the "
                          "'<name>-<epoch>-state' folder the trainer wrote")
    info = json.loads(info_path.read_text())
    if info.pop("format", None) != STATE_FORMAT:
        raise SdtuneError(f"{folder}: written by another version of sdtune; cannot resume from it")
    net_path, opt_path = (folder / n if (folder / n).exists() else folder / OLD_NAMES[n]
                          for n in (NETWORK_FILE, OPTIMIZER_FILE))
    with SafetensorsFile(net_path) as f:
        network = {k: f.get_tensor(k) for k in f.keys()}
    try:
        blob = torch.load(opt_path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling refusal is reported the same way
        raise SdtuneError(f"{opt_path}: cannot be read safely ({e})") from None
    return network, blob["optimizer"], blob["scheduler"], blob["rng"], TrainPosition(**info)


def latest_state(out_dir: Path, name: str) -> Optional[Path]:
    """The newest state folder of a run in `out_dir`, if any."""
    folders = [p for p in Path(out_dir).glob(f"{name}-*state") if (p / "train_state.json").exists()]
    return max(folders, key=lambda p: p.stat().st_mtime) if folders else None
