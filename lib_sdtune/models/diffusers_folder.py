"""Diffusers-format model folders (`model_index.json` + one subfolder per component), offline.

Each component loads with its library's `from_pretrained(local_files_only=True)`, which reports
missing/unexpected keys; the architecture is read from the component configs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Optional

import torch

from ..errors import SdtuneError, UnsupportedModelError
from ..io.detect import ArchInfo
from ..io.safetensors_io import SafetensorsFile

FOLDER_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")


def is_diffusers_folder(path: str | os.PathLike) -> bool:
    """True for a folder holding a diffusers pipeline (it has `model_index.json`)."""
    p = Path(path)
    return p.is_dir() and (p / "model_index.json").is_file()


def _config(folder: Path, name: str, file: str = "config.json") -> dict:
    path = folder / name / file
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as e:
        raise SdtuneError(f"{path}: cannot read this config ({e})") from e


def detect_folder_architecture(folder: str | os.PathLike) -> ArchInfo:
    """SD1/SD2/SDXL/refiner from the unet, text-encoder and scheduler configs of a diffusers folder."""
    root = Path(folder)
    index = json.loads((root / "model_index.json").read_text(encoding="utf-8"))
    unet = _config(root, "unet")
    if index.get("_class_name", "").startswith(("StableDiffusion3", "Flux")) or not unet:
        raise UnsupportedModelError(f"{root}: sdtune handles Stable Diffusion 1.x, 2.x and SDXL; this folder holds "
                                    f"a {index.get('_class_name', 'pipeline without a UNet')}")
    present = {name: name + "/" for name in FOLDER_COMPONENTS if (root / name / "config.json").is_file()}
    if unet.get("addition_embed_type") == "text_time":
        family = "sdxl" if "text_encoder" in present else "sdxl-refiner"
    else:
        te = _config(root, "text_encoder")
        family = "sd2" if te.get("hidden_act") == "gelu" else "sd1"  # OpenCLIP vs OpenAI CLIP
    prediction = _config(root, "scheduler", "scheduler_config.json").get("prediction_type", "epsilon")
    in_channels = int(unet.get("in_channels", 4))
    return ArchInfo(family=family, prediction_type=prediction, in_channels=in_channels, components=present,
                    variant={9: "inpaint", 8: "instruct-pix2pix"}.get(in_channels, ""))


def folder_weight_files(folder: str | os.PathLike, arch: ArchInfo) -> dict[str, Path]:
    """The safetensors weights file of each component (diffusers' and transformers' file names)."""
    out = {}
    for name in arch.components:
        for fname in _WEIGHT_NAMES:
            cand = Path(folder) / name / fname
            if cand.is_file():
                out[name] = cand
                break
        else:
            raise SdtuneError(f"{Path(folder) / name}: no .safetensors weights (sdtune does not unpickle .bin files)")
    return out


def folder_shapes(folder: str | os.PathLike, arch: ArchInfo) -> dict[str, dict[str, tuple[int, ...]]]:
    """Component -> {key: shape}, read from the safetensors headers only."""
    return {name: {k: i.shape for k, i in SafetensorsFile(p).tensors.items()}
            for name, p in folder_weight_files(folder, arch).items()}


def load_diffusers_folder(folder: str | os.PathLike, components: Optional[Iterable[str]] = None,
                          dtype: Optional[torch.dtype] = None):
    """Load the components of a diffusers folder; returns (arch, modules, missing, unexpected)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    root = Path(folder)
    arch = detect_folder_architecture(root)
    folder_weight_files(root, arch)  # refuse pickled weights before anything is loaded
    classes = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
               "text_encoder_2": CLIPTextModelWithProjection}
    modules, missing, unexpected = {}, [], []
    for name in arch.components:
        if components is not None and name not in components:
            continue
        kwargs = {"local_files_only": True, "output_loading_info": True, "use_safetensors": True}
        if dtype is not None:
            kwargs["torch_dtype"] = dtype
        module, info = classes[name].from_pretrained(root / name, **kwargs)
        missing += [f"{name}.{k}" for k in info.get("missing_keys", [])]
        unexpected += [f"{name}.{k}" for k in info.get("unexpected_keys", [])]
        modules[name] = module.eval()
    return arch, modules, missing, unexpected
