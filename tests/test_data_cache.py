"""Latent cache (keyed by VAE, bucket, flip and image file; stale entries rebuilt) and the TE-output cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from lib_sdtune.data.config import DatasetConfig, SubsetConfig
from lib_sdtune.data.latent_cache import LatentCache, vae_fingerprint
from lib_sdtune.data.loader import LoaderOptions, make_training_data
from lib_sdtune.data.scan import scan_folder
from lib_sdtune.data.te_cache import TextEncoderOutputCache, text_encoder_cache_refusal
from lib_sdtune.demo.tiny_models import tiny_configs
from lib_sdtune.errors import SdtuneError

DS = DatasetConfig(resolution=(64, 64), enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128,
                   bucket_reso_steps=32, batch_size=2)


@pytest.fixture(scope="module")
def vaes():
    """Two different tiny SD1 VAEs (the demo checkpoints' VAE shape, randomly initialised)."""
    from diffusers import AutoencoderKL

    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        out.append(AutoencoderKL(**tiny_configs("sd1")["vae"]).eval())
    return tuple(out)


def _dataset(root: Path) -> Path:
    folder = root / "t" / "2_x"
    folder.mkdir(parents=True)
    for i, size in enumerate([(64, 64), (128, 32), (64, 64)]):
        Image.new("RGB", size, (40 * i, 100, 200)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"x, tag{i}", encoding="utf-8")
    return root / "t"


def _data(root: Path, cache: LatentCache, flip: bool = True, **sub):
    scan = scan_folder(root, dataset=DS, subset=SubsetConfig(flip_aug=flip, **sub))
    return make_training_data([scan], LoaderOptions(seed=0, workers=0), latent_cache=cache)


def test_disk_cache_is_built_beside_images_reused_and_rebuilt_when_stale(tmp_path, vaes):
    vae, other_vae = vaes
    root = _dataset(tmp_path)
    cache = LatentCache(vae_fingerprint(vae), to_disk=True)
    data = _data(root, cache)
    report = cache.build(data, vae, batch_size=2)
    assert (report.encoded, report.reused, report.rebuilt, report.failed) == (3, 0, [], [])
    files = sorted(p.name for p in (root / "2_x").glob("*_sdtune_latents.safetensors"))
    assert files == ["0_0064x0064_sdtune_latents.safetensors", "1_0128x0032_sdtune_latents.safetensors",
                     "2_0064x0064_sdtune_latents.safetensors"]
    again = cache.build(data, vae)
    assert (again.encoded, again.reused) == (0, 3)

    other = LatentCache(vae_fingerprint(other_vae), to_disk=True)  # another VAE: nothing is reused
    assert other.get(root / "2_x" / "0.png", (64, 64), False) is None
    rep = other.build(_data(root, other), other_vae)
    assert rep.encoded == 3 and {why for _, why in rep.rebuilt} == {"made with another VAE"}

    img = root / "2_x" / "1.png"
    Image.new("RGB", (128, 32), (0, 0, 0)).save(img)  # edited image, same size
    os.utime(img, ns=(img.stat().st_atime_ns, img.stat().st_mtime_ns + 10_000_000))
    rep = other.build(_data(root, other), other_vae)
    assert rep.encoded == 1 and rep.rebuilt == [(img, "the image file changed since")]

    no_flip = other.stale_reason(img, (128, 32), (128, 32), True)
    assert no_flip is None
    (root / "2_x" / "0_0064x0064_sdtune_latents.safetensors").write_bytes(b"torn")
    assert other.stale_reason(root / "2_x" / "0.png", (64, 64), (64, 64), True).startswith("unreadable")


def test_batches_come_from_the_cache_with_flipped_latents(tmp_path, vaes):
    vae, _ = vaes
    root = _dataset(tmp_path)
    cache = LatentCache(vae_fingerprint(vae))  # in memory
    data = _data(root, cache)
    cache.build(data, vae)
    seen_flip = set()
    for epoch in range(1, 6):
        for b in data.iter_epoch(epoch):
            assert b.pixels is None and b.latents.shape[1:2] == (4,)
            h, w = b.target_sizes_hw[0]
            assert b.latents.shape[2:] == (h // 8, w // 8)
            for j, (path, flipped) in enumerate(zip(b.paths, b.flipped)):
                bucket = (w, h)
                assert torch.equal(b.latents[j], cache.get(path, bucket, flipped).latents)
                seen_flip.add(flipped)
    assert seen_flip == {True, False}
    a = cache.get(root / "2_x" / "0.png", (64, 64), False).latents
    assert not torch.equal(a, cache.get(root / "2_x" / "0.png", (64, 64), True).latents)


def test_same_seed_same_latents_and_missing_entries_are_an_error(tmp_path, vaes):
    vae, _ = vaes
    root = _dataset(tmp_path)
    c1, c2 = LatentCache("v"), LatentCache("v")
    c1.build(_data(root, c1, flip=False), vae, seed=4)
    c2.build(_data(root, c2, flip=False), vae, seed=4)
    p = root / "2_x" / "1.png"
    assert torch.equal(c1.get(p, (128, 32), False).latents, c2.get(p, (128, 32), False).latents)
    empty = LatentCache("v")
    with pytest.raises(SdtuneError, match="build the latent cache"):
        list(_data(root, empty).iter_epoch(1))


def test_caching_is_refused_with_per_step_pixel_changes(tmp_path, vaes):
    root = _dataset(tmp_path)
    cache = LatentCache("v")
    for kw in ({"color_aug": True}, {"random_crop": True}, {"grayscale_aug_rate": 0.1}):
        with pytest.raises(SdtuneError, match=next(iter(kw))):
            cache.build(_data(root, cache, **kw), vaes[0])


def test_text_encoder_output_cache(tmp_path):
    outs = {"hidden_state1": torch.randn(77, 8), "pool2": torch.randn(16)}
    for folder in (None, tmp_path / "te"):
        cache = TextEncoderOutputCache("te-a", folder)
        assert cache.get("a cat") is None and cache.missing(["a cat", "a dog", "a cat"]) == ["a cat", "a dog"]
        cache.put("a cat", outs)
        got = cache.get("a cat")
        assert set(got) == set(outs) and all(torch.equal(got[k], outs[k]) for k in outs)
        assert cache.missing(["a cat", "a dog"]) == ["a dog"]
    assert TextEncoderOutputCache("te-b", tmp_path / "te").get("a cat") is None  # other encoders: a miss
    assert text_encoder_cache_refusal([SubsetConfig()], train_text_encoder=False) is None
    assert "trained" in text_encoder_cache_refusal([SubsetConfig()], train_text_encoder=True)
    assert "shuffle_caption" in text_encoder_cache_refusal([SubsetConfig(shuffle_caption=True)], False)


def test_nan_latents_are_refused_with_advice(tmp_path, vaes):
    root = _dataset(tmp_path)
    cache = LatentCache("v")
    vae = vaes[0]
    saved = vae.encoder.conv_in.bias.data.clone()
    vae.encoder.conv_in.bias.data[0] = float("nan")
    try:
        with pytest.raises(SdtuneError, match="fp16-fix"):
            cache.build(_data(root, cache, flip=False), vae)
    finally:
        vae.encoder.conv_in.bias.data.copy_(saved)


def test_interpolation_is_part_of_the_key(tmp_path, vaes):
    root = _dataset(tmp_path)
    cache = LatentCache("v", to_disk=True)
    cache.build(_data(root, cache, flip=False), vaes[0])
    rep = cache.build(_data(root, cache, flip=False, resize_interpolation="bicubic"), vaes[0])
    assert rep.encoded == 3 and {w for _, w in rep.rebuilt} == {"another resize_interpolation"}


def test_an_image_broken_before_caching_is_skipped_not_fatal(tmp_path, vaes):
    root = _dataset(tmp_path)
    cache = LatentCache("v")
    data = _data(root, cache, flip=False)
    (root / "2_x" / "1.png").write_bytes(b"broken")
    report = cache.build(data, vaes[0])
    assert report.encoded == 2 and [p.name for p, _ in report.failed] == ["1.png"]
    batches = list(data.iter_epoch(1))
    assert sum(len(b) for b in batches) == 4  # 3 images x 2 repeats, minus the broken one's 2
    assert {p.name for b in batches for p, _ in b.skipped} == {"1.png"}
