"""Reading and writing LoRA files as kohya sd-scripts does: tensors, `ss_*`, `sshs_*` and ModelSpec metadata.

Values follow sd-scripts: `train_network.py` (ss_*, stringified with `str()`), `library/train_util.py`
`precalculate_safetensors_hashes` (hashes of the file serialised with only the ss_* keys),
`library/model_util.py`/`sdxl_model_util.py` (ss_base_model_version) and `library/sai_model_spec.py`
(modelspec.*, spec 1.0.1; implementation "diffusers" for SD1/SD2 LoRA names, SGM URL for SDXL).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import time
from pathlib import Path
from typing import Mapping, Optional

import torch

from ..errors import SdtuneError, UnsafeFileError
from ..io.hashes import precalculate_hashes
from ..io.safetensors_io import SafetensorsFile, save_safetensors
from .network import LoraNetwork

__all__ = ["save_lora", "load_lora", "load_lora_into", "lora_metadata"]

SS_METADATA_MINIMUM_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim",
                            "ss_network_alpha", "ss_network_args")
_IMPL_SGM = "https://github.com/Stability-AI/generative-models"
log = logging.getLogger(__name__)


def _base_model_version(family: str, v_pred: bool) -> str:
    """sd-scripts' `ss_base_model_version`: sd_v1, sd_v2, sd_v2_v (v-pred SD2) or sdxl_base_v1-0."""
    if family.startswith("sdxl"):
        return "sdxl_base_v1-0"  # sdxl_model_util.MODEL_VERSION_SDXL_BASE_V1_0 (the refiner is not trained)
    return ("sd_v2" if family == "sd2" else "sd_v1") + ("_v" if v_pred else "")


def _architecture(family: str, v_pred: bool) -> str:
    """sai_model_spec.determine_architecture(..., lora=True)."""
    if family.startswith("sdxl"):
        return "stable-diffusion-xl-v1-base/lora"
    if family == "sd2":
        return ("stable-diffusion-v2-768-v" if v_pred else "stable-diffusion-v2-512") + "/lora"
    return "stable-diffusion-v1/lora"


def lora_metadata(network: LoraNetwork, output_name: str, v_pred: bool = False,
                  extra: Optional[Mapping[str, str]] = None, timestamp: Optional[float] = None) -> dict[str, str]:
    """The ss_* and modelspec.* keys sd-scripts writes for this network (extra entries override them)."""
    cfg, family = network.config, network.family
    args = cfg.network_args()  # algo/conv_dim/dora_wd/... as given to --network_args
    sdxl = family.startswith("sdxl")
    ts = time.time() if timestamp is None else timestamp
    reso = 1024 if sdxl else 768 if family == "sd2" and v_pred else 512
    meta = {
        "ss_network_module": cfg.network_module,
        "ss_network_dim": str(cfg.rank),
        "ss_network_alpha": str(cfg.alpha),
        "ss_network_dropout": str(cfg.dropout),
        "ss_v2": str(family == "sd2"),
        "ss_base_model_version": _base_model_version(family, v_pred),
        "ss_output_name": output_name,
        "ss_training_comment": "None",
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": _architecture(family, v_pred),
        "modelspec.implementation": _IMPL_SGM if sdxl else "diffusers",
        "modelspec.title": output_name,
        "modelspec.resolution": f"{reso}x{reso}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(ts)).isoformat(),
        "modelspec.prediction_type": "v" if v_pred else "epsilon",
    }
    if args:  # sd-scripts writes ss_network_args only when --network_args was given
        meta["ss_network_args"] = json.dumps(args)
    meta.update(extra or {})
    return meta


def save_lora(network: LoraNetwork, path: str | os.PathLike, metadata: Optional[Mapping[str, str]] = None,
              dtype: Optional[torch.dtype] = torch.float16, v_pred: bool = False) -> Path:
    """Write `network` as an sd-scripts LoRA .safetensors (atomic), with ss_*, sshs_* and modelspec.* keys."""
    p = Path(path)
    if p.suffix.lower() != ".safetensors":
        raise SdtuneError(f"{p}: LoRA files are written as .safetensors only")
    if network.config.weight_decompose:
        log.warning("%s: DoRA files are exact in LyCORIS and sdtune; ComfyUI applies them approximately and "
                    "A1111 1.10 misreads their per-output-row dora_scale (prefer LoRA/LoCon/LoHa/LoKr for A1111)",
                    p.name)
    tensors = network.state_dict_kohya(dtype)
    meta = lora_metadata(network, p.stem, v_pred=v_pred, extra=metadata)
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = precalculate_hashes(tensors, meta)
    return save_safetensors(tensors, p, meta)


def load_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, metadata) of a LoRA .safetensors; pickled formats (.pt/.ckpt/.bin) are refused."""
    p = Path(path)
    with open(p, "rb") as fh:
        head = fh.read(9)
    # a safetensors file starts with its header length (u64 LE) and then the JSON header's "{"; a pickle or
    # zip-pickle (.pt/.ckpt renamed) does not
    if p.suffix.lower() != ".safetensors" or len(head) < 9 or head[8:9] != b"{":
        raise UnsafeFileError(f"{p}: only .safetensors LoRA files are loaded (pickled .pt/.ckpt files can run code)")
    with SafetensorsFile(p) as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata)


def load_lora_into(network: LoraNetwork, path: str | os.PathLike, strict: bool = True) -> list[str]:
    """Load a LoRA file into `network` after checking it was made for the network's architecture."""
    from .lora_info import check_lora_fits, inspect_lora

    check_lora_fits(inspect_lora(path), network.family)
    state, _ = load_lora(path)
    return network.load_kohya_state_dict(state, strict=strict)
