"""Per-step image augmentation: flip, colour skew, black-and-white. All off by default.

LoRA datasets are small and specific; augmentation helps only when the thing being learned does not
depend on what it changes. Each function says when to use it. Randomness comes from the
`random.Random` passed in, so a seeded run repeats exactly. Pixels are uint8 HWC RGB arrays.
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image

HUE_SHIFT_LIMIT = 8 / 180  # sd-scripts: +-8 on OpenCV's 0-180 hue scale (= +-16 degrees)
COLOR_AUG_P = 0.33  # sd-scripts AugHelper: one of hue shift / gamma with this probability


def decide_flip(flip_aug: bool, rng: random.Random) -> bool:
    """`flip_aug`: mirror left-right with probability 0.5 (decided before loading, so a latent cache can
    hold both versions).

    Use it for symmetric subjects and styles (most objects, landscapes, a painting style) to double the
    variety of a small set. Do not use it for asymmetric characters (a side parting, an eye patch, a
    logo or text on clothing): the LoRA learns both sides and gets neither right.
    """
    return flip_aug and rng.random() < 0.5


def flip_pixels(pixels: np.ndarray) -> np.ndarray:
    """Mirror an HWC image left-right (contiguous, so torch can take it)."""
    return np.ascontiguousarray(pixels[:, ::-1])


def shift_hue(pixels: np.ndarray, shift: float) -> np.ndarray:
    """Rotate every pixel's hue by `shift` turns in 8-bit HSV (as OpenCV's HSV, which sd-scripts uses)."""
    hsv = np.array(Image.fromarray(pixels, "RGB").convert("HSV"))
    hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + int(round(shift * 256))) % 256).astype(np.uint8)
    return np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))


def apply_gamma(pixels: np.ndarray, gamma: float) -> np.ndarray:
    """Gamma on [0,1] intensities, through a 256-entry table."""
    lut = np.clip(((np.arange(256) / 255.0) ** gamma) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return lut[pixels]


def color_aug(pixels: np.ndarray, rng: random.Random) -> np.ndarray:
    """`color_aug` (sd-scripts' colour skew): with p=0.33, either a hue shift of up to +-16 degrees or a
    gamma of 0.95-1.05.

    Use it when colour is not part of the concept (a pose, a composition, a style defined by line work)
    and the set is small. Do not use it for a character or product whose colours must be exact. It
    changes pixels every step, so latents cannot be cached (sd-scripts refuses the same combination).
    The gamma is applied to [0,1] intensities, as albumentations' RandomGamma that sd-scripts replaced.
    """
    if rng.random() > COLOR_AUG_P:
        return pixels
    if rng.random() > 0.5:
        return shift_hue(pixels, rng.uniform(-HUE_SHIFT_LIMIT, HUE_SHIFT_LIMIT))
    return apply_gamma(pixels, rng.uniform(0.95, 1.05))


def grayscale(pixels: np.ndarray, rng: random.Random, rate: float) -> np.ndarray:
    """`grayscale_aug_rate` (sdtune only): a black-and-white copy with this probability (ITU-R 601 luma).

    Use a low rate (0.05-0.2) for shape-, pose- or line-art concepts when the colour images are few,
    or to let a style LoRA also work for monochrome prompts. Leave it at 0 when colour matters: the
    LoRA otherwise learns to drift towards grey.
    """
    if rate <= 0 or rng.random() >= rate:
        return pixels
    return np.asarray(Image.fromarray(pixels, "RGB").convert("L").convert("RGB"))


def crop_offset(excess: int, random_crop: bool, rng: random.Random) -> int:
    """Where to cut along one side that is `excess` pixels longer than the bucket: the centre, or with
    `random_crop` anywhere.

    Use `random_crop` when images are much larger than the bucket in one direction and the subject is
    not always centred (wide scenes, full-body shots in tall frames), so every part gets seen. Do not
    use it when the subject fills the frame edge to edge, or with latent caching (the crop changes
    every step, so sd-scripts refuses that combination, and so does sdtune).
    """
    if excess <= 0:
        return 0
    return rng.randint(0, excess) if random_crop else excess // 2
