"""Dataset lint: find what would hurt training, and fix it into a new folder or in place with a backup.

Findings: unreadable images, transparent images, tiny images (the trainer must upscale them by more
than 10% per side to reach resolution^2 pixels; bucket sizes just below that are fine), extreme aspect
ratios, near-duplicates (dHash plus a colour thumbnail), images without captions, empty captions,
captions that are not UTF-8, start with a BOM (kohya reads it into the first tag) or span several lines
(kohya reads only the first), and captions without an image.

Fixes never change the dataset silently: either everything is written to a new folder (`output`), or
(`in_place`) every file changed or dropped is first moved to `<dataset>/.sdtune_backups/lint-<time>/`.
"""

from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from PIL import Image

from ..errors import SdtuneError
from ..io.atomic import atomic_write
from .backup import BACKUP_DIR
from .imagecheck import ImageFacts, flatten_on_white, inspect_image, near_duplicate_groups
from .store import CaptionStore, LoadConfig, encode_caption, load_captions

TINY_UPSCALE = 1.1  # an image needing more upscaling than this per side (to resolution^2 pixels) is tiny
KINDS = ("unreadable", "transparent", "tiny", "aspect", "near_duplicate", "no_caption", "empty_caption",
         "caption_not_utf8", "caption_bom", "multiline_caption", "orphan_caption")


@dataclass(frozen=True)
class LintConfig:
    """What to check and the limits; `resolution` is the training resolution (512 SD1, 1024 SDXL)."""

    dataset: Path
    caption_extension: str = ".txt"
    resolution: int = 512
    max_aspect: float = 3.0
    duplicate_distance: int = 4  # of 64 dHash bits; 0 = exact duplicates only
    workers: int = 0  # decoding threads; 0 = CPU count (at most 8)

    def __post_init__(self) -> None:
        """Check the limits."""
        if self.resolution < 1 or self.max_aspect < 1 or not 0 <= self.duplicate_distance < 32:
            raise SdtuneError("lint: resolution >= 1, max_aspect >= 1 and 0 <= duplicate_distance < 32 please")


@dataclass(frozen=True)
class Finding:
    """One problem: its kind, the file, what is wrong, and related files (the image a duplicate repeats)."""

    kind: str
    path: Path
    detail: str
    related: tuple[Path, ...] = ()

    def to_dict(self) -> dict:
        """JSON-ready."""
        return {"kind": self.kind, "path": str(self.path), "detail": self.detail,
                "related": [str(p) for p in self.related]}


@dataclass(frozen=True)
class LintReport:
    """All findings of a dataset, plus the facts gathered (for fixes)."""

    dataset: Path
    images: int
    findings: list[Finding]
    seconds: float
    facts: dict[Path, ImageFacts] = field(default_factory=dict, repr=False)

    def by_kind(self) -> dict[str, list[Finding]]:
        """Findings grouped by kind, in KINDS order, empty kinds left out."""
        out: dict[str, list[Finding]] = {}
        for k in KINDS:
            hits = [f for f in self.findings if f.kind == k]
            if hits:
                out[k] = hits
        return out

    def summary_lines(self, shown: int = 20, name: Callable[[Path], object] = str, more: str = "") -> list[str]:
        """For people: per kind its count and first `shown` findings (`name` prints a path), or that all is well."""
        lines: list[str] = []
        for kind, hits in self.by_kind().items():
            lines.append(f"{kind}: {len(hits)}")
            lines += [f"  {name(f.path)}: {f.detail}" for f in hits[:shown]]
            if len(hits) > shown:
                lines.append(f"  ... and {len(hits) - shown} more{more}")
        if not self.findings:
            lines.append("no problems found")
        return lines

    def to_dict(self) -> dict:
        """JSON-ready summary (the CLI's `--json`)."""
        return {"dataset": str(self.dataset), "images": self.images, "seconds": round(self.seconds, 3),
                "counts": {k: len(v) for k, v in self.by_kind().items()},
                "findings": [f.to_dict() for f in self.findings]}


