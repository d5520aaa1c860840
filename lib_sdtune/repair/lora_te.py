"""LoRA/LyCORIS TE surgery: strip the text-encoder modules, or scale their ΔW, and scale U-Net blocks (LBW).

A module's ΔW is linear in one factor per algorithm (LoRA/LoCon `lora_up`, LoHa `hada_w1_a`, LoKr
`lokr_w1` or `lokr_w1_a`, full `diff`/`diff_b`), so multiplying that factor by X multiplies ΔW by X
and `alpha` stays as it was (tools that show alpha/rank keep showing the trained value). DoRA is
refused: its update is renormalised against the base weight, so no factor scales it. The result is a
new file with sd-scripts' `sshs_*` hashes recomputed; the input is never written.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import __version__
from ..errors import SdtuneError
from ..io.hashes import file_sha256
from ..merge.lora_common import block_weights, check_output, write_lora
from ..merge.lora_delta import LoraModuleParts, group_modules
from ..networks.blocks import NUM_BLOCKS, block_index
from ..networks.kohya_file import load_lora
from ..networks.lora_info import inspect_lora, lora_family
from .config import LoraTeConfig, check_number, check_te_choice

Progress = Callable[[int, int, str], None]
RECIPE_KEY = "sdtune_repair_recipe"
# the tensor(s) ΔW is linear in, per algorithm (the first present of each group is scaled)
_FACTORS: dict[str, tuple[tuple[str, ...], ...]] = {
    "lora": (("lora_up.weight",),), "lora_tucker": (("lora_up.weight",),), "loha": (("hada_w1_a",),),
    "lokr": (("lokr_w1", "lokr_w1_a"),), "full": (("diff",), ("diff_b",)),
}


@dataclass
class LoraTeResult:
    """What a LoRA TE repair wrote."""

    output: Path
    family: str
    te_modules: int  # text-encoder modules in the input
    stripped: int
    scaled: dict[str, float] = field(default_factory=dict)  # module -> factor (only those changed)
    unplaced: list[str] = field(default_factory=list)  # U-Net modules of no LBW block, left as they were
    seconds: float = 0.0

    def to_dict(self) -> dict:
        """JSON-ready summary (`output` first, as the CLI contract asks)."""
        return {"output": str(self.output), "family": self.family, "te_modules": self.te_modules,
                "stripped": self.stripped, "scaled": len(self.scaled), "unplaced": self.unplaced,
                "seconds": round(self.seconds, 3)}


def te_of(module: str) -> Optional[str]:
    """"1" or "2" for a kohya text-encoder module name (lora_te_ / lora_te1_ is 1, lora_te2_ is 2), else None."""
    if module.startswith("lora_te2_"):
        return "2"
    if module.startswith(("lora_te_", "lora_te1_")):
        return "1"
    return None


def lbw_slot(module: str, family: str) -> Optional[str]:
    """The LBW/merge block slot (IN00..OUT11) of a U-Net module name, from sd-scripts' block numbering."""
    i = block_index(module, family)
    if i < 0:
        return None
    if family == "sdxl":  # 0 time/label embedding, 1-9 input, 10-12 middle, 13-21 output, 22 out
        return "IN00" if i <= 1 else f"IN{i - 1:02d}" if i <= 9 else "MID" if i <= 12 else \
            f"OUT{min(i - 13, 8):02d}"
    if i < NUM_BLOCKS:  # SD: 1-11 input blocks, 12 middle, 13-24 output
        return f"IN{i:02d}"
    return "MID" if i == NUM_BLOCKS else f"OUT{i - NUM_BLOCKS - 1:02d}"


def scale_module(module: LoraModuleParts, factor: float) -> dict[str, torch.Tensor]:
    """The module's tensors with ΔW multiplied by `factor` (one factor tensor scaled, in fp32, stored as it was)."""
    if module.dora:
        raise SdtuneError(f"{module.file}: module {module.name!r} is DoRA, whose update is renormalised against the "
                          f"base weight, so it cannot be scaled in the file; bake it with a strength instead "
                          f"(`lora bake CKPT LORA:STRENGTH`)")
    parts = dict(module.parts)
    for group in _FACTORS[module.algorithm]:
        key = next((k for k in group if k in parts), None)
        if key is not None:
            t = parts[key]
            parts[key] = (t.float() * factor).to(t.dtype)
    return parts


