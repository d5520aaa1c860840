"""Procedural demo dataset in kohya's DreamBooth folder layout, so `demo` and tests need no downloads.

Layout (pass `train_dir`/`reg_dir`, the *parents*, as `--train_data_dir`/`--reg_data_dir`)::

    root/train/<repeats>_<trigger> <class>/0000.png + 0000.txt ...
    root/reg/<reg_repeats>_<class>/0000.png + 0000.txt ...

Captions are comma-separated booru-style tags that are true for the pixels: the trigger word (train) or the
class word (reg) first, then shape kinds, colour names, "solo"/"multiple", stripe direction and background.
The trigger concept's untagged trait is a dark outline round every shape (on white or grey only), for the
trigger word to absorb; reg images never have it.  Output is byte-identical for the same spec (fixed
encoder options, seeded RNG).
"""

from __future__ import annotations

import io
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from ..io.atomic import atomic_write

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "orange": (255, 140, 0),
    "yellow": (245, 215, 0),
    "green": (20, 170, 40),
    "aqua": (0, 200, 220),
    "blue": (25, 70, 230),
    "purple": (140, 40, 190),
    "pink": (255, 105, 180),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "grey": (128, 128, 128), "black": (0, 0, 0)}
OUTLINE = (24, 24, 24)
SHAPES = ("circle", "square", "triangle", "star", "stripes")
RGBA_INDICES = (1, 8)  # train images with a transparent background (always PNG)
GREY_INDEX = 2  # the train image saved in mode "L"
_DEMO_FILE = re.compile(r"^\.?\d{4}\.(png|jpg|txt|caption)(\..+\.tmp)?$")  # our files and atomic_write temps


@dataclass(frozen=True)
class DemoDatasetSpec:
    """What to generate; the defaults (12 train + 12 reg images at 64 px) write in a few milliseconds."""

    images_per_concept: int = 12
    resolution: int = 64
    repeats: int = 10
    reg_repeats: int = 1
    trigger: str = "sdtdemo"
    class_word: str = "shape"
    seed: int = 0
    formats: tuple[str, ...] = ("png", "png", "png", "jpg")  # cycled by image index
    caption_extension: str = ".txt"

    def __post_init__(self) -> None:
        """Reject specs that kohya would skip or that cannot be drawn, rather than writing a broken dataset."""
        if self.images_per_concept < 1 or self.repeats < 1 or self.reg_repeats < 1:
            raise ValueError("images_per_concept, repeats and reg_repeats must be >= 1")
        if self.resolution < 64:
            raise ValueError("resolution must be >= 64 (smaller stars and triangles stop being recognisable)")
        for word in (self.trigger, self.class_word):
            if not word.strip() or any(c in word for c in ",/\\\n") or word != word.strip():
                raise ValueError(f"bad concept word {word!r}: no commas, slashes, newlines or edge spaces")
        if not self.formats or set(self.formats) - {"png", "jpg"}:
            raise ValueError("formats must be a non-empty sequence of 'png'/'jpg'")
        if not self.caption_extension.startswith("."):
            raise ValueError("caption_extension must start with '.'")

    @property
    def train_folder(self) -> str:
        """Concept folder name `<repeats>_<trigger> <class>` as kohya parses it."""
        return f"{self.repeats}_{self.trigger} {self.class_word}"

    @property
    def reg_folder(self) -> str:
        """Regularization folder name `<reg_repeats>_<class>`."""
        return f"{self.reg_repeats}_{self.class_word}"


@dataclass(frozen=True)
class DemoDataset:
    """What was written: parents for kohya's data-dir arguments and every (image, caption) pair."""

    root: Path
    train_dir: Path
    reg_dir: Path
    trigger: str
    class_word: str
    items: tuple[tuple[Path, str], ...]

    @property
    def train_items(self) -> list[tuple[Path, str]]:
        """(image, caption) pairs of the trigger concept."""
        return [it for it in self.items if it[0].parent.parent == self.train_dir]

    @property
    def reg_items(self) -> list[tuple[Path, str]]:
        """(image, caption) pairs of the regularization (class) concept."""
        return [it for it in self.items if it[0].parent.parent == self.reg_dir]


def _polygon(cx: float, cy: float, r: float, kind: str) -> list[tuple[float, float]]:
    """Vertices of an upright equilateral triangle or five-pointed star inscribed in radius r."""
    if kind == "triangle":
        return [(cx + r * math.cos(math.radians(a)), cy + r * math.sin(math.radians(a))) for a in (-90, 30, 150)]
    pts = []
    for i in range(10):
        rad, ang = (r if i % 2 == 0 else 0.4 * r), math.radians(-90 + 36 * i)
        pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
    return pts


def _draw_shape(
    draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, fill: tuple, outline: dict
) -> None:
    """Draw one filled shape centred at (cx, cy) of radius r, with the concept's outline if any."""
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, **outline)
    elif kind == "square":
        s = 0.85 * r
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill, **outline)
    else:
        draw.polygon(_polygon(cx, cy, r, kind), fill=fill, **outline)


