"""Dataset lint: each finding on a generated broken dataset, and fixes into a new folder or in place with a backup."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lib_sdtune.errors import SdtuneError
from lib_sdtune.tags.imagecheck import ImageFacts, dhash, near_duplicate_groups, thumbnail
from lib_sdtune.tags.lint import FixConfig, LintConfig, fix_dataset, lint_dataset


def textured(seed: int, size=(64, 64), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB").resize(size, Image.BILINEAR).convert(mode)


def make(root: Path) -> Path:
    d = root / "10_x"
    d.mkdir(parents=True)

    def put(name, img, caption="a, b"):
        img.save(d / name)
        if caption is not None:
            (d / name).with_suffix(".txt").write_bytes(caption if isinstance(caption, bytes) else caption.encode())

    put("good.png", textured(1))
    dup = textured(2)
    put("orig.png", dup)
    put("copy.jpg", dup.resize((60, 60)))  # re-encoded and resized: still a near-duplicate
    rgba = textured(3, mode="RGBA")
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    put("alpha.png", rgba)
    put("opaque_alpha.png", textured(4, mode="RGBA"))  # alpha channel, but fully opaque: fine
    put("tiny.png", textured(5, (16, 16)))
    put("wide.png", textured(6, (256, 64)))
    put("nocap.png", textured(7), None)
    put("empty.png", textured(8), "  ")
    put("bom.png", textured(9), b"\xef\xbb\xbfa, b")
    put("lines.png", textured(10), "a, b\nc")
    put("latin.png", textured(11), "caf\xe9".encode("latin-1"))
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (d / "lonely.txt").write_text("x", encoding="utf-8")
    return root


def kinds(report) -> dict:
    return {k: sorted(f.path.name for f in v) for k, v in report.by_kind().items()}


def test_every_kind_of_problem_is_found(tmp_path):
    report = lint_dataset(LintConfig(make(tmp_path), resolution=32))
    assert kinds(report) == {
        "unreadable": ["broken.png"], "transparent": ["alpha.png"], "tiny": ["tiny.png"], "aspect": ["wide.png"],
        "near_duplicate": ["orig.png"], "no_caption": ["broken.png", "nocap.png"], "empty_caption": ["empty.txt"],
        "caption_not_utf8": ["latin.txt"], "caption_bom": ["bom.txt"], "multiline_caption": ["lines.txt"],
        "orphan_caption": ["lonely.txt"]}
    dup = report.by_kind()["near_duplicate"][0]
    assert dup.related[0].name == "copy.jpg"  # the first in path order is kept
    assert json.loads(json.dumps(report.to_dict()))["counts"]["tiny"] == 1


def test_dhash_groups_resized_copies_not_different_images():
    a, b, c = textured(1), textured(1).resize((50, 50)), textured(2)
    assert bin(dhash(a) ^ dhash(b)).count("1") <= 4 < bin(dhash(a) ^ dhash(c)).count("1")
    facts = [ImageFacts(Path(n), 1, 1, False, dhash(im), thumbnail(im)) for n, im in (("a", a), ("b", b), ("c", c))]
    assert [[f.path.name for f in g] for g in near_duplicate_groups(facts, 4)] == [["a", "b"]]


def test_same_layout_in_other_colours_is_not_a_duplicate():
    def stripes(colour):
        img = Image.new("RGB", (64, 64), "white")
        for x in (8, 28, 48):
            img.paste(colour, (x, 0, x + 8, 64))
        return img

    red, purple = stripes((230, 20, 20)), stripes((140, 40, 190))
    assert dhash(red) == dhash(purple)  # the grey gradients agree...
    facts = [ImageFacts(Path(n), 1, 1, False, dhash(im), thumbnail(im)) for n, im in (("r", red), ("p", purple))]
    assert near_duplicate_groups(facts, 4) == []  # ...the colours do not


def test_tiny_means_noticeable_upscaling_not_a_bucket_just_below_the_area(tmp_path):
    for name, size in (("bucket.png", (896, 1152)), ("small.png", (640, 640))):
        textured(len(name), size).save(tmp_path / name)
    report = lint_dataset(LintConfig(tmp_path, resolution=1024))
    assert [f.path.name for f in report.by_kind()["tiny"]] == ["small.png"]
    assert "1.6x" in report.by_kind()["tiny"][0].detail


def test_fix_into_a_new_folder_leaves_the_dataset_alone(tmp_path):
    root = make(tmp_path / "ds")
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    out = tmp_path / "fixed"
    r = fix_dataset(FixConfig(LintConfig(root, resolution=32), output=out))
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
    names = sorted(p.name for p in (out / "10_x").iterdir())
    assert "broken.png" not in names and "orig.png" not in names and "copy.jpg" in names
    assert "tiny.png" in names and "wide.png" in names  # only reported unless asked
    with Image.open(out / "10_x" / "alpha.png") as img:
        assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255)
    assert (out / "10_x" / "bom.txt").read_bytes() == b"a, b"
    assert (out / "10_x" / "lines.txt").read_text() == "a, b, c"
    assert (out / "10_x" / "latin.txt").read_bytes() == "caf\xe9".encode("latin-1")  # copied, not guessed
    assert sorted(p.name for p, _ in r.dropped) == ["broken.png", "orig.png"] and r.backup is None
    again = lint_dataset(LintConfig(out, resolution=32))
    assert not {"unreadable", "transparent", "near_duplicate", "caption_bom", "multiline_caption"} & set(kinds(again))


def test_fix_in_place_moves_every_original_to_a_backup(tmp_path):
    root = make(tmp_path)
    orig_alpha = (root / "10_x" / "alpha.png").read_bytes()
    r = fix_dataset(FixConfig(LintConfig(root, resolution=32), in_place=True, drop_tiny=True))
    assert r.backup is not None and r.backup.parent.name == ".sdtune_backups"
    saved = sorted(p.relative_to(r.backup).as_posix() for p in r.backup.rglob("*") if p.is_file())
    assert saved == ["10_x/alpha.png", "10_x/bom.txt", "10_x/broken.png", "10_x/lines.txt", "10_x/orig.png",
                     "10_x/orig.txt", "10_x/tiny.png", "10_x/tiny.txt"]
    assert (r.backup / "10_x" / "alpha.png").read_bytes() == orig_alpha
    assert not (root / "10_x" / "tiny.png").exists() and (root / "10_x" / "bom.txt").read_bytes() == b"a, b"


def test_fix_refuses_unsafe_outputs(tmp_path):
    root = make(tmp_path / "ds")
    with pytest.raises(SdtuneError, match="outside the dataset"):
        fix_dataset(FixConfig(LintConfig(root), output=root / "sub"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(SdtuneError, match="not empty"):
        fix_dataset(FixConfig(LintConfig(root), output=tmp_path / "full"))
    with pytest.raises(SdtuneError, match="either"):
        fix_dataset(FixConfig(LintConfig(root)))
