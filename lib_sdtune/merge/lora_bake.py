"""Bake LoRA/LyCORIS files into a checkpoint, streamed: W += Σ strength·ΔW on each targeted weight.

The checkpoint is read one tensor at a time and written by the streaming atomic writer; tensors no
LoRA touches are written as read (same bytes unless a `dtype` is asked for). LoRA names are mapped to
original keys by sdtune's name map (OpenCLIP's fused q/k/v by rows), so SD1, SD2 and SDXL (both text
encoders) bake the same way; U-Net names in the other layout hosts accept (LDM for SD1/SD2, diffusers for SDXL)
are understood too. Every module of a LoRA that matches no layer is reported, never dropped
silently; a LoRA with no matching module at all, or made for another architecture, is refused.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch

from ..errors import SdtuneError
from ..io.checkpoint import open_checkpoint
from ..io.detect import UNET_PREFIX, ArchInfo, detect_architecture
from ..io.safetensors_io import SafetensorsWriter, st_dtype_name
from ..networks.kohya_file import load_lora
from ..networks.lora_info import check_lora_fits, inspect_lora
from ..networks.naming import LoraTarget
from .buffers import BufferPool
from .lora_common import SAVE_DTYPES, Blocks, block_weights, check_output, checkpoint_name_map, target_slot
from .lora_delta import LoraModuleParts, group_modules
from .pipeline import run_pipeline
from .plan import SCHEDULE_KEY
from .recipe import RECIPE_KEY

__all__ = ["LoraInput", "BakeConfig", "BakeResult", "bake_loras", "BAKED_KEY"]

log = logging.getLogger(__name__)
Progress = Callable[[int, int, str], None]
BAKED_KEY = "sdtune_baked_loras"


@dataclass(frozen=True)
class LoraInput:
    """One LoRA to bake: its file, strength (A1111's multiplier) and optional block weights (LBW)."""

    path: str
    strength: float = 1.0
    blocks: Blocks = None


@dataclass(frozen=True)
class BakeConfig:
    """A checkpoint, the LoRAs to bake into it, and the output (.safetensors)."""

    checkpoint: str
    loras: tuple[LoraInput, ...]
    output: str
    dtype: Optional[str] = None  # fp16 | bf16 | fp32 for every float weight; None keeps each tensor's dtype
    overwrite: bool = False


@dataclass
class BakeResult:
    """What a bake wrote: per LoRA the modules applied and those matching no layer."""

    output: Path
    architecture: str
    tensors: int
    changed: int  # checkpoint tensors that received a ΔW
    applied: dict[str, int]  # LoRA file -> modules baked
    unmatched: dict[str, list[str]] = field(default_factory=dict)  # LoRA file -> module names matching nothing
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"output": str(self.output), "architecture": self.architecture, "tensors": self.tensors,
                "changed": self.changed, "applied": self.applied, "unmatched": self.unmatched,
                "seconds": round(self.seconds, 3)}


@dataclass(frozen=True)
class _Apply:
    """One LoRA module landing on one checkpoint tensor."""

    target: LoraTarget
    module: LoraModuleParts
    strength: float


def _validate(config: BakeConfig) -> Path:
    if not config.loras:
        raise SdtuneError("loras: give at least one LoRA file to bake")
    for i, lora in enumerate(config.loras):
        if not math.isfinite(lora.strength):
            raise SdtuneError(f"loras[{i}] ({lora.path}): strength must be a finite number, got {lora.strength}")
        if not Path(lora.path).is_file():
            raise SdtuneError(f"loras[{i}]: {lora.path} does not exist (or is not a file)")
    if config.dtype is not None and config.dtype not in SAVE_DTYPES:
        raise SdtuneError(f"dtype: {config.dtype!r}; choose one of {', '.join(SAVE_DTYPES)} (or none to keep)")
    if not Path(config.checkpoint).is_file():
        raise SdtuneError(f"checkpoint: {config.checkpoint} does not exist (or is not a file)")
    return check_output(config.output, [config.checkpoint, *(lo.path for lo in config.loras)], config.overwrite)