def _make_image(rng: random.Random, size: tuple[int, int], mode: str, outlined: bool) -> tuple[Image.Image, list[str]]:
    """Draw one random picture and return it with the tags that describe it (without the leading word)."""
    w, h = size
    if mode == "L":
        bg_name = "white"  # every palette colour stays visible against white once converted to luma
    else:
        bg_name = rng.choice(["white", "grey"] if outlined else list(BACKGROUNDS))
    bg = (0, 0, 0, 0) if mode == "RGBA" else BACKGROUNDS[bg_name]
    img = Image.new("RGBA" if mode == "RGBA" else "RGB", size, bg)
    draw = ImageDraw.Draw(img)
    ow = max(1, round(min(w, h) / 32))
    outline = {"outline": OUTLINE + ((255,) if mode == "RGBA" else ()), "width": ow} if outlined else {}
    alpha = (255,) if mode == "RGBA" else ()
    kinds: list[str] = []
    colours: list[str] = []
    extra: list[str] = []
    if rng.random() < 0.2:  # stripes: 2-3 bands of one or two colours across the whole picture
        horizontal, bands = rng.random() < 0.5, rng.randint(2, 3)
        cycle = rng.sample(list(PALETTE), rng.randint(1, 2))
        extent = h if horizontal else w
        step = extent / (2 * bands + 1)
        for b in range(bands):
            name = cycle[b % len(cycle)]
            a, z = round((2 * b + 1) * step), round((2 * b + 2) * step) - 1
            box = (-ow, a, w - 1 + ow, z) if horizontal else (a, -ow, z, h - 1 + ow)
            draw.rectangle(box, fill=PALETTE[name] + alpha, **outline)
            colours.append(name)
        kinds.append("stripes")
        extra.append("horizontal stripes" if horizontal else "vertical stripes")
    else:
        count = 1 if rng.random() < 0.6 else rng.randint(2, 4)
        if count == 1:
            cells, cw, ch = [(0, 0)], w, h
            r = rng.uniform(0.25, 0.42) * min(w, h)
        else:
            cells, cw, ch = rng.sample([(0, 0), (1, 0), (0, 1), (1, 1)], count), w / 2, h / 2
            r = rng.uniform(0.34, 0.4) * min(cw, ch)  # >= 8 px since resolution >= 64: still star-shaped
        ow = max(1, round(r / 8))  # thick outlines on small shapes would fill a star's notches
        outline = {**outline, "width": ow} if outline else outline
        for col, row in cells:
            kind, name = rng.choice(SHAPES[:4]), rng.choice(list(PALETTE))
            cx = col * cw + rng.uniform(r + ow, cw - r - ow)
            cy = row * ch + rng.uniform(r + ow, ch - r - ow)
            _draw_shape(draw, kind, cx, cy, r, PALETTE[name] + alpha, outline)
            kinds.append(kind)
            colours.append(name)
        extra.append("solo" if count == 1 else "multiple")
    tags = [k for k in SHAPES if k in kinds]
    if mode != "L":
        tags += [c for c in PALETTE if c in colours]
    tags += extra
    tags.append("transparent background" if mode == "RGBA" else f"{bg_name} background")
    if "stripes" not in kinds:
        tags.append("simple background")
    if mode == "L":
        img = img.convert("L")
        tags += ["monochrome", "greyscale"]
    return img, tags


def _encode(img: Image.Image, fmt: str) -> bytes:
    """Encode with fixed options (no metadata, no timestamps) so bytes depend only on pixels."""
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG", optimize=False, compress_level=6)
    else:
        img.save(buf, format="JPEG", quality=95, subsampling=0, optimize=False, progressive=False)
    return buf.getvalue()


def _write_concept(folder: Path, spec: DemoDatasetSpec, first_word: str, is_train: bool) -> list[tuple[Path, str]]:
    """Write one concept folder atomically and delete demo files left there by a previous, larger run."""
    rng = random.Random(f"sdtune-demo:{spec.seed}:{'train' if is_train else 'reg'}")
    res, short = spec.resolution, spec.resolution * 3 // 4
    written: list[tuple[Path, str]] = []
    keep: set[str] = set()
    for i in range(spec.images_per_concept):
        size = {4: (res, short), 5: (short, res)}.get(i % 6, (res, res))
        mode = "RGB"
        if is_train and i in RGBA_INDICES:
            mode = "RGBA"
        elif is_train and i == GREY_INDEX:
            mode = "L"
        fmt = "png" if mode == "RGBA" else spec.formats[i % len(spec.formats)]
        img, tags = _make_image(rng, size, mode, outlined=is_train)
        caption = ", ".join([first_word, *tags])
        path = folder / f"{i:04d}.{fmt}"
        with atomic_write(path) as fh:
            fh.write(_encode(img, fmt))
        cap_path = path.with_suffix(spec.caption_extension)
        with atomic_write(cap_path) as fh:
            fh.write((caption + "\n").encode("utf-8"))
        keep.update({path.name, cap_path.name})
        written.append((path, caption))
    for f in folder.iterdir():
        if f.is_file() and _DEMO_FILE.match(f.name) and f.name not in keep:
            f.unlink()
    return written


def _prune_siblings(parent: Path, keep: str) -> None:
    """Empty `<n>_<same tokens>` folders left by a run with other repeats (kohya would train both)."""
    tokens = keep.split("_", 1)[1]
    for d in parent.iterdir():
        n, _, rest = d.name.partition("_")
        if d.is_dir() and d.name != keep and n.isdigit() and rest == tokens:
            for f in d.iterdir():
                if f.is_file() and _DEMO_FILE.match(f.name):
                    f.unlink()
            if not any(d.iterdir()):
                d.rmdir()


def write_demo_dataset(root: Path, spec: DemoDatasetSpec = DemoDatasetSpec()) -> DemoDataset:
    """Write (or refresh in place) the demo dataset under `root` and describe what was written."""
    root = Path(root)
    train_dir, reg_dir = root / "train", root / "reg"
    items: list[tuple[Path, str]] = []
    for parent, name, word, is_train in (
        (train_dir, spec.train_folder, spec.trigger, True),
        (reg_dir, spec.reg_folder, spec.class_word, False),
    ):
        folder = parent / name
        folder.mkdir(parents=True, exist_ok=True)
        items += _write_concept(folder, spec, word, is_train)
        _prune_siblings(parent, name)
    return DemoDataset(root, train_dir, reg_dir, spec.trigger, spec.class_word, tuple(items))
