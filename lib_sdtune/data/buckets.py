"""Aspect-ratio buckets exactly as sd-scripts makes and fills them, and the per-epoch batch order.

`make_bucket_resolutions` is `library/model_util.py`'s; `select_bucket` is `BucketManager.select_bucket`
(`library/train_util.py`); `bucket_no_upscale` gives each image its own bucket, never enlarging it.
A batch always comes from one bucket; bucket contents and batch order are reshuffled every epoch
from `seed + epoch`, so a resumed run replays the same order.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ..errors import SdtuneError
from .config import DatasetConfig


def make_bucket_resolutions(max_reso: tuple[int, int], min_size: int = 256, max_size: int = 1024,
                            divisible: int = 64) -> list[tuple[int, int]]:
    """sd-scripts' bucket set: the square of the resolution's area, plus every (w, h) and (h, w) with
    w stepping min..max and h the largest multiple of `divisible` keeping w*h within the area."""
    max_area = max_reso[0] * max_reso[1]
    resos = set()
    width = int(math.sqrt(max_area) // divisible) * divisible
    resos.add((width, width))
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


def adjust_min_max_bucket_reso(config: DatasetConfig) -> tuple[int, int, list[str]]:
    """min/max bucket sizes snapped to `bucket_reso_steps` (min down, max up) as sd-scripts does, with
    the notes it logs; an error when the resolution falls outside them."""
    steps, lo, hi = config.bucket_reso_steps, config.min_bucket_reso, config.max_bucket_reso
    notes = []
    if steps < 1:
        raise SdtuneError(f"bucket_reso_steps = {steps}: use a positive multiple of 8 (64 is the usual value)")
    if lo % steps:
        notes.append(f"min_bucket_reso {lo} rounded down to {lo - lo % steps}, a multiple of bucket_reso_steps {steps}")
        lo -= lo % steps
    if hi % steps:
        notes.append(f"max_bucket_reso {hi} rounded up to {hi + steps - hi % steps}, a multiple of bucket_reso_steps "
                     f"{steps}")
        hi += steps - hi % steps
    if min(config.resolution) < lo:
        raise SdtuneError(f"min_bucket_reso {lo} is larger than the resolution {config.resolution}: lower "
                          f"min_bucket_reso or raise the resolution")
    if max(config.resolution) > hi:
        raise SdtuneError(f"max_bucket_reso {hi} is smaller than the resolution {config.resolution}: raise "
                          f"max_bucket_reso or lower the resolution")
    return lo, hi, notes


@dataclass(frozen=True)
class BucketChoice:
    """Where an image goes: its bucket (w, h), the size it is resized to before cropping, the AR error."""

    bucket: tuple[int, int]
    resized_size: tuple[int, int]
    ar_error: float


class BucketSelector:
    """sd-scripts' `BucketManager.select_bucket` for one dataset's settings (no state besides the set)."""

    def __init__(self, config: DatasetConfig):
        self.config = config
        self.notes: list[str] = []
        w, h = config.resolution
        if not config.enable_bucket:
            self.no_upscale, self.steps, self.max_area = False, 64, w * h
            self.resos: list[tuple[int, int]] = [(w, h)]
        else:
            self.no_upscale, self.steps, self.max_area = config.bucket_no_upscale, config.bucket_reso_steps, w * h
            lo, hi, self.notes = adjust_min_max_bucket_reso(config)
            self.resos = [] if self.no_upscale else make_bucket_resolutions((w, h), lo, hi, self.steps)
        self._reso_set = set(self.resos)
        self._ars = np.array([a / b for a, b in self.resos]) if self.resos else np.zeros(0)

    def _round(self, x: float) -> int:
        x = int(x + 0.5)
        return x - x % self.steps

    def select(self, width: int, height: int) -> BucketChoice:
        """The bucket for an image of this size (nearest aspect ratio; exact size preferred)."""
        ar = width / height
        if not self.no_upscale:
            reso = (width, height)
            if reso not in self._reso_set:
                reso = self.resos[int(np.abs(self._ars - ar).argmin())]
            scale = reso[1] / height if ar > reso[0] / reso[1] else reso[0] / width
            resized = (int(width * scale + 0.5), int(height * scale + 0.5))
        else:
            if width * height > self.max_area:
                rw = math.sqrt(self.max_area * ar)
                rh = self.max_area / rw
                bw_r = self._round(rw)
                bh_in_w = self._round(bw_r / ar)
                bh_r = self._round(rh)
                bw_in_h = self._round(bh_r * ar)
                if bh_in_w > 0 and bh_r > 0 and abs(bw_r / bh_in_w - ar) < abs(bw_in_h / bh_r - ar):
                    resized = (bw_r, int(bw_r / ar + 0.5))
                else:
                    resized = (int(bh_r * ar + 0.5), bh_r)
            else:
                resized = (width, height)
            reso = (resized[0] - resized[0] % self.steps, resized[1] - resized[1] % self.steps)
            if reso[0] < self.steps or reso[1] < self.steps:  # sd-scripts would make a 0-px bucket
                reso = (max(reso[0], self.steps), max(reso[1], self.steps))
                scale = max(reso[0] / width, reso[1] / height)
                resized = (max(reso[0], int(width * scale + 0.5)), max(reso[1], int(height * scale + 0.5)))
        return BucketChoice((int(reso[0]), int(reso[1])), (int(resized[0]), int(resized[1])), reso[0] / reso[1] - ar)


@dataclass(frozen=True)
class BucketPlan:
    """Every sample of an epoch placed in a bucket; `choices[i]` belongs to the i-th item passed in."""

    resos: tuple[tuple[int, int], ...]  # used buckets, sorted
    members: tuple[tuple[int, ...], ...]  # per bucket: item indices, each repeated `repeats` times
    choices: tuple[BucketChoice, ...]
    batch_size: int
    notes: tuple[str, ...] = ()

    @property
    def batches_per_epoch(self) -> int:
        """sd-scripts' `len(train_dataloader)`: sum over buckets of ceil(samples / batch size)."""
        return sum(math.ceil(len(m) / self.batch_size) for m in self.members)

    def bucket_info(self) -> dict:
        """`ss_bucket_info`: {"buckets": {i: {"resolution": [w, h], "count": n}}, "mean_img_ar_error": e}."""
        errors = [abs(c.ar_error) for c in self.choices]
        return {"buckets": {i: {"resolution": list(r), "count": len(m)}
                            for i, (r, m) in enumerate(zip(self.resos, self.members))},
                "mean_img_ar_error": float(np.mean(errors)) if errors else 0.0}

    def epoch_batches(self, seed: int, epoch: int) -> list[tuple[int, ...]]:
        """The epoch's batches (item indices), one bucket per batch; contents and order shuffled from
        `seed + epoch` (sd-scripts' `shuffle_buckets`), the same list on every call."""
        rng = random.Random(seed + epoch)
        batches = []
        for members in self.members:
            m = list(members)
            rng.shuffle(m)
            batches += [tuple(m[i:i + self.batch_size]) for i in range(0, len(m), self.batch_size)]
        rng.shuffle(batches)
        return batches