def _plan(config: BakeConfig, arch: ArchInfo, shapes: dict
          ) -> tuple[dict[str, list[_Apply]], dict[str, list[_Apply]], dict[str, int], dict[str, list[str]], list]:
    """Which LoRA modules land on which checkpoint keys (weights, and biases of full diffs)."""
    family = arch.family
    names = _with_aliases(checkpoint_name_map(shapes, arch, config.checkpoint))
    weights: dict[str, list[_Apply]] = {}
    biases: dict[str, list[_Apply]] = {}
    applied: dict[str, int] = {}
    unmatched: dict[str, list[str]] = {}
    record = []
    for i, lora in enumerate(config.loras):
        info = inspect_lora(lora.path)
        check_lora_fits(info, family)
        slots = block_weights(lora.blocks, family, f"loras[{i}].blocks")
        state, _ = load_lora(lora.path)
        modules = group_modules(lora.path, state)
        missing = sorted(n for n in modules if n not in names)
        if len(missing) == len(modules):
            raise SdtuneError(f"{lora.path}: none of its {len(modules)} modules matches a layer of the checkpoint "
                              f"(first: {missing[0]}); is it for another model, or named in another layout?")
        for name, module in modules.items():
            if name not in names:
                continue
            t = names[name]
            strength = lora.strength * (slots[target_slot(t, family)] if slots else 1.0)
            weights.setdefault(t.original_key, []).append(_Apply(t, module, strength))
            if "diff_b" in module.parts:
                bias_key = t.original_key.rsplit("weight", 1)[0] + "bias"
                if bias_key not in shapes:
                    raise SdtuneError(f"{lora.path}: {name}.diff_b updates a bias, but the checkpoint has no "
                                      f"{bias_key}")
                biases.setdefault(bias_key, []).append(_Apply(t, module, strength))
        applied[lora.path] = len(modules) - len(missing)
        if missing:
            unmatched[lora.path] = missing
            log.warning("%s: %d of %d modules match no layer of the checkpoint and were not baked, e.g. %s",
                        lora.path, len(missing), len(modules), missing[0])
        record.append({"name": Path(lora.path).name, "sshs_model_hash": info.hashes["sshs_model_hash"],
                       "strength": lora.strength, "blocks": lora.blocks if lora.blocks is None or
                       isinstance(lora.blocks, str) else [float(v) for v in lora.blocks]})
    return weights, biases, applied, unmatched, record


def _with_aliases(names: Mapping[str, LoraTarget]) -> dict[str, LoraTarget]:
    """sd-scripts' names plus the other U-Net spelling hosts accept: LDM names for SD1/SD2 LoRAs
    (`lora_unet_input_blocks_1_1_proj_in`, older tools), diffusers names for SDXL ones (diffusers/peft converts)."""
    out = dict(names)
    for t in names.values():
        if t.component != "unet":
            continue
        ldm = "lora_unet_" + t.original_key[len(UNET_PREFIX):-len(".weight")].replace(".", "_")
        diffusers = "lora_unet_" + t.module_path.replace(".", "_")
        for alias in (ldm, diffusers):
            out.setdefault(alias, t)
    return out


def _rows(t: LoraTarget, tensor: torch.Tensor) -> torch.Tensor:
    """The part of a checkpoint tensor a target updates (q/k/v rows of a fused in_proj, else all)."""
    if t.original_rows is None:
        return tensor
    start, stop = t.original_rows
    return tensor[start:stop]


