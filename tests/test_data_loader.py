"""Loading: batches from one bucket with pixels in [-1, 1], captions, sizes, reg weights; threads change nothing."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from lib_sdtune.data.config import DatasetConfig, SubsetConfig
from lib_sdtune.data.loader import LoaderOptions, make_training_data
from lib_sdtune.data.scan import scan_folder
from lib_sdtune.demo.dataset import DemoDatasetSpec, write_demo_dataset

DS = DatasetConfig(resolution=(64, 64), enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128,
                   bucket_reso_steps=16, batch_size=2, prior_loss_weight=0.5)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("demo"), DemoDatasetSpec(images_per_concept=6, repeats=2))


@pytest.fixture(scope="module")
def scan(demo):
    return scan_folder(demo.train_dir, demo.reg_dir, dataset=DS, subset=SubsetConfig(shuffle_caption=True,
                                                                                    keep_tokens=1))


def _summary(batches):
    return [(b.key.items, b.captions, b.pixels.sum().item(), b.crop_top_lefts) for b in batches]


def test_an_epoch_covers_every_sample_once_per_repeat_in_bucket_batches(scan):
    data = make_training_data([scan], LoaderOptions(seed=1, workers=2))
    batches = list(data.iter_epoch(1))
    assert len(batches) == data.batches_per_epoch
    assert sum(len(b) for b in batches) == scan.samples_per_epoch == 24
    for b in batches:
        n, _, h, w = b.pixels.shape
        assert n == len(b) and b.pixels.dtype == torch.float32
        assert b.pixels.min() >= -1.0 and b.pixels.max() <= 1.0
        assert all(t == (h, w) for t in b.target_sizes_hw)
        assert all(isinstance(c, str) and c for c in b.captions)
        assert b.loss_weights.tolist() == [0.5 if r else 1.0 for r in b.is_reg]
        assert b.network_multipliers.tolist() == [1.0] * n
        for path, cap in zip(b.paths, b.captions):
            first = "sdtdemo" if "10_" in str(path) or "2_sdtdemo" in str(path) else "shape"
            assert cap.split(", ")[0] == first  # keep_tokens=1 kept the trigger / class word first
    assert sum(b.is_reg.count(True) for b in batches) == 12


def test_threads_processes_and_serial_give_identical_batches(scan):
    serial = _summary(make_training_data([scan], LoaderOptions(seed=3, workers=0)).iter_epoch(2))
    threaded = _summary(make_training_data([scan], LoaderOptions(seed=3, workers=2)).iter_epoch(2))
    assert serial == threaded
    data = make_training_data([scan], LoaderOptions(seed=3, workers=1))
    procs = _summary(data.torch_loader(2, multiprocessing_context="fork"))
    assert procs == serial
    other_epoch = _summary(make_training_data([scan], LoaderOptions(seed=3, workers=0)).iter_epoch(3))
    assert other_epoch != serial


def test_resume_skips_batches_and_keeps_the_order(scan):
    data = make_training_data([scan], LoaderOptions(seed=5, workers=0))
    full = _summary(data.iter_epoch(1))
    assert _summary(data.iter_epoch(1, start_index=3)) == full[3:]


def test_rgba_corners_arrive_white_and_sizes_are_reported(demo):
    scan = scan_folder(demo.train_dir, dataset=replace(DS, batch_size=1))
    data = make_training_data([scan], LoaderOptions(workers=0))
    rgba = [b for b in data.iter_epoch(1) if b.paths[0].name == "0001.png"]
    assert rgba and all(b.pixels[0, :, 0, 0].tolist() == [1.0, 1.0, 1.0] for b in rgba)
    assert rgba[0].original_sizes_hw == [(64, 64)]


def test_flip_reports_the_crop_from_the_mirrored_side(tmp_path):
    folder = tmp_path / "t" / "1_x"
    folder.mkdir(parents=True)
    arr = np.zeros((64, 128, 3), np.uint8)
    arr[:, :8] = 255  # a white bar on the left edge only
    Image.fromarray(arr).save(folder / "wide.png")
    cfg = DatasetConfig(resolution=(64, 64), batch_size=1)
    scan = scan_folder(tmp_path / "t", dataset=cfg, subset=SubsetConfig(flip_aug=True, random_crop=True))
    data = make_training_data([scan], LoaderOptions(workers=0))
    seen = set()
    for epoch in range(1, 30):
        (b,) = list(data.iter_epoch(epoch))
        top, left = b.crop_top_lefts[0]
        assert top == 0 and 0 <= left <= 64
        seen.add(b.flipped[0])
        cols = (b.pixels[0, 0] > 0.9).any(0).nonzero().flatten().tolist()
        # output column c shows x = left + c of the (mirrored, if flipped) image; the bar is x 0..7 there
        # unmirrored and x 120..127 mirrored: the reported crop must say where the window really was
        want = [c for c in range(64) if ((left + c) >= 120 if b.flipped[0] else (left + c) < 8)]
        assert cols == want
    assert seen == {True, False}


def test_an_image_broken_after_the_scan_is_skipped_and_named(tmp_path):
    folder = tmp_path / "t" / "1_x"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (64, 64), (i * 50, 0, 0)).save(folder / f"{i}.png")
    scan = scan_folder(tmp_path / "t", dataset=DatasetConfig(resolution=(64, 64), batch_size=1))
    (folder / "1.png").write_bytes(b"broken now")
    batches = list(make_training_data([scan], LoaderOptions(workers=2)).iter_epoch(1))
    assert len(batches) == 2
    assert [p.name for b in batches for p, _ in b.skipped] == ["1.png"]


def test_two_datasets_keep_their_own_batch_size_and_multiplier(demo):
    a = scan_folder(demo.train_dir, dataset=replace(DS, batch_size=3, network_multiplier=0.5))
    b = scan_folder(demo.reg_dir, dataset=replace(DS, batch_size=1))
    data = make_training_data([a, b], LoaderOptions(workers=0))
    batches = list(data.iter_epoch(1))
    assert sum(len(x) for x in batches) == a.samples_per_epoch + b.samples_per_epoch
    for x in batches:
        assert len(x) <= (3 if x.key.dataset == 0 else 1)
        assert x.network_multipliers.tolist() == [0.5 if x.key.dataset == 0 else 1.0] * len(x)
    assert {x.key.dataset for x in batches[:6]} == {0, 1}  # interleaved, not one dataset after the other


def test_jpeg_draft_gives_the_same_batch_shape_and_nearly_the_same_pixels(tmp_path):
    folder = tmp_path / "t" / "1_x"
    folder.mkdir(parents=True)
    y, x = np.mgrid[0:768, 0:1024]
    Image.fromarray(np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)).save(folder / "a.jpg",
                                                                                            quality=95)
    cfg = DatasetConfig(resolution=(256, 256), enable_bucket=True, min_bucket_reso=128, max_bucket_reso=512)
    scan = scan_folder(tmp_path / "t", dataset=cfg)
    full = next(make_training_data([scan], LoaderOptions(workers=0)).iter_epoch(1))
    fast = next(make_training_data([scan], LoaderOptions(workers=0, jpeg_draft=True)).iter_epoch(1))
    assert full.pixels.shape == fast.pixels.shape and full.original_sizes_hw == fast.original_sizes_hw == [(768, 1024)]
    assert (full.pixels - fast.pixels).abs().mean() < 0.05