def plan_buckets(config: DatasetConfig, sizes: Sequence[tuple[int, int]],
                 repeats: Optional[Sequence[int]] = None) -> BucketPlan:
    """Place every image (by its (w, h)) in a bucket and repeat it `repeats[i]` times per epoch."""
    if config.batch_size < 1:
        raise SdtuneError(f"batch_size = {config.batch_size}: use 1 or more")
    selector = BucketSelector(config)
    choices = [selector.select(w, h) for w, h in sizes]
    repeats = list(repeats) if repeats is not None else [1] * len(sizes)
    by_reso: dict[tuple[int, int], list[int]] = {}
    for i, (choice, n) in enumerate(zip(choices, repeats)):
        by_reso.setdefault(choice.bucket, []).extend([i] * n)
    resos = tuple(sorted(r for r, m in by_reso.items() if m))
    return BucketPlan(resos, tuple(tuple(by_reso[r]) for r in resos), tuple(choices), config.batch_size,
                      tuple(selector.notes))


def check_bucket_reso_steps(config: DatasetConfig, arch: str) -> None:
    """sd-scripts' `verify_bucket_reso_steps`: bucket sizes a multiple of 64 (SD1/SD2) or 32 (SDXL);
    without buckets the resolution must still divide into latents (a multiple of 8)."""
    if config.enable_bucket:
        need = 32 if arch.startswith("sdxl") else 64
        if config.bucket_reso_steps % need:
            raise SdtuneError(f"bucket_reso_steps = {config.bucket_reso_steps}: {arch} needs a multiple of {need} "
                              f"(64 works for every model)")
    elif config.resolution[0] % 8 or config.resolution[1] % 8:
        raise SdtuneError(f"resolution {config.resolution}: width and height must be multiples of 8 (the VAE's "
                          f"scale); use e.g. 512, 768 or 1024")