def _bake_tensor(key: str, tensor: torch.Tensor, weight_updates: list[_Apply], bias_updates: list[_Apply],
                 out_dtype: torch.dtype, pool: BufferPool) -> tuple[torch.Tensor, list[Optional[bytearray]]]:
    """W + Σ strength·ΔW (each ΔW against the input W, as hosts apply several LoRAs), cast to out_dtype.

    A plain LoRA is added in place by one fused multiply-add (strength and scale folded into `up`), so a
    large conv costs one pass over its weight; other algorithms build their ΔW first. Work and result
    tensors live in pooled buffers (returned for release once written): no page faults per tensor.
    """
    w, work = pool.empty(tuple(tensor.shape), torch.float32)
    w.copy_(tensor)
    base = w.clone() if any(u.module.dora for u in weight_updates) else w  # DoRA's ΔW depends on the input W
    for u in weight_updates:
        part = _rows(u.target, w)
        lr = u.module.low_rank()
        if lr is not None and lr.up.shape[0] == part.shape[0] and lr.down.shape[1] * part.shape[0] == part.numel():
            part.view(part.shape[0], -1).addmm_(lr.up * (lr.scale * u.strength), lr.down)
            continue
        before = _rows(u.target, base)
        delta = u.module.delta(before.reshape(_shape(u.target, before)), u.strength)
        part.add_(delta.reshape(part.shape))
    for u in bias_updates:
        part = _rows(u.target, w)
        db = u.module.delta_bias(u.strength)
        if db is None or db.numel() != part.numel():
            raise SdtuneError(f"{u.module.file}: {u.module.name}.diff_b does not fit {key} {list(part.shape)}")
        part.add_(db.reshape(part.shape))
    if out_dtype == torch.float32:
        return w, [work]
    out, buf = pool.empty(tuple(w.shape), out_dtype)
    return out.copy_(w), [work, buf]


def _shape(t: LoraTarget, part: torch.Tensor) -> tuple[int, ...]:
    """The layer's weight shape (a 1x1 conv LoRA on a linear weight and the reverse reshape freely)."""
    want = (t.out_features, t.in_features, *(t.kernel_size or ()))
    return want if math.prod(want) == part.numel() else tuple(part.shape)


def bake_loras(config: BakeConfig, progress: Optional[Progress] = None,
               cancelled: Optional[Callable[[], bool]] = None, *, threaded: bool = True) -> BakeResult:
    """Bake `config.loras` into `config.checkpoint`, writing `config.output`; see BakeConfig."""
    started = time.perf_counter()
    output = _validate(config)
    source = open_checkpoint(config.checkpoint)
    shapes = source.shapes()
    arch = detect_architecture(shapes, f"checkpoint ({config.checkpoint})")
    weights, biases, applied, unmatched, record = _plan(config, arch, shapes)
    force = SAVE_DTYPES[config.dtype] if config.dtype else None
    keys = list(source)

    def out_dtype(key: str) -> torch.dtype:
        dtype = source.dtype(key)
        if dtype is None:
            raise SdtuneError(f"{config.checkpoint}: tensor {key!r} has a dtype this torch cannot hold")
        keep = not dtype.is_floating_point or key.endswith("position_ids") or SCHEDULE_KEY.match(key)
        return dtype if force is None or keep else force

    specs = {k: (st_dtype_name(out_dtype(k)), shapes[k]) for k in keys}
    metadata = {k: v for k, v in source.metadata.items() if k != RECIPE_KEY}
    metadata[BAKED_KEY] = json.dumps({"checkpoint": Path(config.checkpoint).name, "loras": record},
                                     separators=(",", ":"))

    pool = BufferPool()

    def compute(key: str, tensor: torch.Tensor) -> tuple[torch.Tensor, list[Optional[bytearray]]]:
        if key in weights or key in biases:
            return _bake_tensor(key, tensor, weights.get(key, []), biases.get(key, []), out_dtype(key), pool)
        dtype = out_dtype(key)
        return (tensor if tensor.dtype == dtype else tensor.to(dtype)), []

    def on_done(n: int, key: str) -> None:
        if progress is not None:
            progress(n, len(keys), key)

    with SafetensorsWriter(output, specs, metadata) as writer:
        run_pipeline(keys, source.__getitem__, compute, lambda k, c: writer.write(k, c[0]), cancelled=cancelled,
                     on_done=on_done, after_write=lambda k, t, c: pool.release(c[1]), threaded=threaded)
    return BakeResult(output, arch.architecture, len(keys), len(set(weights) | set(biases)), applied, unmatched,
                      time.perf_counter() - started)
