"""Typed settings of the repair tools, checked field by field before any file is opened."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from ..errors import SdtuneError

TE_CHOICES = ("1", "2", "both")  # SDXL: CLIP-L (TE1), OpenCLIP bigG (TE2), or both
POSITION_IDS_MODES = ("reset", "keep")
Blocks = Union[str, Sequence[float], None]


@dataclass(frozen=True)
class TeOverrideConfig:
    """`model` with the text encoder(s) of `donor`; every other tensor is copied bit for bit.

    `te` picks SDXL's encoders ("1", "2" or "both"); `position_ids` is "reset" (arange(77), int64,
    the default) or "keep" (the model's exactly).
    """

    model: str
    donor: str
    output: str
    te: str = "both"
    position_ids: str = "reset"
    overwrite: bool = False


@dataclass(frozen=True)
class TeBlendConfig:
    """TE = (1-alpha)*model.TE + alpha*donor.TE (in fp32, stored in the model's dtype); the rest bit for bit.

    `layers`: optional per-layer alphas, one list per encoder, matched by length (12 for CLIP-L,
    23/24 for SD2's OpenCLIP-H, 32 for SDXL's bigG); keys outside the layers use `alpha`.
    position_ids is never blended: "keep" (the model's, default) or "reset".
    """

    model: str
    donor: str
    output: str
    alpha: float = 0.5
    layers: tuple[tuple[float, ...], ...] = ()
    te: str = "both"
    position_ids: str = "keep"
    overwrite: bool = False


@dataclass(frozen=True)
class LoraTeConfig:
    """LoRA/LyCORIS TE surgery into a new file: `strip` the TE modules, or multiply their ΔW by `scale`;
    `unet_blocks` (LBW values or a preset) multiplies each U-Net block's ΔW. Alpha is never changed."""

    lora: str
    output: str
    strip: bool = False
    scale: Optional[float] = None
    unet_blocks: Blocks = None
    te: str = "both"
    overwrite: bool = False


def check_number(name: str, value: object, lo: float = -10.0, hi: float = 10.0) -> float:
    """A finite number within lo..hi; the message names the field."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SdtuneError(f"{name}: must be a finite number, got {value!r}")
    if not lo <= value <= hi:
        raise SdtuneError(f"{name}: {value} is outside {lo:g}..{hi:g}")
    return float(value)


def check_te_choice(te: str) -> None:
    """`te` must be 1, 2 or both."""
    if te not in TE_CHOICES:
        raise SdtuneError(f"te: {te!r}; choose 1 (CLIP-L), 2 (OpenCLIP bigG) or both (SDXL only)")


def check_position_ids(mode: str) -> None:
    """`position_ids` must be reset or keep."""
    if mode not in POSITION_IDS_MODES:
        raise SdtuneError(f"position_ids: {mode!r}; choose reset (arange, int64) or keep (the model's)")
