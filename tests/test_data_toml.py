"""sd-scripts dataset_config files: schema, precedence subset > dataset > general > defaults, unknown keys."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from lib_sdtune.data.config import DatasetConfig, SubsetConfig
from lib_sdtune.data.scan import scan_dataset_config
from lib_sdtune.data.toml_config import (
    folder_mode_templates,
    load_dataset_config,
    parse_dataset_config,
    split_train_args,
)
from lib_sdtune.errors import SdtuneError

DOC_EXAMPLE = """
[general]
shuffle_caption = true
caption_extension = ".txt"
keep_tokens = 1

[[datasets]]
resolution = 1024
batch_size = 2
enable_bucket = true
min_bucket_reso = 256
max_bucket_reso = 2048
bucket_reso_steps = 64
bucket_no_upscale = false
resize_interpolation = "lanczos"

  [[datasets.subsets]]
  image_dir = "train/10_sks woman"
  num_repeats = 10
  class_tokens = "sks woman"
  keep_tokens = 2

  [[datasets.subsets]]
  image_dir = "reg/1_woman"
  is_reg = true
  class_tokens = "woman"
  caption_extension = ".caption"

[[datasets]]
resolution = [768, 512]
keep_tokens = 3
  [[datasets.subsets]]
  image_dir = "other"
"""


def _write(tmp_path, text, name="ds.toml"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_sd_scripts_example_resolves_with_the_same_precedence(tmp_path):
    ds1, ds2 = load_dataset_config(_write(tmp_path, DOC_EXAMPLE), defaults={"flip_aug": True, "keep_tokens": 9})
    assert isinstance(ds1, DatasetConfig) and isinstance(ds1.subsets[0], SubsetConfig)
    assert ds1.resolution == (1024, 1024) and ds1.batch_size == 2 and ds1.enable_bucket
    assert ds1.max_bucket_reso == 2048 and ds1.resize_interpolation == "lanczos"
    a, b = ds1.subsets
    assert (a.num_repeats, a.class_tokens, a.keep_tokens, a.is_reg) == (10, "sks woman", 2, False)  # subset wins
    assert (b.keep_tokens, b.is_reg, b.caption_extension) == (1, True, ".caption")  # general, then subset
    assert a.shuffle_caption and a.caption_extension == ".txt"  # from [general]
    assert a.flip_aug and b.flip_aug  # from defaults (the command line's place)
    assert a.image_dir == str(tmp_path / "train" / "10_sks woman")  # relative to the config file
    assert ds2.resolution == (768, 512) and ds2.subsets[0].keep_tokens == 3  # dataset beats general
    assert ds2.batch_size == 1 and not ds2.enable_bucket  # sd-scripts defaults


def test_unknown_key_is_an_error_naming_it_and_the_nearest_key(tmp_path):
    bad = DOC_EXAMPLE.replace('  num_repeats = 10', '  num_repeats = 10\n  flip_augs = true')
    with pytest.raises(SdtuneError, match=r"datasets\[0\]\.subsets\[0\] has an unknown key 'flip_augs'.*'flip_aug'"):
        load_dataset_config(_write(tmp_path, bad))
    with pytest.raises(SdtuneError, match=r"\[general\] has an unknown key 'colour_aug'"):
        parse_dataset_config({"general": {"colour_aug": True}, "datasets": [{"subsets": [{"image_dir": "x"}]}]})
    with pytest.raises(SdtuneError, match="the top level has an unknown key 'dataset'"):
        parse_dataset_config({"dataset": []})


def test_keys_in_the_wrong_place_say_where_they_belong():
    with pytest.raises(SdtuneError, match="image_dir.*belongs in each"):
        parse_dataset_config({"datasets": [{"image_dir": "x", "subsets": [{"image_dir": "x"}]}]})
    with pytest.raises(SdtuneError, match="prior_loss_weight.*training option"):
        parse_dataset_config({"general": {"prior_loss_weight": 1.0}, "datasets": [{"subsets": [{"image_dir": "x"}]}]})
    with pytest.raises(SdtuneError, match="metadata_file.*not supported"):
        parse_dataset_config({"datasets": [{"subsets": [{"metadata_file": "m.json"}]}]})


def test_wrong_types_and_missing_parts_name_the_field():
    with pytest.raises(SdtuneError, match=r"datasets\[0\]\.subsets\[0\]\.num_repeats = '10': expected a whole number"):
        parse_dataset_config({"datasets": [{"subsets": [{"image_dir": "x", "num_repeats": "10"}]}]})
    with pytest.raises(SdtuneError, match="caption_dropout_rate.*probability"):
        parse_dataset_config({"general": {"caption_dropout_rate": 2}, "datasets": [{"subsets": [{"image_dir": "x"}]}]})
    with pytest.raises(SdtuneError, match="resize_interpolation.*lanczos"):
        parse_dataset_config({"datasets": [{"resize_interpolation": "fancy", "subsets": [{"image_dir": "x"}]}]})
    with pytest.raises(SdtuneError, match="no image_dir"):
        parse_dataset_config({"datasets": [{"subsets": [{"num_repeats": 1}]}]})
    with pytest.raises(SdtuneError, match=r"no \[\[datasets\]\]"):
        parse_dataset_config({"general": {}})


def test_invalid_toml_and_json_files_are_reported_with_their_path(tmp_path):
    with pytest.raises(SdtuneError, match="not valid TOML"):
        load_dataset_config(_write(tmp_path, "[general\nx = 1"))
    with pytest.raises(SdtuneError, match="not valid JSON"):
        load_dataset_config(_write(tmp_path, "{", "ds.json"))


def test_json_config_and_scan(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("tag one, tag two", encoding="utf-8")
    cfg = {"datasets": [{"subsets": [{"image_dir": str(tmp_path), "num_repeats": 3}]}]}
    p = _write(tmp_path, json.dumps(cfg), "ds.json")
    (scan,) = scan_dataset_config(p)
    assert scan.num_train_images == 3 and scan.records[0].caption == "tag one, tag two"


def test_training_settings_split_into_dataset_keys_and_the_rest(tmp_path):
    args = {"train_batch_size": 4, "resolution": "768,512", "enable_bucket": True, "flip_aug": True,
            "learning_rate": 1e-4, "network_dim": 16, "prior_loss_weight": 0.7, "keep_tokens": None}
    data, rest = split_train_args(args)
    assert data == {"batch_size": 4, "resolution": "768,512", "enable_bucket": True, "flip_aug": True,
                    "prior_loss_weight": 0.7}
    assert rest == {"learning_rate": 1e-4, "network_dim": 16, "keep_tokens": None}
    ds, sub = folder_mode_templates(data)
    assert (ds.batch_size, ds.resolution, ds.enable_bucket, ds.prior_loss_weight) == (4, (768, 512), True, 0.7)
    assert sub.flip_aug and sub.num_repeats == 1
    with pytest.raises(SdtuneError, match="batch_size = '4'"):
        folder_mode_templates({"batch_size": "4"})
    (cfg,) = parse_dataset_config({"datasets": [{"subsets": [{"image_dir": "x"}]}]}, defaults=data)
    assert cfg.batch_size == 4 and cfg.subsets[0].flip_aug and cfg.prior_loss_weight == 0.7
