"""Aspect-ratio buckets: sd-scripts' bucket set and image placement, one bucket per batch, per-epoch shuffles."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from lib_sdtune.data.buckets import (
    BucketSelector,
    adjust_min_max_bucket_reso,
    check_bucket_reso_steps,
    make_bucket_resolutions,
    plan_buckets,
)
from lib_sdtune.data.config import DatasetConfig
from lib_sdtune.errors import SdtuneError


def _rule(reso: int, lo: int, hi: int, steps: int) -> set[tuple[int, int]]:
    """The research note's rule, written out independently of the code under test."""
    area = reso * reso
    side = math.isqrt(area) // steps * steps
    out = {(side, side)}
    for w in range(lo, hi + 1, steps):
        h = min(hi, area // w // steps * steps)
        if h >= lo:
            out |= {(w, h), (h, w)}
    return out


@pytest.mark.parametrize("reso,lo,hi", [(512, 256, 1024), (768, 256, 1024), (768, 320, 1536), (1024, 256, 2048),
                                        (1024, 512, 2048)])
def test_bucket_set_follows_the_sd_scripts_rule(reso, lo, hi):
    got = make_bucket_resolutions((reso, reso), lo, hi, 64)
    assert got == sorted(_rule(reso, lo, hi, 64))


def test_known_buckets():
    sd15 = set(make_bucket_resolutions((512, 512), 256, 1024, 64))
    assert {(512, 512), (448, 576), (576, 448), (384, 640), (640, 384), (320, 768), (768, 320), (256, 1024),
            (1024, 256), (704, 320), (320, 704)} <= sd15
    assert len(sd15) == 17
    sdxl = set(make_bucket_resolutions((1024, 1024), 256, 2048, 64))
    # the SDXL paper's training buckets
    assert {(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344),
            (1536, 640), (640, 1536)} <= sdxl
    sd2 = set(make_bucket_resolutions((768, 768), 256, 1024, 64))
    assert {(768, 768), (640, 896), (896, 640), (576, 1024), (1024, 576)} <= sd2


def test_image_goes_to_nearest_aspect_and_covers_it():
    sel = BucketSelector(DatasetConfig(resolution=(512, 512), enable_bucket=True))
    c = sel.select(1000, 500)
    assert c.bucket == (704, 320) and c.resized_size == (704, 352)
    assert c.ar_error == pytest.approx(704 / 320 - 2.0)
    assert sel.select(512, 512).bucket == (512, 512)
    assert sel.select(2048, 2048).resized_size == (512, 512)
    exact = sel.select(448, 576)  # an exact bucket size wins without resizing
    assert exact.bucket == (448, 576) and exact.resized_size == (448, 576)


def test_no_upscale_keeps_small_images_and_shrinks_large_ones():
    sel = BucketSelector(DatasetConfig(resolution=(512, 512), enable_bucket=True, bucket_no_upscale=True))
    small = sel.select(300, 200)
    assert small.bucket == (256, 192) and small.resized_size == (300, 200)
    big = sel.select(2000, 1000)
    assert big.bucket == (640, 320) and big.resized_size == (640, 320)


def test_without_bucketing_everything_is_cut_to_the_resolution():
    sel = BucketSelector(DatasetConfig(resolution=(512, 512)))
    assert sel.select(1000, 500).bucket == (512, 512)
    assert sel.select(1000, 500).resized_size == (1024, 512)


def test_min_max_snapped_to_steps_and_checked_against_the_resolution():
    lo, hi, notes = adjust_min_max_bucket_reso(DatasetConfig(enable_bucket=True, min_bucket_reso=250,
                                                             max_bucket_reso=1000))
    assert (lo, hi) == (192, 1024) and len(notes) == 2
    with pytest.raises(SdtuneError, match="max_bucket_reso 1024 is smaller than the resolution"):
        adjust_min_max_bucket_reso(DatasetConfig(resolution=(1536, 1536), enable_bucket=True))
    with pytest.raises(SdtuneError, match="min_bucket_reso"):
        adjust_min_max_bucket_reso(DatasetConfig(resolution=(256, 256), enable_bucket=True, min_bucket_reso=320))


SIZES = [(512, 512), (600, 400), (400, 600), (512, 512), (1000, 500), (640, 480), (512, 520)]


def test_epoch_batches_one_bucket_each_all_samples_and_reshuffled_from_the_seed():
    cfg = DatasetConfig(resolution=(512, 512), enable_bucket=True, batch_size=2)
    repeats = [3, 1, 2, 1, 2, 1, 1]
    plan = plan_buckets(cfg, SIZES, repeats)
    e1, e2 = plan.epoch_batches(seed=42, epoch=1), plan.epoch_batches(seed=42, epoch=2)
    assert e1 == plan.epoch_batches(seed=42, epoch=1) and e1 != e2
    for batches in (e1, e2):
        assert Counter(i for b in batches for i in b) == Counter({i: n for i, n in enumerate(repeats)})
        for b in batches:
            assert len({plan.choices[i].bucket for i in b}) == 1 and 1 <= len(b) <= 2
    assert len(e1) == plan.batches_per_epoch == sum(math.ceil(len(m) / 2) for m in plan.members)


def test_bucket_info_has_the_ss_bucket_info_shape():
    plan = plan_buckets(DatasetConfig(resolution=(512, 512), enable_bucket=True), SIZES, [2] * len(SIZES))
    info = plan.bucket_info()
    assert set(info) == {"buckets", "mean_img_ar_error"}
    assert [b["resolution"] for b in info["buckets"].values()] == [list(r) for r in plan.resos]
    assert sum(b["count"] for b in info["buckets"].values()) == 2 * len(SIZES)
    assert info["mean_img_ar_error"] == pytest.approx(sum(abs(c.ar_error) for c in plan.choices) / len(SIZES))


def test_bucket_steps_checked_per_architecture():
    sdxl48 = DatasetConfig(resolution=(1024, 1024), enable_bucket=True, bucket_reso_steps=48, max_bucket_reso=2064)
    with pytest.raises(SdtuneError, match="multiple of 32"):
        check_bucket_reso_steps(sdxl48, "sdxl")
    check_bucket_reso_steps(DatasetConfig(enable_bucket=True, bucket_reso_steps=32), "sdxl")
    with pytest.raises(SdtuneError, match="multiple of 64"):
        check_bucket_reso_steps(DatasetConfig(enable_bucket=True, bucket_reso_steps=32), "sd1")
    with pytest.raises(SdtuneError, match="multiples of 8"):
        check_bucket_reso_steps(DatasetConfig(resolution=(500, 500)), "sd1")
