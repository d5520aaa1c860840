"""The dataset part of a LoRA file's `ss_*` metadata, in sd-scripts' shapes (`train_network.py`).

Folder mode (`--train_data_dir`) writes flat keys; a dataset_config writes `ss_datasets` (one JSON
entry per dataset) plus merged `ss_tag_frequency` / `ss_dataset_dirs`. Values are strings as
sd-scripts writes them (`str(v)`, dicts as JSON), so metadata viewers read ours the same way.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from .buckets import BucketPlan
from .scan import DatasetScan


def _bucket_info(scan: DatasetScan, plan: BucketPlan):
    """sd-scripts writes bucket info only when bucketing is on (None otherwise)."""
    return plan.bucket_info() if scan.config.enable_bucket else None


def folder_mode_metadata(scan: DatasetScan, plan: BucketPlan) -> dict[str, str]:
    """Dataset keys sd-scripts writes without a dataset_config (one dataset from folders)."""
    cfg = scan.config
    sub = scan.subsets[0].config if scan.subsets else None
    bucket = cfg.enable_bucket
    return {
        "ss_num_train_images": str(scan.num_train_images),
        "ss_num_reg_images": str(scan.num_reg_images),
        "ss_resolution": str(tuple(cfg.resolution)),
        "ss_enable_bucket": str(bool(bucket)),
        "ss_bucket_no_upscale": str(bool(bucket and cfg.bucket_no_upscale)),
        "ss_min_bucket_reso": str(cfg.min_bucket_reso if bucket else None),
        "ss_max_bucket_reso": str(cfg.max_bucket_reso if bucket else None),
        "ss_color_aug": str(bool(sub and sub.color_aug)),
        "ss_flip_aug": str(bool(sub and sub.flip_aug)),
        "ss_random_crop": str(bool(sub and sub.random_crop)),
        "ss_shuffle_caption": str(bool(sub and sub.shuffle_caption)),
        "ss_keep_tokens": str(sub.keep_tokens if sub else 0),
        "ss_caption_dropout_rate": str(sub.caption_dropout_rate if sub else 0.0),
        "ss_caption_dropout_every_n_epochs": str(sub.caption_dropout_every_n_epochs if sub else 0),
        "ss_caption_tag_dropout_rate": str(sub.caption_tag_dropout_rate if sub else 0.0),
        "ss_dataset_dirs": json.dumps(scan.dataset_dirs()),
        "ss_reg_dataset_dirs": json.dumps(scan.dataset_dirs(reg=True)),
        "ss_tag_frequency": json.dumps(scan.tag_frequency()),
        "ss_bucket_info": json.dumps(_bucket_info(scan, plan)),
    }


def _subset_entry(sub, img_count: int) -> dict:
    """One subset as `ss_datasets[i].subsets[j]`."""
    entry = {
        "img_count": img_count, "num_repeats": sub.num_repeats, "color_aug": bool(sub.color_aug),
        "flip_aug": bool(sub.flip_aug), "random_crop": bool(sub.random_crop),
        "shuffle_caption": bool(sub.shuffle_caption), "keep_tokens": sub.keep_tokens,
        "keep_tokens_separator": sub.keep_tokens_separator, "secondary_separator": sub.secondary_separator,
        "enable_wildcard": bool(sub.enable_wildcard), "caption_prefix": sub.caption_prefix,
        "caption_suffix": sub.caption_suffix, "resize_interpolation": sub.resize_interpolation,
        "image_dir": os.path.basename(sub.image_dir.rstrip("/\\")),
        "class_tokens": sub.class_tokens, "is_reg": sub.is_reg,
    }
    return entry


def dataset_config_metadata(scans: Sequence[DatasetScan], plans: Sequence[BucketPlan]) -> dict[str, str]:
    """`ss_datasets`, `ss_tag_frequency` and `ss_dataset_dirs` as sd-scripts writes them for a dataset_config."""
    datasets, tag_frequency, dirs = [], {}, {}
    for scan, plan in zip(scans, plans):
        cfg = scan.config
        freq = scan.tag_frequency()
        datasets.append({
            "is_dreambooth": True, "batch_size_per_device": cfg.batch_size,
            "num_train_images": scan.num_train_images, "num_reg_images": scan.num_reg_images,
            "resolution": list(cfg.resolution), "enable_bucket": bool(cfg.enable_bucket),
            "min_bucket_reso": cfg.min_bucket_reso if cfg.enable_bucket else None,
            "max_bucket_reso": cfg.max_bucket_reso if cfg.enable_bucket else None,
            "tag_frequency": freq, "bucket_info": _bucket_info(scan, plan),
            "resize_interpolation": cfg.resize_interpolation,
            "subsets": [_subset_entry(s.config, s.img_count) for s in scan.subsets],
        })
        for s in scan.subsets:
            if s.config.is_reg:
                continue  # sd-scripts does not merge reg dirs
            base = name = os.path.basename(s.config.image_dir.rstrip("/\\"))
            i = 2
            while name in dirs:
                name = f"{base} ({i})"
                i += 1
            dirs[name] = {"n_repeats": s.config.num_repeats, "img_count": s.img_count}
        for d, f in freq.items():
            tag_frequency.setdefault(d, f)  # a folder used by several datasets is counted once
    return {"ss_datasets": json.dumps(datasets), "ss_tag_frequency": json.dumps(tag_frequency),
            "ss_dataset_dirs": json.dumps(dirs)}