def lint_dataset(config: LintConfig, progress: Optional[Callable[[int, int, str], None]] = None,
                 store: CaptionStore | None = None) -> LintReport:
    """Check every image and caption of a dataset; reads only."""
    t0 = time.perf_counter()
    store = store or load_captions(config.dataset, LoadConfig(config.caption_extension))
    paths = [it.image for it in store.items]
    workers = config.workers or min(8, os.cpu_count() or 1)
    facts: dict[Path, ImageFacts] = {}
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sdtune-lint") as pool:
        for n, f in enumerate(pool.map(inspect_image, paths), 1):
            facts[f.path] = f
            if progress is not None and (n % 64 == 0 or n == len(paths)):
                progress(n, len(paths), f.path.name)
    found: list[Finding] = []
    min_area = (config.resolution / TINY_UPSCALE) ** 2
    for it in store.items:
        f = facts[it.image]
        if f.error:
            found.append(Finding("unreadable", it.image, f"cannot be decoded ({f.error}); remove or re-export it"))
            continue
        if f.transparent:
            found.append(Finding("transparent", it.image, "has transparent pixels; trainers see them as black or "
                                                          "noise unless flattened on white"))
        if f.width * f.height < min_area:
            scale = config.resolution / (f.width * f.height) ** 0.5
            found.append(Finding("tiny", it.image, f"{f.width}x{f.height} will be upscaled {scale:.1f}x to reach "
                                                   f"{config.resolution}x{config.resolution} pixels; expect blur"))
        aspect = max(f.width, f.height) / max(1, min(f.width, f.height))
        if aspect > config.max_aspect:
            found.append(Finding("aspect", it.image, f"{f.width}x{f.height} is {aspect:.1f}:1, beyond "
                                                     f"{config.max_aspect}:1; crop it or expect odd buckets"))
    for group in near_duplicate_groups((facts[p] for p in paths), config.duplicate_distance):
        keep = group[0].path
        for dup in group[1:]:
            dist = bin(dup.dhash ^ group[0].dhash).count("1")
            found.append(Finding("near_duplicate", dup.path, f"looks like {keep.name} (hash distance {dist} of 64)",
                                 (keep,)))
    for it in store.items:
        if it.error:
            found.append(Finding("caption_not_utf8", it.caption, it.error))
        elif it.raw is None:
            found.append(Finding("no_caption", it.image, f"no {store.caption_extension} caption beside it"))
        elif not it.tags:
            found.append(Finding("empty_caption", it.caption, "the caption is empty"))
        if it.bom:
            found.append(Finding("caption_bom", it.caption, "starts with a UTF-8 BOM, which kohya reads into the "
                                                            "first tag"))
        if it.multiline:
            found.append(Finding("multiline_caption", it.caption, "has several lines; kohya reads only the first"))
    for orphan in store.orphan_captions:
        found.append(Finding("orphan_caption", orphan, "caption without an image of the same name"))
    order = {k: i for i, k in enumerate(KINDS)}
    found.sort(key=lambda f: (order[f.kind], str(f.path)))
    return LintReport(store.root, len(store.items), found, time.perf_counter() - t0, facts)


@dataclass(frozen=True)
class FixConfig:
    """How to fix: into a new folder `output`, or `in_place` with every original moved to a backup first."""

    lint: LintConfig
    output: Path | None = None
    in_place: bool = False
    flatten_transparent: bool = True
    drop_unreadable: bool = True
    drop_duplicates: bool = True
    drop_tiny: bool = False
    drop_extreme_aspect: bool = False
    fix_captions: bool = True  # remove BOMs, join multi-line captions into one line


@dataclass(frozen=True)
class FixResult:
    """What a fix wrote and dropped, and where originals went."""

    output: Path
    copied: int
    flattened: list[Path]
    dropped: list[tuple[Path, str]]
    captions_fixed: list[Path]
    backup: Path | None
    report: LintReport

    def to_dict(self) -> dict:
        """JSON-ready summary (the CLI's `--json`)."""
        return {"output": str(self.output), "copied": self.copied, "flattened": [str(p) for p in self.flattened],
                "dropped": [{"path": str(p), "reason": r} for p, r in self.dropped],
                "captions_fixed": [str(p) for p in self.captions_fixed],
                "backup": str(self.backup) if self.backup else None, "lint": self.report.to_dict()}


