"""Dataset scan: kohya folder mode, wrong folder level, broken files skipped and reported, counts and metadata."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from lib_sdtune.data.config import DatasetConfig, ScanOptions, SubsetConfig
from lib_sdtune.data.scan import parse_concept_folder_name, scan_dataset, scan_folder, scan_path
from lib_sdtune.demo.dataset import DemoDatasetSpec, write_demo_dataset
from lib_sdtune.errors import SdtuneError


def _img(path: Path, size=(64, 48), color=(200, 10, 10), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def _cap(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("demo"), DemoDatasetSpec(images_per_concept=6))


def test_folder_names_parse_as_sd_scripts_does():
    assert parse_concept_folder_name("10_sks woman") == (10, "sks woman")
    assert parse_concept_folder_name("3_my_char") == (3, "my_char")
    assert parse_concept_folder_name("5") == (5, "")
    assert parse_concept_folder_name("mychar") is None
    assert parse_concept_folder_name("0_x") == (0, "x")


def test_demo_dataset_scans_with_repeats_reg_balance_and_metadata(demo):
    scan = scan_folder(demo.train_dir, demo.reg_dir)
    assert [s.config.num_repeats for s in scan.subsets] == [10, 1]
    assert [s.config.is_reg for s in scan.subsets] == [False, True]
    assert scan.subsets[0].config.class_tokens == "sdtdemo shape"
    assert len(scan.train_images) == 6 and scan.num_train_images == 60
    assert scan.num_reg_images == 6
    # sd-scripts: 6 reg images x 1 repeat < 60 train samples -> repeats raised round-robin to 60 samples
    assert sum(r.repeats for r in scan.reg_images) == 60
    assert scan.samples_per_epoch == 120
    assert scan.dataset_dirs() == {"10_sdtdemo shape": {"n_repeats": 10, "img_count": 6}}
    assert scan.dataset_dirs(reg=True) == {"1_shape": {"n_repeats": 1, "img_count": 6}}
    freq = scan.tag_frequency()
    assert set(freq) == {"10_sdtdemo shape", "1_shape"}
    assert freq["10_sdtdemo shape"]["sdtdemo"] == 6 and freq["1_shape"]["shape"] == 6
    for rec, (path, caption) in zip(scan.train_images, demo.train_items):
        assert rec.path == path and rec.caption == caption
    assert scan.warnings == () and scan.skipped == ()


def test_surplus_reg_images_are_unused(tmp_path):
    _img(tmp_path / "train" / "1_a" / "x.png")
    for i in range(3):
        _img(tmp_path / "reg" / "1_b" / f"{i}.png")
    scan = scan_folder(tmp_path / "train", tmp_path / "reg")
    assert [r.repeats for r in scan.records if r.is_reg] == [1, 0, 0]
    assert len(scan.reg_images) == 1 and scan.samples_per_epoch == 2
    assert any("some reg images are not used" in w for w in scan.warnings)


def test_concept_folder_given_directly_says_point_at_the_parent(demo):
    concept = demo.train_dir / "10_sdtdemo shape"
    with pytest.raises(SdtuneError, match="Point at the parent folder") as e:
        scan_folder(concept)
    assert str(demo.train_dir) in str(e.value) and "10 repeats" in str(e.value)


def test_concept_folder_accepted_as_one_concept_with_one_repeat_when_asked(demo):
    scan = scan_folder(demo.train_dir / "10_sdtdemo shape", options=ScanOptions(accept_concept_folder=True))
    assert scan.subsets[0].config.num_repeats == 1 and scan.num_train_images == 6
    assert scan.subsets[0].config.class_tokens == "sdtdemo shape"
    assert any("one concept with 1 repeat" in w for w in scan.warnings)


def test_grandparent_folder_names_the_right_one(demo):
    with pytest.raises(SdtuneError, match="point at") as e:
        scan_folder(demo.root)
    assert str(demo.train_dir) in str(e.value) or str(demo.reg_dir) in str(e.value)


def test_folder_without_repeat_folders_explains_the_layout(tmp_path):
    _img(tmp_path / "data" / "pics" / "a.png")
    with pytest.raises(SdtuneError, match="<repeats>_<name>"):
        scan_folder(tmp_path / "data")


def test_broken_files_are_skipped_named_and_reported(tmp_path):
    folder = tmp_path / "train" / "2_thing"
    good = _img(folder / "good.png")
    _cap(folder / "good.txt", "thing, red")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (folder / "empty.jpg").write_bytes(b"")
    _img(folder / "latin1.png")
    _cap(folder / "latin1.txt", "caf\xe9, red".encode("latin-1"))
    _img(folder / "bom.png")
    _cap(folder / "bom.txt", b"\xef\xbb\xbfthing, bom tag\nsecond line ignored\n")
    _img(folder / "blank.png")
    _cap(folder / "blank.txt", "\n")
    _img(folder / "nocap.PNG")
    scan = scan_folder(tmp_path / "train")
    names = {r.path.name: r for r in scan.records}
    assert set(names) == {"good.png", "bom.png", "blank.png", "nocap.PNG"}
    assert names["good.png"].caption == "thing, red" and names["good.png"].path == good
    assert names["bom.png"].caption == "thing, bom tag"  # BOM dropped, first line only
    assert names["blank.png"].caption == "thing" and names["nocap.PNG"].caption == "thing"
    skipped = {s.path.name: s.reason for s in scan.skipped}
    assert set(skipped) == {"corrupt.png", "empty.jpg", "latin1.txt"}
    assert "UTF-8" in skipped["latin1.txt"]
    text = "\n".join(scan.warnings)
    for name in ("corrupt.png", "empty.jpg", "latin1.txt", "blank.txt"):
        assert name in text
    assert "no .txt caption file" in text and "nocap.PNG" in text
    assert scan.num_train_images == 8


def test_caption_extension_fallback_and_face_crop_stem(tmp_path):
    folder = tmp_path / "t" / "1_x"
    _img(folder / "a.png")
    _cap(folder / "a.caption", "from caption file")
    _img(folder / "face_10_20_30_40.png")
    _cap(folder / "face.txt", "face stem")
    scan = scan_folder(tmp_path / "t")
    caps = {r.path.name: r.caption for r in scan.records}
    assert caps == {"a.png": "from caption file", "face_10_20_30_40.png": "face stem"}


def test_one_image_dataset(tmp_path):
    _img(tmp_path / "t" / "20_solo" / "only.webp", size=(80, 80))
    scan = scan_folder(tmp_path / "t")
    assert len(scan.records) == 1 and scan.num_train_images == 20 and scan.records[0].size == (80, 80)


def test_no_images_at_all_is_an_error_that_names_the_folder(tmp_path):
    (tmp_path / "t" / "10_x").mkdir(parents=True)
    _cap(tmp_path / "t" / "10_x" / "a.txt", "caption without image")
    with pytest.raises(SdtuneError, match="no training images"):
        scan_folder(tmp_path / "t")


def test_odd_folders_are_skipped_with_warnings(tmp_path):
    _img(tmp_path / "t" / "5_ok" / "a.png")
    _img(tmp_path / "t" / "0_zero" / "a.png")
    _img(tmp_path / "t" / "norepeats" / "a.png")
    _img(tmp_path / "t" / "stray.png")
    scan = scan_folder(tmp_path / "t")
    assert [s.config.class_tokens for s in scan.subsets] == ["ok"]
    text = "\n".join(scan.warnings)
    assert "0_zero" in text and "norepeats" in text and "directly in this folder are not used" in text


def test_validation_split_holds_out_images_like_sd_scripts(tmp_path):
    for i in range(10):
        _img(tmp_path / "t" / "2_x" / f"{i}.png")
    cfg = DatasetConfig(subsets=(SubsetConfig(image_dir=str(tmp_path / "t" / "2_x"), num_repeats=2),),
                        validation_split=0.2, validation_seed=1)
    scan = scan_dataset(cfg)
    assert len(scan.validation_images) == 2 and len(scan.train_images) == 8
    assert scan.num_train_images == 16 and scan.subsets[0].img_count == 8
    assert scan_dataset(cfg).validation_images == scan.validation_images  # seeded
    val = scan.validation_scan()
    assert val.num_train_images == 2 and {r.path for r in val.train_images} == {r.path for r in
                                                                                scan.validation_images}


def test_scan_path_takes_a_folder_or_a_dataset_config(demo, tmp_path):
    (folder_scan,) = scan_path(demo.train_dir)
    assert folder_scan.num_train_images == 60
    toml = tmp_path / "ds.toml"
    toml.write_text(f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{demo.train_dir / "10_sdtdemo shape"}"\n'
                    f'num_repeats = 3\n', encoding="utf-8")
    (cfg_scan,) = scan_path(toml, defaults={"batch_size": 2})
    assert cfg_scan.num_train_images == 18 and cfg_scan.config.batch_size == 2
    with pytest.raises(SdtuneError, match="lists its own reg folders"):
        scan_path(toml, demo.reg_dir)
    with pytest.raises(SdtuneError, match="is a file"):
        scan_path(demo.train_items[0][0])


def test_report_lists_folders_counts_and_skipped_files(tmp_path):
    _img(tmp_path / "t" / "3_a" / "ok.png")
    (tmp_path / "t" / "3_a" / "bad.png").write_bytes(b"nope")
    text = scan_folder(tmp_path / "t").report()
    assert "3_a: 1 image(s) x 3 repeat(s), 1 without a caption" in text
    assert "3 training sample(s) per epoch" in text
    assert "skipped 1 file(s):" in text and "bad.png" in text


def test_sd_scripts_options_sdtune_does_not_apply_are_said_out_loud(tmp_path):
    _img(tmp_path / "a" / "x.png")
    cfg = DatasetConfig(subsets=(SubsetConfig(image_dir=str(tmp_path / "a"), alpha_mask=True,
                                              face_crop_aug_range=(2.0, 4.0)),))
    assert any("face_crop_aug_range and alpha_mask are accepted" in w for w in scan_dataset(cfg).warnings)
