"""U-Net block weights: the slot of every checkpoint key (one table), slot lists per layout, presets.

Layouts (supermerger's notation, shared with meh, bbc-mc MBW and sd-mecha):
- "sd" (SD1.x, SD2.x, and the SDXL refiner, whose U-Net also has 12 input/output blocks):
  26 slots BASE, IN00-IN11, MID, OUT00-OUT11.
- "sdxl": 20 slots BASE, IN00-IN08, MID, OUT00-OUT08, and optionally a 21st, VAE. A 26-value list is
  converted as supermerger does (IN09-IN11 and OUT09-OUT11 dropped).

Where the tools disagree, sdtune's rule: `time_embed` and `label_emb` belong to IN00 (supermerger, meh);
the final `out.` layers to the last OUT slot; BASE covers everything outside the U-Net: the text
encoder(s) and, unless a VAE slot is given, the VAE (as supermerger and bbc-mc do for SD1).
"""

from __future__ import annotations

import math
import re
from typing import Optional, Sequence

from ..errors import SdtuneError

SD_SLOTS: tuple[str, ...] = ("BASE", *(f"IN{i:02d}" for i in range(12)), "MID", *(f"OUT{i:02d}" for i in range(12)))
SDXL_SLOTS: tuple[str, ...] = ("BASE", *(f"IN{i:02d}" for i in range(9)), "MID", *(f"OUT{i:02d}" for i in range(9)))
SDXL_SLOTS_VAE: tuple[str, ...] = (*SDXL_SLOTS, "VAE")

# The one table: U-Net key pattern -> slot. "{n}" is the block number; "{last}" the layout's last OUT slot.
UNET_SLOT_RULES: tuple[tuple[re.Pattern, str], ...] = (
    (re.compile(r"^model\.diffusion_model\.(?:time_embed|label_emb)\."), "IN00"),
    (re.compile(r"^model\.diffusion_model\.input_blocks\.(\d+)\."), "IN{n:02d}"),
    (re.compile(r"^model\.diffusion_model\.middle_block\."), "MID"),
    (re.compile(r"^model\.diffusion_model\.output_blocks\.(\d+)\."), "OUT{n:02d}"),
    (re.compile(r"^model\.diffusion_model\.out\."), "{last}"),
)


def layout_for(family: str) -> str:
    """The block layout of a family: "sdxl" for SDXL base, "sd" for SD1, SD2 and the SDXL refiner."""
    return "sdxl" if family == "sdxl" else "sd"


def slots_for(layout: str) -> tuple[str, ...]:
    """The slot names of a layout (without the optional SDXL VAE slot)."""
    return SDXL_SLOTS if layout == "sdxl" else SD_SLOTS


def unet_slot(key: str, layout: str) -> Optional[str]:
    """The slot of a U-Net key (`model.diffusion_model.*`), or None for keys outside the U-Net."""
    last = slots_for(layout)[-1]
    for pattern, template in UNET_SLOT_RULES:
        m = pattern.match(key)
        if m:
            n = int(m.group(1)) if m.groups() else 0
            slot = template.format(n=n, last=last)
            if slot not in slots_for(layout):
                raise SdtuneError(f"{key}: block {slot} does not exist in the {layout} layout; "
                                  f"the checkpoint's U-Net does not match its architecture")
            return slot
    if key.startswith("model.diffusion_model."):
        raise SdtuneError(f"{key}: a U-Net key no block rule covers; the checkpoint layout is not SD1/SD2/SDXL")
    return None


def _smoothstep(x: float) -> float:
    return x * x * (3 - 2 * x)


def _cosine(x: float) -> float:
    return (1 + math.cos(math.pi * x)) / 2


def _u(values: Sequence[float], base: float = 0.0) -> tuple[float, ...]:
    """A 26-value preset from its 25 U-Net values (BASE first)."""
    assert len(values) == 25
    return (base, *(float(v) for v in values))


def _ones(*slots: str, value: float = 1.0) -> tuple[float, ...]:
    """A preset that is `value` on the named slots and 0 elsewhere (BASE 0)."""
    return tuple(value if s in slots else 0.0 for s in SD_SLOTS)


def _span(first: str, last: str) -> list[str]:
    return list(SD_SLOTS[SD_SLOTS.index(first):SD_SLOTS.index(last) + 1])


