"""Images per step: flattening onto white, resize-to-cover and crop, augmentation off by default and seeded."""

from __future__ import annotations

import colorsys
import random

import numpy as np
import pytest
from PIL import Image

from lib_sdtune.data.augment import color_aug, crop_offset, decide_flip, flip_pixels, grayscale, shift_hue
from lib_sdtune.data.images import ImageReadError, load_rgb, read_image_size, resize_and_crop


def test_transparent_images_are_flattened_onto_white(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 128))  # half-transparent black -> mid grey
    rgba.save(tmp_path / "a.png")
    px = np.asarray(load_rgb(tmp_path / "a.png"))
    assert tuple(px[4, 4]) == (255, 255, 255) and tuple(px[0, 0]) == (0, 0, 255)
    assert 120 <= px[0, 1, 0] <= 135
    la = Image.new("LA", (4, 4), (0, 0))
    la.save(tmp_path / "la.png")
    assert np.asarray(load_rgb(tmp_path / "la.png")).min() == 255
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 0, 10, 200, 10])
    p.info["transparency"] = 0
    p.save(tmp_path / "p.png", transparency=0)
    assert tuple(np.asarray(load_rgb(tmp_path / "p.png"))[0, 0]) == (255, 255, 255)


def test_other_modes_become_rgb(tmp_path):
    Image.new("L", (4, 4), 77).save(tmp_path / "g.png")
    assert tuple(np.asarray(load_rgb(tmp_path / "g.png"))[0, 0]) == (77, 77, 77)
    Image.new("I;16", (4, 4), 65535).save(tmp_path / "g16.png")
    assert np.asarray(load_rgb(tmp_path / "g16.png")).min() == 255
    Image.new("CMYK", (4, 4), (0, 0, 0, 0)).save(tmp_path / "c.jpg")
    assert load_rgb(tmp_path / "c.jpg").mode == "RGB"


def test_broken_image_raises_a_readable_reason(tmp_path):
    (tmp_path / "x.png").write_bytes(b"garbage")
    with pytest.raises(ImageReadError, match="not an image"):
        read_image_size(tmp_path / "x.png")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError):
        load_rgb(tmp_path / "t.png")


def test_resize_and_centre_crop_records_original_size_and_crop():
    im = Image.fromarray(np.arange(100 * 50 * 3, dtype=np.uint32).reshape(50, 100, 3).astype(np.uint8))
    out = resize_and_crop(im, (100, 50), bucket=(64, 64), resized_size=(128, 64))
    assert out.pixels.shape == (64, 64, 3) and out.original_size == (100, 50)
    assert out.crop_top_left == (0, 32) and out.target_size == (64, 64)
    rand = {resize_and_crop(im, (100, 50), (64, 64), (128, 64), True, random.Random(s)).crop_top_left
            for s in range(20)}
    assert len(rand) > 3 and all(t == 0 and 0 <= left <= 64 for t, left in rand)


def test_augmentations_are_off_unless_asked_and_seeded():
    px = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert decide_flip(False, random.Random(0)) is False
    flips = [decide_flip(True, random.Random(s)) for s in range(200)]
    assert 60 < sum(flips) < 140
    assert np.array_equal(flip_pixels(px), px[:, ::-1])
    assert grayscale(px, random.Random(0), 0.0) is px
    g = grayscale(px, random.Random(0), 1.0)
    assert (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()
    changed = [not np.array_equal(color_aug(px, random.Random(s)), px) for s in range(300)]
    assert 0.2 < sum(changed) / 300 < 0.45  # sd-scripts: p = 0.33
    assert np.array_equal(color_aug(px, random.Random(5)), color_aug(px, random.Random(5)))
    assert crop_offset(10, False, random.Random(0)) == 5 and crop_offset(0, True, random.Random(0)) == 0


def test_hue_shift_matches_colorsys():
    px = np.array([[[200, 30, 30], [30, 200, 90], [10, 10, 10], [128, 128, 128]]], dtype=np.uint8)
    out = shift_hue(px, 0.1)
    for (r, g, b), got in zip(px[0] / 255.0, out[0]):
        h, s, v = colorsys.rgb_to_hsv(r, g, b)
        want = np.array(colorsys.hsv_to_rgb((h + 0.1) % 1.0, s, v)) * 255
        assert np.abs(got.astype(float) - want).max() <= 8.0  # 8-bit HSV, as OpenCV's
