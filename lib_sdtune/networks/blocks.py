"""U-Net blocks of a LoRA name and sd-scripts' per-block ranks and learning-rate weights.

sd-scripts (`networks/lora.py` `get_block_index`, `get_block_dims_and_alphas`, `get_block_lr_weight`)
numbers SD1.x/SD2.x U-Net LoRA modules 0-24 (0 unused, 1-12 down, 12 mid... see `block_index`) and SDXL
ones 0-22 (time embedding, 9 input, 3 middle, 9 output, out). `block_dims`, `block_alphas`,
`conv_block_dims`, `conv_block_alphas` give one value per block; `down/mid/up_lr_weight` multiply the
U-Net LR per block, and a block whose weight is 0 gets no module at all. The same rules are kept here so
that a kohya config trains the same modules.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from ..errors import SdtuneError

__all__ = ["NUM_BLOCKS", "BlockPlan", "block_count", "block_index", "block_lr_weights", "plan_blocks"]

NUM_BLOCKS = 12  # SD1.x/SD2.x down or up blocks, counted as sd-scripts does (3 per diffusers block)
NUM_MID_BLOCKS = 1
SDXL_NUM_BLOCKS = 9
SDXL_NUM_MID_BLOCKS = 3
_RE_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")
_CURVES = ("cosine", "sine", "linear", "reverse_linear", "zeros")

FloatList = Union[str, Sequence[float], None]


def _is_sdxl(family: str) -> bool:
    return family.startswith("sdxl")


def block_count(family: str) -> int:
    """How many values `block_dims` and friends take: 25 for SD1.x/SD2.x, 23 for SDXL."""
    if _is_sdxl(family):
        return 1 + SDXL_NUM_BLOCKS * 2 + SDXL_NUM_MID_BLOCKS + 1
    return NUM_BLOCKS * 2 + NUM_MID_BLOCKS


def block_index(lora_name: str, family: str) -> int:
    """sd-scripts' block of a U-Net LoRA name (-1 for text-encoder or unknown names)."""
    if not _is_sdxl(family):
        m = _RE_UPDOWN.search(lora_name)
        if m:
            side, i, kind, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
            idx = 3 * i + (2 if kind in ("upsamplers", "downsamplers") else j)
            return 1 + idx if side == "down" else NUM_BLOCKS + 1 + idx
        return NUM_BLOCKS if "mid_block_" in lora_name else -1
    if not lora_name.startswith("lora_unet_"):
        return -1
    name = lora_name[len("lora_unet_"):]
    if name.startswith(("time_embed_", "label_emb_")):
        return 0
    for prefix, first in (("input_blocks_", 1), ("middle_block_", 10), ("output_blocks_", 13)):
        if name.startswith(prefix):
            return first + int(name.split("_")[2])
    return 22 if name.startswith("out_") else -1


def _values(field: str, value: Union[str, Sequence[float]], count: int, cast: type) -> list:
    """A comma-separated string or a list -> `count` numbers, or an error naming the field."""
    items = [s.strip() for s in value.split(",")] if isinstance(value, str) else list(value)
    try:
        out = [cast(float(v)) if cast is int else float(v) for v in items]
    except (TypeError, ValueError) as e:
        raise SdtuneError(f"{field}: {value!r} is not a list of numbers ({e})") from None
    if len(out) != count:
        raise SdtuneError(f"{field} needs {count} values for this model (one per U-Net block), got {len(out)}")
    return out


def _curve(field: str, spec: str, length: int) -> list[float]:
    """sd-scripts' named LR-weight curves `cosine|sine|linear|reverse_linear|zeros[+base]`."""
    name, _, base_s = spec.partition("+")
    base = float(base_s) if base_s else 0.0
    steps = range(length)
    if name == "cosine":
        return [math.sin(math.pi * (i / (length - 1)) / 2) + base for i in reversed(steps)]
    if name == "sine":
        return [math.sin(math.pi * (i / (length - 1)) / 2) + base for i in steps]
    if name == "linear":
        return [i / (length - 1) + base for i in steps]
    if name == "reverse_linear":
        return [i / (length - 1) + base for i in reversed(steps)]
    if name == "zeros":
        return [base] * length
    raise SdtuneError(f"{field}: unknown curve {spec!r} (one of {', '.join(_CURVES)}, optionally '+base')")


