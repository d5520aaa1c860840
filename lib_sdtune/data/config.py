"""Dataset settings as typed dataclasses, with sd-scripts' key names and defaults.

A `dataset_config` TOML (or a train config's dataset section) maps onto these field by field, so
every key a kohya user knows means the same here. Where sdtune's default differs from sd-scripts'
CLI default it is said beside the field.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional

from ..errors import SdtuneError

# sd-scripts' accepted `resize_interpolation` names (`library/utils.py` validate_interpolation_fn)
INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")


@dataclass(frozen=True)
class SubsetConfig:
    """One folder of images (a kohya "subset"): how its captions and pixels are used at each step."""

    image_dir: str = ""
    num_repeats: int = 1
    is_reg: bool = False
    class_tokens: Optional[str] = None
    caption_extension: str = ".txt"  # sd-scripts' CLI default is ".caption"; ".caption" is also tried
    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: Optional[str] = None
    enable_wildcard: bool = False
    caption_prefix: Optional[str] = None
    caption_suffix: Optional[str] = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0.0
    color_aug: bool = False
    flip_aug: bool = False
    random_crop: bool = False
    grayscale_aug_rate: float = 0.0  # sdtune only: probability of a black-and-white copy per step
    face_crop_aug_range: Optional[tuple[float, float]] = None  # accepted for compatibility, not applied
    custom_attributes: Optional[dict[str, Any]] = None
    resize_interpolation: Optional[str] = None
    cache_info: bool = False  # accepted for compatibility; sdtune's scan is fast enough without it
    alpha_mask: bool = False  # accepted for compatibility; transparent pixels are flattened onto white


@dataclass(frozen=True)
class DatasetConfig:
    """One kohya "dataset": subsets that share a resolution, bucketing and batch size."""

    subsets: tuple[SubsetConfig, ...] = ()
    resolution: tuple[int, int] = (512, 512)  # (width, height)
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    network_multiplier: float = 1.0
    validation_seed: Optional[int] = None
    validation_split: float = 0.0
    resize_interpolation: Optional[str] = None
    prior_loss_weight: float = 1.0  # sd-scripts: CLI only (--prior_loss_weight); the loss weight of reg images


SUBSET_KEYS: frozenset[str] = frozenset(f.name for f in fields(SubsetConfig))
DATASET_KEYS: frozenset[str] = frozenset(f.name for f in fields(DatasetConfig)) - {"subsets"}


def normalize_resolution(value: Any, where: str = "resolution") -> tuple[int, int]:
    """`512`, `"512"`, `"512,768"`, `[512, 768]` -> (width, height), as sd-scripts accepts them."""
    try:
        if isinstance(value, (list, tuple)):
            if len(value) != 2:
                raise ValueError
            w, h = int(value[0]), int(value[1])
        elif isinstance(value, str) and "," in value:
            a, b = value.split(",", 1)
            w, h = int(a), int(b)
        else:
            w = h = int(value)
    except (TypeError, ValueError):
        raise SdtuneError(f"{where} = {value!r} is not a resolution: give one number (512) or width and height "
                          f"([768, 512])") from None
    if w < 64 or h < 64:
        raise SdtuneError(f"{where} = {value!r} is too small: use at least 64 (512 for SD1, 768 for SD2, "
                          f"1024 for SDXL)")
    return w, h


@dataclass(frozen=True)
class ScanOptions:
    """How a folder is read: sdtune choices that sd-scripts has no key for."""

    accept_concept_folder: bool = False  # a folder of images given directly is one concept with 1 repeat
    verify_images: bool = True  # open every image at scan time (header and PNG checksums) to skip broken ones
    workers: int = 0  # threads reading image headers; 0 = one per CPU, at most 8