# The MBW preset family supermerger, bbc-mc and meh ship (26 values, BASE first), computed from their formulas.
PRESETS: dict[str, tuple[float, ...]] = {
    "GRAD_V": _u([1 - i / 12 for i in range(12)] + [0.0] + [(j + 1) / 12 for j in range(12)]),
    "GRAD_A": _u([i / 12 for i in range(12)] + [1.0] + [1 - (j + 1) / 12 for j in range(12)]),
    "FLAT_25": _u([0.25] * 25),
    "FLAT_75": _u([0.75] * 25),
    "WRAP08": _ones(*_span("IN00", "IN03"), *_span("OUT08", "OUT11")),
    "WRAP12": _ones(*_span("IN00", "IN05"), *_span("OUT06", "OUT11")),
    "WRAP14": _ones(*_span("IN00", "IN06"), *_span("OUT05", "OUT11")),
    "WRAP16": _ones(*_span("IN00", "IN07"), *_span("OUT04", "OUT11")),
    "MID12_50": _ones(*_span("IN05", "OUT05"), value=0.5),
    "OUT07": _ones(*_span("OUT05", "OUT11")),
    "OUT12": _ones(*_span("OUT00", "OUT11")),
    "OUT12_5": tuple(0.5 if s == "MID" else v for s, v in zip(SD_SLOTS, _ones(*_span("OUT00", "OUT11")))),
    "RING08_SOFT": tuple(max(a, b) for a, b in zip(_ones("IN06", "IN07", "IN08", "OUT03", "OUT04", "OUT05"),
                                                   _ones("IN05", "IN09", "OUT02", "OUT06", value=0.5))),
    "RING08_5": _ones(*_span("IN06", "IN09"), *_span("OUT02", "OUT05")),
    "RING10_5": _ones(*_span("IN05", "IN09"), *_span("OUT02", "OUT06")),
    "RING10_3": _ones(*_span("IN06", "IN10"), *_span("OUT01", "OUT05")),
    "SMOOTHSTEP": _u([_smoothstep(i / 24) for i in range(25)]),
    "REVERSE_SMOOTHSTEP": _u([1 - _smoothstep(i / 24) for i in range(25)]),
    "COSINE": _u([_cosine(i / 24) for i in range(25)]),
    "REVERSE_COSINE": _u([1 - _cosine(i / 24) for i in range(25)]),
    "ALL_A": _u([0.0] * 25),
    "ALL_B": _u([1.0] * 25, base=1.0),
}


def sd_to_sdxl(values: Sequence[float]) -> tuple[float, ...]:
    """supermerger's conversion of a 26-value list to SDXL's 20: IN09-IN11 and OUT09-OUT11 dropped."""
    return (*values[:10], *values[13:23])


def parse_blocks(text: Optional[str], field: str = "blocks") -> object:
    """Block weights as typed by a user: blank, "-" or "none" = none; numbers (comma-separated) = values;
    anything else = a preset name. Counts and preset names are checked by `resolve_blocks` against the model."""
    text = (text or "").strip()
    if text.lower() in ("", "-", "none"):
        return None
    if "," not in text and not re.fullmatch(r"-?\d+(\.\d*)?", text):
        return text
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise SdtuneError(f"{field}: expected comma-separated numbers or a preset name, got {text!r}") from None


def resolve_blocks(blocks: object, family: str, field: str = "blocks") -> Optional[dict[str, float]]:
    """Turn a preset name or a value list into {slot: weight} for `family`; errors name `field`."""
    if blocks is None:
        return None
    layout = layout_for(family)
    if isinstance(blocks, str):
        name = blocks.strip().upper()
        if name not in PRESETS:
            raise SdtuneError(f"{field}: unknown preset {blocks!r}; presets: {', '.join(PRESETS)}")
        values: tuple[float, ...] = PRESETS[name]
    else:
        try:
            values = tuple(float(v) for v in blocks)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            raise SdtuneError(f"{field}: expected numbers separated by commas, got {blocks!r}") from None
    for i, v in enumerate(values):
        if not math.isfinite(v) or not -1.0 <= v <= 2.0:
            raise SdtuneError(f"{field}: value {i + 1} ({v}) is outside -1..2")
    if layout == "sdxl":
        if len(values) == len(SD_SLOTS):
            values = sd_to_sdxl(values)
        if len(values) not in (len(SDXL_SLOTS), len(SDXL_SLOTS_VAE)):
            raise SdtuneError(f"{field}: {len(values)} values given; SDXL needs 20 (BASE, IN00-IN08, MID, "
                              f"OUT00-OUT08), 21 (the same plus VAE) or 26 (the SD1 list, converted)")
        names = SDXL_SLOTS_VAE if len(values) == len(SDXL_SLOTS_VAE) else SDXL_SLOTS
    else:
        if len(values) != len(SD_SLOTS):
            raise SdtuneError(f"{field}: {len(values)} values given; {family} needs 26 (BASE, IN00-IN11, MID, "
                              f"OUT00-OUT11)")
        names = SD_SLOTS
    return dict(zip(names, values))
