"""Image files -> RGB pixels at a bucket's size, as sd-scripts prepares them (resize to cover, then crop).

Transparent images (RGBA, LA, P with transparency) are flattened onto white, not black: sd-scripts'
`convert("RGB")` drops alpha, which turns most cut-outs' backgrounds black and teaches the LoRA dark
halos. Resizing uses Pillow only: sd-scripts' default ("area" when shrinking, Lanczos when enlarging)
maps to Pillow's BOX and LANCZOS filters.
"""

from __future__ import annotations

import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from .augment import crop_offset

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
WHITE = (255, 255, 255)
_FILTERS = {
    "lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
    "linear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC, "cubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX, "box": Image.Resampling.BOX,
}


class ImageReadError(Exception):
    """An image file that cannot be opened or decoded; the message says why."""


def is_image_file(path: Path) -> bool:
    """True for the extensions sd-scripts trains on (png, jpg/jpeg, webp, bmp), in any letter case."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def read_image_size(path: str | os.PathLike, verify: bool = True) -> tuple[int, int]:
    """(width, height) from the header; with `verify`, also Pillow's integrity check (PNG chunk CRCs)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                size = im.size
                if verify:
                    im.verify()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageReadError(_reason(e)) from None
    if size[0] < 1 or size[1] < 1:
        raise ImageReadError(f"it has no pixels ({size[0]}x{size[1]})")
    return size


def _reason(e: BaseException) -> str:
    """A short human reason for a Pillow failure."""
    text = str(e) or type(e).__name__
    if "cannot identify image file" in text:
        return "not an image Pillow can read (corrupt, empty or another format)"
    if isinstance(e, PermissionError):
        return "permission denied"
    return text


def flatten_to_rgb(im: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """RGB copy of any mode; transparent pixels are composited onto `background` (white)."""
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        base = Image.new("RGBA", rgba.size, background + (255,))
        base.alpha_composite(rgba)
        return base.convert("RGB")
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit greyscale PNG: scale to 8 bit, not clip
        arr = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if arr.max() > 255 else 255.0
        return Image.fromarray(np.clip(arr * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")


def load_rgb(path: str | os.PathLike, draft_size: Optional[tuple[int, int]] = None) -> Image.Image:
    """Decode an image as RGB (transparency flattened onto white).

    `draft_size` lets JPEG decoding shrink by 1/2, 1/4 or 1/8 in the decoder while staying at least
    that size: much faster for large photos, and still resized properly afterwards.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if draft_size is not None and im.format == "JPEG":
                    im.draft("RGB", draft_size)
                im.load()
                return flatten_to_rgb(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageReadError(_reason(e)) from None


def resize_filter(name: Optional[str], src: tuple[int, int], dst: tuple[int, int]) -> Image.Resampling:
    """sd-scripts' rule: the named filter, else "area" when shrinking both sides and Lanczos otherwise."""
    if name is None:
        name = "area" if src[0] >= dst[0] and src[1] >= dst[1] else "lanczos"
    return _FILTERS[name]


@dataclass(frozen=True)
class Prepared:
    """Pixels at the bucket size and what SDXL's size conditioning needs to know about them."""

    pixels: np.ndarray  # uint8 HWC RGB, exactly bucket height x width
    original_size: tuple[int, int]  # (width, height) of the file
    crop_top_left: tuple[int, int]  # (top, left) pixels cut from the resized image
    target_size: tuple[int, int]  # (width, height) = the bucket


def resize_and_crop(im: Image.Image, original_size: tuple[int, int], bucket: tuple[int, int],
                    resized_size: tuple[int, int], random_crop: bool = False, rng: Optional[random.Random] = None,
                    interpolation: Optional[str] = None) -> Prepared:
    """Resize to `resized_size` (which covers `bucket`) and cut the bucket out: centred, or anywhere with
    `random_crop` (sd-scripts' `trim_and_resize_if_required`). The crop offsets are the real ones."""
    if im.size != tuple(resized_size):
        im = im.resize(tuple(resized_size), resize_filter(interpolation, im.size, resized_size))
    rw, rh = im.size
    bw, bh = bucket
    rng = rng or random.Random(0)
    left = crop_offset(rw - bw, random_crop, rng)
    top = crop_offset(rh - bh, random_crop, rng)
    if (left, top, rw, rh) != (0, 0, bw, bh):
        im = im.crop((left, top, left + min(bw, rw), top + min(bh, rh)))
    pixels = np.asarray(im, dtype=np.uint8)
    if pixels.shape[0] != bh or pixels.shape[1] != bw:  # an image smaller than its bucket (never by the rules)
        pad = np.full((bh, bw, 3), 255, dtype=np.uint8)
        pad[: pixels.shape[0], : pixels.shape[1]] = pixels[:bh, :bw]
        pixels = pad
    return Prepared(pixels, (int(original_size[0]), int(original_size[1])), (top, left), (bw, bh))


def to_tensor(pixels: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 HWC arrays -> float32 B,3,H,W in [-1, 1] (sd-scripts' ToTensor + Normalize(0.5, 0.5))."""
    stacked = np.stack(pixels)
    out = np.empty((stacked.shape[0], 3, stacked.shape[1], stacked.shape[2]), dtype=np.float32)
    out[:] = stacked.transpose(0, 3, 1, 2)  # numpy's strided copy is ~20x faster than torch's permute().float()
    out *= 1.0 / 127.5
    out -= 1.0
    return torch.from_numpy(out)