def _save_like(img: Image.Image, src: Path, fh) -> None:
    """Encode a flattened image in its original format (PNG/WEBP lossless, JPEG high quality)."""
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP"}.get(src.suffix.lower(), "PNG")
    opts = {"WEBP": {"lossless": True}, "JPEG": {"quality": 95}}.get(fmt, {})
    img.save(fh, format=fmt, **opts)


def _copy(src: Path, dst: Path) -> None:
    """Copy a file atomically (temp beside the target, fsync, rename)."""
    with open(src, "rb") as fin, atomic_write(dst) as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)


def fix_dataset(config: FixConfig, progress: Optional[Callable[[int, int, str], None]] = None) -> FixResult:
    """Lint, then write the fixed dataset to `output`, or fix in place after backing up each touched file."""
    lc = config.lint
    src_root = Path(lc.dataset).resolve()
    if config.in_place == (config.output is not None):
        raise SdtuneError("lint fix: give either an output folder (-o OUT) or in-place mode, not both or neither")
    if config.output is not None:
        out_root = Path(config.output).resolve()
        if out_root == src_root or src_root in out_root.parents or out_root in src_root.parents:
            raise SdtuneError(f"{out_root}: the output folder must be outside the dataset (and not contain it)")
        if out_root.exists() and any(out_root.iterdir()):
            raise SdtuneError(f"{out_root}: the output folder is not empty; choose a new or empty folder")
    store = load_captions(src_root, LoadConfig(lc.caption_extension))
    report = lint_dataset(lc, progress, store)
    drop: dict[Path, str] = {}
    rules = [("unreadable", config.drop_unreadable), ("near_duplicate", config.drop_duplicates),
             ("tiny", config.drop_tiny), ("aspect", config.drop_extreme_aspect)]
    for kind, on in rules:
        if on:
            for f in report.findings:
                if f.kind == kind:
                    drop.setdefault(f.path, f"{kind}: {f.detail}")
    flatten = {f.path for f in report.findings if f.kind == "transparent"} if config.flatten_transparent else set()
    backup_root = src_root / BACKUP_DIR / time.strftime("lint-%Y%m%dT%H%M%SZ", time.gmtime())
    out_root = Path(config.output).resolve() if config.output is not None else src_root
    copied, flattened, captions_fixed = 0, [], []

    def keep_original(path: Path, move: bool) -> None:
        dst = backup_root / path.relative_to(src_root)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if move:
            os.replace(path, dst)
        else:
            _copy(path, dst)

    for it in store.items:
        rel_img = it.image.relative_to(src_root)
        rel_cap = it.caption.relative_to(src_root)
        if it.image in drop:
            if config.in_place:
                keep_original(it.image, move=True)
                if it.raw is not None:
                    keep_original(it.caption, move=True)
            continue
        if it.image in flatten:
            with Image.open(it.image) as img:
                flat = flatten_on_white(img)
            if config.in_place:
                keep_original(it.image, move=False)
            with atomic_write(out_root / rel_img) as fh:
                _save_like(flat, it.image, fh)
            flattened.append(out_root / rel_img)
        elif not config.in_place:
            _copy(it.image, out_root / rel_img)
        copied += 1
        if it.raw is None:
            continue
        if config.fix_captions and not it.error and (it.bom or it.multiline):
            if config.in_place:
                keep_original(it.caption, move=False)
            with atomic_write(out_root / rel_cap) as fh:
                fh.write(encode_caption(it.tags))
            captions_fixed.append(out_root / rel_cap)
        elif not config.in_place:
            _copy(it.caption, out_root / rel_cap)
    dropped = [(p, r) for p, r in drop.items()]
    backup = backup_root if config.in_place and backup_root.exists() else None
    return FixResult(out_root, copied, flattened, dropped, captions_fixed, backup, report)
