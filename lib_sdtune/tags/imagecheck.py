"""Per-image facts for the dataset lint: decodes, size, transparency, and a 64-bit difference hash."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class ImageFacts:
    """What lint needs to know about one image file (`error` set when it cannot be decoded)."""

    path: Path
    width: int = 0
    height: int = 0
    transparent: bool = False
    dhash: int = 0
    thumb: bytes = b""  # 8x8 RGB, flattened on white: tells apart images whose grey gradients agree
    error: str | None = None


def flatten_on_white(img: Image.Image) -> Image.Image:
    """An RGB image with any transparency composited on white (what the taggers and trainers should see)."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return img.convert("RGB")


def has_transparency(img: Image.Image) -> bool:
    """True when some pixel is not fully opaque (an alpha channel that is all 255 does not count)."""
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        alpha = img.convert("RGBA").getchannel("A")
        return alpha.getextrema()[0] < 255
    return False


def dhash(img: Image.Image, size: int = 8) -> int:
    """Difference hash: grey, (size+1) x size, one bit per horizontal neighbour comparison (64 bits)."""
    small = np.asarray(flatten_on_white(img).convert("L").resize((size + 1, size), Image.LANCZOS), dtype=np.int16)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def thumbnail(img: Image.Image, size: int = 8) -> bytes:
    """A tiny RGB thumbnail (flattened on white) for a colour check beside the grey hash."""
    return flatten_on_white(img).resize((size, size), Image.BOX).tobytes()


def colour_distance(a: bytes, b: bytes) -> float:
    """Mean absolute difference of two thumbnails, 0..255."""
    if len(a) != len(b) or not a:
        return 255.0
    return float(np.abs(np.frombuffer(a, np.uint8).astype(np.int16) - np.frombuffer(b, np.uint8)).mean())


def inspect_image(path: Path) -> ImageFacts:
    """Decode one image fully (a truncated file fails here, not in training) and collect its facts."""
    try:
        with Image.open(path) as img:
            img.load()
            return ImageFacts(path, img.width, img.height, has_transparency(img), dhash(img), thumbnail(img))
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        return ImageFacts(path, error=f"{type(e).__name__}: {e}")


def near_duplicate_groups(facts: Iterable[ImageFacts], max_distance: int,
                          max_colour: float = 12.0) -> list[list[ImageFacts]]:
    """Groups of images whose hashes differ in at most `max_distance` bits and whose thumbnails agree.

    The colour check keeps apart flat pictures with the same layout (red vs purple stripes hash alike).

    Pigeonhole: split 64 bits into max_distance+1 bands; two hashes that close agree on one whole band,
    so only images sharing a band value are compared (no n^2 loop over 10,000 images).
    """
    items = [f for f in facts if f.error is None]
    bands = max_distance + 1
    width = -(-64 // bands)
    parent = list(range(len(items)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    mask = (1 << width) - 1
    for b in range(bands):
        buckets: dict[int, list[int]] = {}
        for i, f in enumerate(items):
            buckets.setdefault((f.dhash >> (b * width)) & mask, []).append(i)
        for members in buckets.values():
            for x in range(len(members)):
                for y in range(x + 1, len(members)):
                    i, j = members[x], members[y]
                    if (bin(items[i].dhash ^ items[j].dhash).count("1") <= max_distance
                            and colour_distance(items[i].thumb, items[j].thumb) <= max_colour):
                        ri, rj = find(i), find(j)
                        if ri != rj:
                            parent[max(ri, rj)] = min(ri, rj)
    groups: dict[int, list[ImageFacts]] = {}
    for i, f in enumerate(items):
        groups.setdefault(find(i), []).append(f)
    return [g for g in groups.values() if len(g) > 1]