def _validate(config: LoraTeConfig) -> Path:
    """Check the fields; returns the output path."""
    check_te_choice(config.te)
    if config.strip and config.scale is not None:
        raise SdtuneError("strip and scale: give one (--strip removes the text encoder part, --scale X multiplies it)")
    if not config.strip and config.scale is None and config.unet_blocks is None:
        raise SdtuneError("nothing to do: give --strip, --scale X or --unet-blocks")
    if config.scale is not None:
        check_number("scale", config.scale)
    if not Path(config.lora).is_file():
        raise SdtuneError(f"lora: {config.lora} does not exist (or is not a file)")
    return check_output(config.output, [config.lora], config.overwrite)


def repair_lora_te(config: LoraTeConfig, progress: Optional[Progress] = None,
                   cancelled: Optional[Callable[[], bool]] = None) -> LoraTeResult:
    """Write a new LoRA with its TE part stripped or scaled and its U-Net blocks scaled; see LoraTeConfig."""
    started = time.perf_counter()
    out = _validate(config)
    info = inspect_lora(config.lora)
    family = lora_family(info.base_model_version) or ""
    if config.te != "both" and family != "sdxl":
        raise SdtuneError(f"te: --te {config.te} picks one of SDXL's text encoders, but {config.lora} is for "
                          f"{info.base_model_version or 'an unknown base model'}; leave --te out")
    weights = None
    if config.unet_blocks is not None:
        if not family:
            raise SdtuneError(f"unet_blocks: the base model of {config.lora} is unknown (no ss_base_model_version), "
                              f"so its U-Net blocks cannot be numbered")
        weights = block_weights(config.unet_blocks, family, "unet_blocks")
    state, metadata = load_lora(config.lora)
    modules = group_modules(config.lora, state)
    te_factor = (1.0 if config.scale is None else config.scale) * (weights["BASE"] if weights else 1.0)
    chosen = {"1", "2"} if config.te == "both" else {config.te}
    te_names = [n for n in modules if te_of(n) is not None]
    if not te_names and (config.strip or config.scale is not None):
        raise SdtuneError(f"lora: {config.lora} has no text-encoder modules (lora_te*); nothing to strip or scale")
    result = LoraTeResult(out, family, len(te_names), 0)
    tensors: dict[str, torch.Tensor] = {}
    for n, (name, module) in enumerate(modules.items(), 1):
        if cancelled is not None and cancelled():
            raise SdtuneError("lora-te cancelled; nothing was written")
        te = te_of(name)
        if te is not None and te in chosen and config.strip:
            result.stripped += 1
            continue
        factor = 1.0
        if te is not None:
            factor = te_factor if te in chosen else 1.0
        elif weights is not None:
            slot = lbw_slot(name, family)
            if slot is None:
                result.unplaced.append(name)
            else:
                factor = weights[slot]
        parts = module.parts if factor == 1.0 else scale_module(module, factor)
        if factor != 1.0:
            result.scaled[name] = factor
        tensors.update({f"{name}.{suffix}": t for suffix, t in parts.items()})
        if progress is not None:
            progress(n, len(modules), name)
    tensors = {k: tensors[k] for k in state if k in tensors}  # the input's key order
    recipe = {"type": "sdtune-repair", "version": 1, "sdtune": __version__, "tool": "lora-te",
              "lora": {"path": str(Path(config.lora).resolve()), "name": Path(config.lora).name,
                       "sha256": file_sha256(config.lora)},
              "strip": config.strip, "scale": config.scale, "te": config.te,
              "unet_blocks": config.unet_blocks if isinstance(config.unet_blocks, (str, type(None)))
              else [float(v) for v in config.unet_blocks]}
    meta = {k: v for k, v in metadata.items() if not k.startswith("modelspec.hash")}
    meta[RECIPE_KEY] = json.dumps(recipe, sort_keys=True, separators=(",", ":"))
    if "ss_network_train_unet_only" in meta and not any(te_of(k.split(".", 1)[0]) for k in tensors):
        meta["ss_network_train_unet_only"] = "True"  # what the file now is (A1111 and trainers read this)
    write_lora(tensors, out, meta)
    result.seconds = time.perf_counter() - started
    return result
