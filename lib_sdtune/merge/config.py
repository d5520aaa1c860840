"""The typed configuration of a checkpoint merge, checked field by field before any file is opened."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from ..errors import SdtuneError
from .methods import METHODS, get_method
from .sources import InputHashes

OUTPUT_DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
POSITION_IDS_MODES = ("keep", "reset")
RATIO_RANGE = (-1.0, 2.0)  # extrapolation a little past A and B is allowed; 50 instead of 0.5 is a typo

Blocks = Union[str, Sequence[float], None]  # a preset name, explicit values, or none


@dataclass(frozen=True)
class MergeConfig:
    """Everything a checkpoint merge needs; the recipe stored in the output is this plus the input hashes.

    Ratios: `alpha` everywhere unless a component ratio (`unet_alpha`, `te_alpha`, `vae_alpha`) or
    U-Net block weights (`blocks`: 26 values BASE, IN00-IN11, MID, OUT00-OUT11 for SD1/SD2; 20 for SDXL,
    or 21 with a trailing VAE value; or a preset name) say otherwise. `beta` is the second ratio of
    three-model methods (its meaning is per method, see `methods.METHODS`); `blocks_beta` likewise.
    """

    inputs: tuple[str, ...]
    output: str
    method: str = "weighted_sum"
    alpha: float = 0.5
    beta: Optional[float] = None  # None: the method's default
    unet_alpha: Optional[float] = None
    te_alpha: Optional[float] = None
    vae_alpha: Optional[float] = None
    blocks: Blocks = None
    blocks_beta: Blocks = None
    seed: int = 0
    dtype: str = "fp16"
    vae: Optional[str] = None  # a VAE file to bake in
    prune_ema: bool = False
    prune_schedule: bool = False
    position_ids: str = "keep"  # keep (A's, exact) | reset (arange, int64)
    in_memory: bool = False  # load every input whole first (the path .ckpt inputs always take)
    # set when re-running a recipe: the hashes each input (and the VAE) must have
    expected_inputs: Optional[tuple[InputHashes, ...]] = field(default=None, compare=False)
    expected_vae: Optional[InputHashes] = field(default=None, compare=False)

    @property
    def effective_beta(self) -> Optional[float]:
        """`beta`, or the method's default when it takes one and none was given."""
        method = get_method(self.method)
        if method.beta is None:
            return None
        return method.beta.default if self.beta is None else self.beta


def _check_ratio(name: str, value: object) -> None:
    """A ratio must be a finite number in RATIO_RANGE; the message names the field."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SdtuneError(f"{name}: must be a number, got {value!r}")
    lo, hi = RATIO_RANGE
    if not math.isfinite(value) or not lo <= value <= hi:
        raise SdtuneError(f"{name}: {value} is outside {lo}..{hi} (0 keeps model A, 1 takes model B)")


def validate_config(config: MergeConfig) -> None:
    """Check every field that does not need the input files; raises SdtuneError naming the field."""
    if config.method not in METHODS:
        raise SdtuneError(f"method: unknown merge method {config.method!r}; choose one of {', '.join(METHODS)}")
    method = METHODS[config.method]
    if len(config.inputs) != method.models:
        names = "A, B and C" if method.models == 3 else "A and B"
        raise SdtuneError(f"inputs: {config.method} merges {method.models} models ({names}); "
                          f"{len(config.inputs)} given")
    for name in ("alpha", "unet_alpha", "te_alpha", "vae_alpha"):
        value = getattr(config, name)
        if value is not None:
            _check_ratio(name, value)
    if config.beta is not None:
        if method.beta is None:
            raise SdtuneError(f"beta: {config.method} takes no beta (only alpha)")
        lo, hi = method.beta.low, method.beta.high
        _check_ratio("beta", config.beta)
        if not lo <= config.beta <= hi:
            raise SdtuneError(f"beta: {config.method} needs {method.beta.meaning} in {lo}..{hi}, got {config.beta}")
    if config.blocks_beta is not None and method.beta is None:
        raise SdtuneError(f"blocks_beta: {config.method} takes no beta")
    if config.dtype not in OUTPUT_DTYPES:
        raise SdtuneError(f"dtype: {config.dtype!r} is not an output dtype; choose one of {', '.join(OUTPUT_DTYPES)}")
    if config.position_ids not in POSITION_IDS_MODES:
        raise SdtuneError(f"position_ids: {config.position_ids!r}; choose keep or reset")
    if isinstance(config.seed, bool) or not isinstance(config.seed, int) or not 0 <= config.seed < 2**63:
        raise SdtuneError(f"seed: must be a non-negative integer, got {config.seed!r}")
    out = Path(config.output)
    if out.suffix.lower() != ".safetensors":
        raise SdtuneError(f"output: {out} must end in .safetensors (merges are written as safetensors only)")
    resolved = out.resolve()
    for role, path in zip("ABC", config.inputs):
        if Path(path).resolve() == resolved:
            raise SdtuneError(f"output: {out} is input {role}; a merge never overwrites its inputs, "
                              f"choose another output name")
    if config.vae is not None and Path(config.vae).resolve() == resolved:
        raise SdtuneError(f"output: {out} is the VAE file; choose another output name")
