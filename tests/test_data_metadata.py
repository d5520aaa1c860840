"""ss_* dataset metadata in sd-scripts' shapes, for folder mode and for dataset_config runs."""

from __future__ import annotations

import json
from dataclasses import replace

from lib_sdtune.data.buckets import plan_buckets
from lib_sdtune.data.config import DatasetConfig, SubsetConfig
from lib_sdtune.data.metadata import dataset_config_metadata, folder_mode_metadata
from lib_sdtune.data.scan import scan_dataset, scan_folder
from lib_sdtune.demo.dataset import DemoDatasetSpec, write_demo_dataset


def _plan(scan):
    return plan_buckets(scan.config, [r.size for r in scan.epoch_images], [r.repeats for r in scan.epoch_images])


def test_folder_mode_keys(tmp_path):
    demo = write_demo_dataset(tmp_path, DemoDatasetSpec(images_per_concept=4))
    cfg = DatasetConfig(resolution=(64, 64), enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128,
                        bucket_reso_steps=16)
    scan = scan_folder(demo.train_dir, demo.reg_dir, dataset=cfg, subset=SubsetConfig(flip_aug=True, keep_tokens=1))
    md = folder_mode_metadata(scan, _plan(scan))
    assert all(isinstance(v, str) for v in md.values())
    assert md["ss_num_train_images"] == "40" and md["ss_num_reg_images"] == "4"
    assert md["ss_flip_aug"] == "True" and md["ss_keep_tokens"] == "1" and md["ss_resolution"] == "(64, 64)"
    assert json.loads(md["ss_dataset_dirs"]) == {"10_sdtdemo shape": {"n_repeats": 10, "img_count": 4}}
    assert json.loads(md["ss_reg_dataset_dirs"]) == {"1_shape": {"n_repeats": 1, "img_count": 4}}
    freq = json.loads(md["ss_tag_frequency"])
    assert freq["10_sdtdemo shape"]["sdtdemo"] == 4
    info = json.loads(md["ss_bucket_info"])
    assert sum(b["count"] for b in info["buckets"].values()) == 80 and "mean_img_ar_error" in info
    no_bucket = replace(scan, config=replace(cfg, enable_bucket=False))
    assert folder_mode_metadata(no_bucket, _plan(no_bucket))["ss_bucket_info"] == "null"


def test_dataset_config_keys_merge_dirs_like_sd_scripts(tmp_path):
    demo = write_demo_dataset(tmp_path, DemoDatasetSpec(images_per_concept=3))
    concept = str(demo.train_dir / "10_sdtdemo shape")
    a = scan_dataset(DatasetConfig(subsets=(SubsetConfig(image_dir=concept, num_repeats=2),
                                            SubsetConfig(image_dir=str(demo.reg_dir / "1_shape"), is_reg=True))))
    b = scan_dataset(DatasetConfig(subsets=(SubsetConfig(image_dir=concept, num_repeats=5),), batch_size=2))
    md = dataset_config_metadata([a, b], [_plan(a), _plan(b)])
    datasets = json.loads(md["ss_datasets"])
    assert [d["batch_size_per_device"] for d in datasets] == [1, 2]
    assert datasets[0]["subsets"][1]["is_reg"] is True and datasets[0]["num_reg_images"] == 3
    assert json.loads(md["ss_dataset_dirs"]) == {"10_sdtdemo shape": {"n_repeats": 2, "img_count": 3},
                                                 "10_sdtdemo shape (2)": {"n_repeats": 5, "img_count": 3}}
    assert set(json.loads(md["ss_tag_frequency"])) == {"10_sdtdemo shape", "1_shape"}
