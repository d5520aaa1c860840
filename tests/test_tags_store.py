"""Loading captions (kohya folders, BOM, non-UTF-8, extensions) and the statistics computed from them."""

import json
from pathlib import Path

import pytest
from PIL import Image

from lib_sdtune.demo.dataset import DemoDatasetSpec, write_demo_dataset
from lib_sdtune.errors import SdtuneError
from lib_sdtune.tags.stats import StatsConfig, compute_stats, tag_stats
from lib_sdtune.tags.store import LoadConfig, load_captions


def image(path: Path, color=(200, 10, 10), size=(8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def make_dataset(root: Path) -> Path:
    """Two kohya folders and a sub-folder; every kind of caption problem once."""
    a, b = root / "10_alice", root / "1_girl"
    image(a / "one.png").with_suffix(".txt").write_text("alice, 1girl, blue hair, smile", encoding="utf-8")
    image(a / "two.JPG").with_suffix(".txt").write_bytes(b"\xef\xbb\xbfalice, 1girl, red eyes\n")
    image(a / "three.webp").with_suffix(".txt").write_text("alice,1girl,,smile , smile", encoding="utf-8")
    image(a / "sub" / "four.jpeg").with_suffix(".txt").write_text("alice, 1girl\nsecond line", encoding="utf-8")
    image(b / "five.bmp").with_suffix(".txt").write_text("1girl, smile", encoding="utf-8")
    image(b / "six.png")  # no caption
    image(b / "seven.png").with_suffix(".txt").write_text("  \n", encoding="utf-8")  # empty caption
    image(b / "eight.png").with_suffix(".txt").write_bytes("caf\xe9, 1girl".encode("latin-1"))  # not UTF-8
    (b / "orphan.txt").write_text("lonely", encoding="utf-8")
    image(root / ".sdtune_backups" / "hidden.png")  # hidden folders are skipped
    return root


def by_name(store):
    return {it.image.name: it for it in store.items}


def test_load_finds_images_recursively_with_any_extension_case(tmp_path):
    store = load_captions(make_dataset(tmp_path))
    items = by_name(store)
    assert set(items) == {"one.png", "two.JPG", "three.webp", "four.jpeg", "five.bmp", "six.png", "seven.png",
                          "eight.png"}
    assert items["one.png"].tags == ["alice", "1girl", "blue hair", "smile"]
    assert items["three.webp"].tags == ["alice", "1girl", "smile", "smile"]  # empties dropped, repeats kept
    assert items["two.JPG"].tags == ["alice", "1girl", "red eyes"] and items["two.JPG"].bom
    assert items["four.jpeg"].tags == ["alice", "1girl", "second line"] and items["four.jpeg"].multiline
    assert not items["six.png"].has_caption and items["seven.png"].has_caption and items["seven.png"].tags == []
    assert [p.name for p in store.orphan_captions] == ["orphan.txt"]


def test_non_utf8_caption_is_reported_by_name_not_raised(tmp_path):
    store = load_captions(make_dataset(tmp_path))
    bad = store.unreadable()
    assert [it.caption.name for it in bad] == ["eight.txt"]
    assert "UTF-8" in bad[0].error and bad[0].tags == []


def test_caption_extension_is_configurable(tmp_path):
    image(tmp_path / "a.png").with_suffix(".caption").write_text("x, y", encoding="utf-8")
    (tmp_path / "a.txt").write_text("other", encoding="utf-8")
    assert load_captions(tmp_path, LoadConfig(".caption")).items[0].tags == ["x", "y"]
    assert load_captions(tmp_path).items[0].tags == ["other"]
    with pytest.raises(SdtuneError, match="caption extension"):
        LoadConfig(".png")


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(SdtuneError, match="not a folder"):
        load_captions(tmp_path / "nope")


def test_stats_frequency_and_ss_tag_frequency_shape(tmp_path):
    stats = compute_stats(load_captions(make_dataset(tmp_path)))
    freq = dict(stats.frequency)
    assert freq["1girl"] == 5 and freq["alice"] == 4 and freq["smile"] == 3  # images per tag
    assert stats.frequency[0] == ("1girl", 5)
    # sd-scripts: per image-folder basename, every occurrence, lower-cased
    assert set(stats.ss_tag_frequency) == {"10_alice", "sub", "1_girl"}
    assert stats.ss_tag_frequency["10_alice"]["smile"] == 3 and stats.ss_tag_frequency["sub"] == {
        "alice": 1, "1girl": 1, "second line": 1}
    assert all(isinstance(v, int) for d in stats.ss_tag_frequency.values() for v in d.values())
    assert [p.name for p in stats.without_caption] == ["six.png"]
    assert [p.name for p in stats.empty_captions] == ["seven.txt"]
    assert [p.name for p, _ in stats.unreadable_captions] == ["eight.txt"]
    assert stats.on_every_image == []  # "five" and "seven" lack alice
    assert stats.images == 8 and stats.captioned == 7
    assert stats.tags_per_image["max"] == 4 and stats.tags_per_image["min"] == 0
    d = json.loads(json.dumps(stats.to_dict()))
    assert d["frequency"]["1girl"] == 5 and d["unique_tags"] == len(stats.frequency)


def test_trigger_word_candidates_on_the_demo_dataset(tmp_path):
    demo = write_demo_dataset(tmp_path, DemoDatasetSpec(images_per_concept=4))
    stats = tag_stats(StatsConfig(demo.train_dir))
    assert stats.on_every_image[:1] == ["sdtdemo"] or "sdtdemo" in stats.on_every_image
    assert list(stats.ss_tag_frequency) == ["10_sdtdemo shape"]
    assert stats.ss_tag_frequency["10_sdtdemo shape"]["sdtdemo"] == 4


def test_symlinked_folders_are_followed_once_without_looping(tmp_path):
    image(tmp_path / "real" / "a.png").with_suffix(".txt").write_text("x", encoding="utf-8")
    (tmp_path / "real" / "loop").symlink_to(tmp_path, target_is_directory=True)
    (tmp_path / "alias").symlink_to(tmp_path / "real", target_is_directory=True)
    store = load_captions(tmp_path)
    assert [it.image.name for it in store.items] == ["a.png"]


def test_ss_tag_frequency_lower_cases_like_sd_scripts(tmp_path):
    image(tmp_path / "5_x" / "a.png").with_suffix(".txt").write_text("Blue Hair, blue hair, Smile", encoding="utf-8")
    image(tmp_path / "5_x" / "b.png").with_suffix(".txt").write_text("BLUE HAIR", encoding="utf-8")
    stats = compute_stats(load_captions(tmp_path))
    assert stats.ss_tag_frequency == {"5_x": {"blue hair": 3, "smile": 1}}
