"""What the LoRA tools share: the LoRA-name map of a checkpoint, block weights (LBW), `file:strength`
arguments, output checks, and writing a LoRA file with sd-scripts' metadata and hashes."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch

from ..errors import SdtuneError
from ..io.checkpoint import source_from_shapes
from ..io.detect import ArchInfo
from ..io.hashes import precalculate_hashes
from ..io.safetensors_io import save_safetensors
from ..networks.naming import LoraNameMap, LoraTarget, lora_targets
from .blocks import SD_SLOTS, SDXL_SLOTS, layout_for, resolve_blocks, unet_slot

__all__ = ["Blocks", "checkpoint_name_map", "target_shape", "parse_weighted", "block_weights", "target_slot",
           "check_output", "write_lora", "minimal_metadata", "base_model_version", "SAVE_DTYPES"]

Blocks = Union[str, Sequence[float], None]  # a preset name, LBW values, or none
SAVE_DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_TRAINED = ("unet", "text_encoder", "text_encoder_2")
# the slots hako-mikan's LoRA Block Weight writes in its 17-value (SD) and 12-value (SDXL) lists; sd-scripts'
# svd_merge_lora reads them the same way, the other slots keeping weight 1
_LBW17 = ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID", *(f"OUT{i:02d}" for i in range(3, 12)))
_LBW12 = ("BASE", "IN04", "IN05", "IN07", "IN08", "MID", *(f"OUT{i:02d}" for i in range(6)))


def checkpoint_name_map(shapes: Mapping[str, Sequence[int]], arch: ArchInfo,
                        path: Optional[str | os.PathLike] = None, conv: bool = True) -> LoraNameMap:
    """kohya LoRA name -> layer (original key, rows, shape) for a checkpoint, from its header alone.

    The U-Net and text encoders are built on the meta device (no memory) from the shapes, with
    the .yaml beside `path` for head counts, and walked as sd-scripts walks them (with `conv`, the LoCon
    layers of ResNet and up/down-sampling blocks too).
    """
    from ..models.hints import ModelHints
    from ..models.loader import load_checkpoint

    source = source_from_shapes({k: tuple(v) for k, v in shapes.items()})
    source.path = Path(path) if path is not None else None
    components = [c for c in _TRAINED if c in arch.components]
    model = load_checkpoint(source, components=components, hints=ModelHints(prediction_type="epsilon"))
    return LoraNameMap(lora_targets(model.modules, arch.family, conv=conv))


def target_shape(t: LoraTarget) -> tuple[int, ...]:
    """The weight shape a LoRA module of this layer updates (q, k or v rows alone for a fused in_proj)."""
    return (t.out_features, t.in_features, *(t.kernel_size or ()))


def parse_weighted(spec: str, default: float = 1.0) -> tuple[str, float]:
    """`path[:number]` -> (path, number); a colon not followed by a number stays in the path (C:\\...)."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            value = float(tail)
        except ValueError:
            return spec, default
        if not math.isfinite(value):
            raise SdtuneError(f"{spec}: the strength after ':' must be a finite number")
        return head, value
    return spec, default


def block_weights(blocks: Blocks, family: str, field: str) -> Optional[dict[str, float]]:
    """{slot: weight} from a preset or LBW values: 26 (SD) / 20-21 (SDXL) as merge's block weights, or the
    LoRA Block Weight extension's 17 (SD) / 12 (SDXL) lists, unlisted slots keeping 1."""
    if blocks is None or isinstance(blocks, str):
        return resolve_blocks(blocks, family, field)
    values = [float(v) for v in blocks]
    layout = layout_for(family)
    short = _LBW12 if layout == "sdxl" else _LBW17
    if len(values) != len(short):
        return resolve_blocks(values, family, field)
    slots = SDXL_SLOTS if layout == "sdxl" else SD_SLOTS
    weights = {s: 1.0 for s in slots}
    weights.update(zip(short, values))
    resolve_blocks([weights[s] for s in slots], family, field)  # the same range checks
    return weights


def target_slot(t: LoraTarget, family: str) -> str:
    """The block-weight slot of a layer: BASE for text encoders, else its U-Net block."""
    if t.component != "unet":
        return "BASE"
    slot = unet_slot(t.original_key, layout_for(family))
    assert slot is not None
    return slot


def check_output(output: str | os.PathLike, inputs: Sequence[str | os.PathLike], overwrite: bool) -> Path:
    """The output path, refused when it is not .safetensors, is an input, or exists without `overwrite`."""
    out = Path(output)
    if out.suffix.lower() != ".safetensors":
        raise SdtuneError(f"output: {out} must end in .safetensors (sdtune writes safetensors only)")
    resolved = out.resolve()
    for p in inputs:
        if Path(p).resolve() == resolved:
            raise SdtuneError(f"output: {out} is also an input; the tools never overwrite their inputs, "
                              f"choose another output name")
    if out.exists() and not overwrite:
        raise SdtuneError(f"output: {out} already exists; choose another name or pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise SdtuneError(f"output: folder {out.parent} does not exist")
    return out


def base_model_version(family: str, v_pred: bool = False) -> str:
    """sd-scripts' ss_base_model_version of a model family."""
    if family.startswith("sdxl"):
        return "sdxl_base_v1-0"
    return ("sd_v2" if family == "sd2" else "sd_v1") + ("_v" if v_pred else "")


def minimal_metadata(base_version: str, dim: object, alpha: object, output: Path,
                     network_args: Optional[Mapping[str, object]] = None, comment: Optional[str] = None
                     ) -> dict[str, str]:
    """sd-scripts' `build_minimum_network_metadata` (ss_*) plus a ModelSpec title, for a LoRA written by a tool."""
    sdxl = base_version.startswith("sdxl")
    v2 = base_version.startswith("sd_v2")
    arch = ("stable-diffusion-xl-v1-base" if sdxl else
            ("stable-diffusion-v2-768-v" if base_version.endswith("_v") else "stable-diffusion-v2-512") if v2
            else "stable-diffusion-v1")
    meta = {"ss_v2": str(v2), "ss_base_model_version": base_version, "ss_network_module": "networks.lora",
            "ss_network_dim": str(dim), "ss_network_alpha": str(alpha), "ss_output_name": output.stem,
            "modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": f"{arch}/lora",
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if sdxl else "diffusers",
            "modelspec.title": output.stem}
    if network_args:
        meta["ss_network_args"] = json.dumps({k: str(v) for k, v in network_args.items()})
    if comment:
        meta["ss_training_comment"] = comment
    return meta


def write_lora(tensors: Mapping[str, torch.Tensor], output: Path, metadata: Mapping[str, str],
               dtype: Optional[torch.dtype] = None) -> Path:
    """Cast the LoRA tensors (alpha kept fp32 unless `dtype` holds it exactly), add sshs_* hashes, write atomically."""
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        t = t.detach().cpu()
        if dtype is not None and t.is_floating_point():
            cast = t.to(dtype)
            if key.endswith(".alpha") and not torch.equal(cast.float(), t.float()):
                cast = t.float()
            t = cast
        out[key] = t.contiguous()
    meta = {k: v for k, v in metadata.items() if not k.startswith("sshs_")}
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = precalculate_hashes(out, meta)
    return save_safetensors(out, output, meta)