def _lr_list(field: str, value: FloatList, length: int, allow_curve: bool) -> Optional[list[float]]:
    """One of down/mid/up_lr_weight: a curve name, a list (empty items 0), padded with 1 or cut to `length`."""
    if value is None:
        return None
    if isinstance(value, str) and allow_curve and "," not in value and value.split("+")[0] in _CURVES:
        out = _curve(field, value, length)
    else:
        items = value.split(",") if isinstance(value, str) else list(value)
        try:
            out = [float(s) if str(s).strip() else 0.0 for s in items]
        except ValueError as e:
            raise SdtuneError(f"{field}: {value!r} is not a list of numbers or a curve name ({e})") from None
    return (out + [1.0] * length)[:length]


def block_lr_weights(family: str, down: FloatList = None, mid: FloatList = None, up: FloatList = None,
                     zero_threshold: float = 0.0) -> Optional[list[float]]:
    """Per-block U-Net LR multipliers (`block_count` values), or None when none of the three is given.

    Lists shorter than a side are filled with 1, longer ones cut (sd-scripts warns); weights at or below
    `zero_threshold` become 0, which removes the block's modules.
    """
    if down is None and mid is None and up is None:
        return None
    side, mid_len = (SDXL_NUM_BLOCKS, SDXL_NUM_MID_BLOCKS) if _is_sdxl(family) else (NUM_BLOCKS, NUM_MID_BLOCKS)
    lists = [_lr_list("down_lr_weight", down, side, True), _lr_list("mid_lr_weight", mid, mid_len, False),
             _lr_list("up_lr_weight", up, side, True)]
    weights: list[float] = []
    for values, length in zip(lists, (side, mid_len, side)):
        weights += [1.0] * length if values is None else [w if w > zero_threshold else 0.0 for w in values]
    return [1.0] + weights + [1.0] if _is_sdxl(family) else weights


@dataclass(frozen=True)
class BlockPlan:
    """Per-block (rank, alpha) for Linear/1x1 layers and for 3x3 convs, and per-block LR weights."""

    dims: list[int]
    alphas: list[float]
    conv_dims: Optional[list[int]]
    conv_alphas: Optional[list[float]]
    lr_weights: Optional[list[float]]

    def rank_alpha(self, lora_name: str, family: str, conv3x3: bool) -> tuple[int, float]:
        """(rank, alpha) of one U-Net module; rank 0 means the module is not created."""
        i = block_index(lora_name, family)
        if i < 0:
            raise SdtuneError(f"{lora_name}: not a U-Net LoRA name of a {family} model (no block)")
        if not conv3x3:
            return self.dims[i], self.alphas[i]
        if self.conv_dims is None or self.conv_alphas is None:
            return 0, 0.0
        return self.conv_dims[i], self.conv_alphas[i]


def plan_blocks(family: str, rank: int, alpha: float, conv_rank: Optional[int], conv_alpha: float,
                block_dims: FloatList = None, block_alphas: FloatList = None, conv_block_dims: FloatList = None,
                conv_block_alphas: FloatList = None, lr_weights: Optional[list[float]] = None) -> Optional[BlockPlan]:
    """sd-scripts' per-block ranks: None unless block dims or LR weights are given (then every block is
    planned, defaulting to the network's rank/alpha, and blocks with LR weight 0 get rank 0)."""
    if block_dims is None and lr_weights is None:
        if block_alphas is not None or conv_block_dims is not None or conv_block_alphas is not None:
            raise SdtuneError("block_alphas/conv_block_dims/conv_block_alphas need block_dims "
                              "(or an LR weight per block), as in sd-scripts")
        return None
    n = block_count(family)
    dims = _values("block_dims", block_dims, n, int) if block_dims is not None else [rank] * n
    alphas = _values("block_alphas", block_alphas, n, float) if block_alphas is not None else [alpha] * n
    conv_dims: Optional[list[int]] = None
    conv_alphas: Optional[list[float]] = None
    if conv_block_dims is not None:
        conv_dims = _values("conv_block_dims", conv_block_dims, n, int)
        conv_alphas = (_values("conv_block_alphas", conv_block_alphas, n, float) if conv_block_alphas is not None
                       else [conv_alpha] * n)
    elif conv_rank:
        conv_dims, conv_alphas = [conv_rank] * n, [conv_alpha] * n
    if lr_weights is not None:
        for i, w in enumerate(lr_weights):
            if w == 0:
                dims[i] = 0
                if conv_dims is not None:
                    conv_dims[i] = 0
    return BlockPlan(dims, alphas, conv_dims, conv_alphas, lr_weights)
