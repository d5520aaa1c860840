"""Tests for lib_sdtune.demo.dataset: kohya folder layout, captions true to the pixels, reproducible atomic writes."""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lib_sdtune.demo.dataset import BACKGROUNDS, OUTLINE, PALETTE, DemoDataset, DemoDatasetSpec, write_demo_dataset

IMAGE_EXTS = {".png", ".jpg"}
# Measured over 240 seeds at 64-96 px: solidity (pixels / convex hull) is <= 0.58 for stars and >= 0.87 for the
# rest; bounding-box fill is 1.0 for squares, 0.77-0.79 for circles and 0.51-0.53 for triangles.
SOLIDITY_STAR_MAX = 0.72
FILL = {"square": 1.0, "circle": 0.78, "triangle": 0.52}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[int, DemoDataset]:
    """Default-spec datasets for three seeds, written once and only read by the tests that use them."""
    return {s: write_demo_dataset(tmp_path_factory.mktemp(f"seed{s}"), DemoDatasetSpec(seed=s)) for s in range(3)}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask (a star's thin tip may touch only diagonally)."""
    seen = np.zeros_like(mask)
    out = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        comp = np.zeros_like(mask)
        queue = deque([(y0, x0)])
        seen[y0, x0] = True
        while queue:
            y, x = queue.popleft()
            comp[y, x] = True
            for ny, nx in ((y + dy, x + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        out.append(comp)
    return out


def _hull_area(points: list[tuple[int, int]]) -> float:
    """Area of the convex hull of integer points (Andrew's monotone chain + shoelace)."""

    def half(seq: list[tuple[int, int]]) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for p in seq:
            while len(out) >= 2 and (out[-1][0] - out[-2][0]) * (p[1] - out[-2][1]) <= (out[-1][1] - out[-2][1]) * (
                p[0] - out[-2][0]
            ):
                out.pop()
            out.append(p)
        return out

    pts = sorted(set(points))
    hull = half(pts)[:-1] + half(pts[::-1])[:-1]
    return 0.5 * abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(hull, hull[1:] + hull[:1])))


def _shape_of(comp: np.ndarray) -> str:
    """Name a drawn shape from its pixels: stars are far from convex; the rest differ in bounding-box fill."""
    ys, xs = np.nonzero(comp)
    corners = [(x + dx, y + dy) for y, x in zip(ys.tolist(), xs.tolist()) for dx in (0, 1) for dy in (0, 1)]
    if comp.sum() / _hull_area(corners) < SOLIDITY_STAR_MAX:
        return "star"
    fill = comp.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
    return min(FILL, key=lambda k: abs(FILL[k] - fill))


def test_folder_names_parse_as_repeats_underscore_class_tokens(tmp_path: Path) -> None:
    ds = write_demo_dataset(tmp_path, DemoDatasetSpec(repeats=7))
    assert ds.train_dir == tmp_path / "train" and ds.reg_dir == tmp_path / "reg"  # parents, not concept folders
    parsed = {}
    for parent in (ds.train_dir, ds.reg_dir):
        (folder,) = [d for d in parent.iterdir() if d.is_dir()]
        repeats, *rest = folder.name.split("_")  # exactly how kohya's config_util parses it
        parsed[parent.name] = (int(repeats), "_".join(rest))
    assert parsed == {"train": (7, "sdtdemo shape"), "reg": (1, "shape")}


def test_every_image_has_a_caption_led_by_trigger_or_class_word(datasets: dict[int, DemoDataset]) -> None:
    ds = datasets[0]
    on_disk = sorted(p for p in ds.root.rglob("*") if p.suffix in IMAGE_EXTS)
    assert on_disk == sorted(p for p, _ in ds.items) and len(on_disk) == 24
    for img in on_disk:
        text = img.with_suffix(".txt").read_text(encoding="utf-8")
        assert text.endswith("\n") and text.count("\n") == 1
        tags = text.strip().split(", ")
        assert dict(ds.items)[img] == text.strip() and len(tags) == len(set(tags)) >= 4
        if img.parent.parent == ds.train_dir:
            assert tags[0] == ds.trigger
        else:
            assert tags[0] == ds.class_word and ds.trigger not in tags
    assert len(ds.train_items) == len(ds.reg_items) == 12


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_png_colours_and_background_are_exactly_the_tagged_ones(datasets: dict[int, DemoDataset], seed: int) -> None:
    ds = datasets[seed]
    checked = 0
    for path, caption in ds.items:
        tags = caption.split(", ")
        im = Image.open(path)
        if path.suffix != ".png" or im.mode == "L":
            continue
        px = np.asarray(im.convert("RGBA")).reshape(-1, 4)
        opaque = {tuple(int(v) for v in p[:3]) for p in np.unique(px[px[:, 3] == 255], axis=0)}
        drawn = {name for name, rgb in PALETTE.items() if rgb in opaque}
        assert drawn == {t for t in tags if t in PALETTE}, caption
        allowed = {PALETTE[c] for c in drawn} | {OUTLINE}
        if im.mode == "RGBA":
            assert "transparent background" in tags and px[0, 3] == 0
        else:
            (bg,) = [b for b in BACKGROUNDS if f"{b} background" in tags]
            assert tuple(px[0, :3]) == BACKGROUNDS[bg]
            allowed.add(BACKGROUNDS[bg])
        assert opaque <= allowed, caption  # nothing drawn that the caption does not account for
        assert (OUTLINE in opaque) == (tags[0] == ds.trigger)  # the untagged trait belongs to the trigger only
        checked += 1
    assert checked >= 12


def test_jpeg_dominant_foreground_colour_is_a_tagged_colour(datasets: dict[int, DemoDataset]) -> None:
    names = list(PALETTE)
    refs = np.array([PALETTE[n] for n in names] + list(BACKGROUNDS.values()) + [OUTLINE], dtype=float)
    checked = 0
    for ds in datasets.values():
        for path, caption in ds.items:
            if path.suffix != ".jpg":
                continue
            px = np.asarray(Image.open(path).convert("RGB"), dtype=float).reshape(-1, 3)
            nearest = np.argmin(((px[:, None, :] - refs[None]) ** 2).sum(-1), axis=1)
            counts = np.bincount(nearest[nearest < len(names)], minlength=len(names))
            assert names[int(counts.argmax())] in caption.split(", "), caption
            checked += 1
    assert checked >= 12


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shape_stripe_and_count_tags_match_the_geometry(datasets: dict[int, DemoDataset], seed: int) -> None:
    for path, caption in datasets[seed].items:
        if path.suffix != ".png":
            continue
        tags = caption.split(", ")
        a = np.asarray(Image.open(path).convert("RGBA"))
        if "stripes" in tags:
            lines = a if "horizontal stripes" in tags else a.transpose(1, 0, 2)
            assert all(len(np.unique(line, axis=0)) == 1 for line in lines), caption
            assert len(np.unique(lines[:, 0], axis=0)) > 1
            continue
        comps = _components((a != a[0, 0]).any(-1))
        assert ("solo" in tags) == (len(comps) == 1) and ("multiple" in tags) == (len(comps) > 1), caption
        assert {_shape_of(c) for c in comps} == {t for t in tags if t in (*FILL, "star")}, caption


def test_promised_aspect_ratios_modes_and_formats_are_present(datasets: dict[int, DemoDataset]) -> None:
    ds = datasets[0]
    images = {p: Image.open(p) for p, _ in ds.items}
    assert {im.size for im in images.values()} == {(64, 64), (64, 48), (48, 64)}
    assert {p.suffix for p in images} == {".png", ".jpg"}
    rgba = [im for im in images.values() if im.mode == "RGBA"]
    assert 1 <= len(rgba) <= 2
    for im in rgba:
        alpha = np.asarray(im)[..., 3]
        assert alpha.min() == 0 and alpha.max() == 255
    (grey_path,) = [p for p, im in images.items() if im.mode == "L"]
    caption = dict(ds.items)[grey_path].split(", ")
    assert {"greyscale", "monochrome"} <= set(caption) and not set(caption) & set(PALETTE)
    assert len(np.unique(np.asarray(images[grey_path]))) >= 2


def test_same_seed_gives_identical_bytes_and_another_seed_differs(
    tmp_path: Path, datasets: dict[int, DemoDataset]
) -> None:
    a = _files(datasets[0].root)
    b = _files(write_demo_dataset(tmp_path, DemoDatasetSpec(seed=0)).root)
    c = _files(datasets[1].root)
    assert a == b
    assert a.keys() == c.keys()  # same layout, different content
    assert sum(a[k] != c[k] for k in a if not k.endswith(".txt")) >= 20


def test_rerun_replaces_files_in_place_and_leaves_no_temp_or_stale_files(tmp_path: Path) -> None:
    first = _files(write_demo_dataset(tmp_path).root)
    concept = tmp_path / "train" / "10_sdtdemo shape"
    (concept / "0000.png").write_bytes(b"corrupt")
    (concept / ".0003.jpg.abc123.tmp").write_bytes(b"left by a killed run")
    (concept / "0099.png").write_bytes(b"from a bigger run")
    (concept / "notes.md").write_text("user file", encoding="utf-8")
    write_demo_dataset(tmp_path)
    after = _files(tmp_path)
    assert after.pop("train/10_sdtdemo shape/notes.md") == b"user file"
    assert after == first
    # Other repeats: kohya would also train a leftover `10_` folder, so its demo files go (user files stay).
    write_demo_dataset(tmp_path, DemoDatasetSpec(repeats=3, reg_repeats=2))
    assert [p.name for p in concept.iterdir()] == ["notes.md"]
    assert [d.name for d in (tmp_path / "reg").iterdir()] == ["2_shape"]
    assert len(list((tmp_path / "train" / "3_sdtdemo shape").iterdir())) == 24
    assert not any(p.name.endswith(".tmp") for p in tmp_path.rglob("*"))


def test_spec_rejects_values_kohya_would_skip_or_misparse() -> None:
    for bad in ({"repeats": 0}, {"trigger": "a, b"}, {"class_word": " "}, {"formats": ("gif",)}, {"resolution": 8}):
        with pytest.raises(ValueError):
            DemoDatasetSpec(**bad)


def test_default_dataset_writes_quickly(tmp_path: Path) -> None:
    start = time.perf_counter()
    write_demo_dataset(tmp_path)
    assert time.perf_counter() - start < 2.0  # typically ~0.1-0.3 s, mostly fsync; generous for slow CI disks
