"""WD14 tagging: the reference preprocessing, threshold/MCut selection, batched runs, caption writing.

Preprocessing is the SmilingWolf wd-tagger Space's `prepare_image` exactly: alpha-composite on white,
pad to a centred white square, PIL BICUBIC resize to the model's input size (only when the side
differs), float32 0..255, RGB -> BGR, NHWC. Selection is the Space's: `score > threshold` (general
0.35, character 0.85 by default), or MCut per category (the character one floored at 0.15).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image

from ..errors import SdtuneError
from .history import EditSession
from .store import LoadConfig, load_captions
from .text import escape_parens, spaces_to_underscores, underscores_to_spaces
from .wd14_model import Wd14Labels, Wd14Model, open_model

Progress = Callable[[int, int, str], None]
MODES = ("append", "prepend", "overwrite", "skip")


def prepare_image(img: Image.Image, size: int) -> np.ndarray:
    """One image as the model wants it: [size, size, 3] float32 BGR 0..255, padded on white."""
    if img.mode == "RGB":  # opaque: compositing on white would give the same pixels
        rgb = img
    else:
        img = img.convert("RGBA") if img.mode != "RGBA" else img
        canvas = Image.new("RGBA", img.size, (255, 255, 255))
        canvas.alpha_composite(img)
        rgb = canvas.convert("RGB")
    w, h = rgb.size
    side = max(w, h)
    padded = Image.new("RGB", (side, side), (255, 255, 255))
    padded.paste(rgb, ((side - w) // 2, (side - h) // 2))
    if side != size:
        padded = padded.resize((size, size), Image.BICUBIC)
    return np.ascontiguousarray(np.asarray(padded, dtype=np.float32)[:, :, ::-1])


def load_and_prepare(path: Path, size: int) -> np.ndarray:
    """Decode and prepare one file (runs in the decoding threads)."""
    with Image.open(path) as img:
        img.load()
        return prepare_image(img, size)


def mcut_threshold(probs: np.ndarray) -> float:
    """Maximum Cut Thresholding (Largeron et al. 2012): the middle of the largest gap between sorted scores."""
    if probs.size < 2:
        return 0.0
    s = np.sort(probs)[::-1]
    gaps = s[:-1] - s[1:]
    t = int(gaps.argmax())
    return float((s[t] + s[t + 1]) / 2)


@dataclass(frozen=True)
class Wd14Config:
    """A tagging run over a dataset folder; thresholds follow the reference Space's defaults."""

    dataset: Path
    model_dir: Path
    general_threshold: float = 0.35
    character_threshold: float = 0.85
    general_mcut: bool = False
    character_mcut: bool = False
    exclude: tuple[str, ...] = ()
    replace_underscores: bool = True
    escape_parens: bool = False  # kohya reads captions literally; escape only for captions used as A1111 prompts
    mode: str = "append"  # append | prepend | overwrite | skip (leave images that already have tags)
    add_rating: bool = False  # prepend the most likely rating (general, sensitive, questionable, explicit)
    max_tags: int = 0  # 0 = no limit (general tags, highest scores kept)
    batch_size: int = 8
    workers: int = 0  # decoding threads; 0 = CPU count (at most 8)
    device: str = "cpu"  # cpu | cuda | auto
    caption_extension: str = ".txt"
    dry_run: bool = False
    backup: bool = True

    def __post_init__(self) -> None:
        """Check the values a user types."""
        if self.mode not in MODES:
            raise SdtuneError(f"tagger mode {self.mode!r}: use one of {', '.join(MODES)}")
        for name in ("general_threshold", "character_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise SdtuneError(f"{name} {getattr(self, name)}: scores are 0..1, so use a value in that range")
        if self.batch_size < 1:
            raise SdtuneError("batch_size must be >= 1")


@dataclass(frozen=True)
class ImageTags:
    """Tags the model found for one image, with scores (characters first, then general, by score)."""

    image: Path
    tags: tuple[str, ...]
    scores: dict[str, float]
    rating: dict[str, float]
    error: str | None = None


def select_tags(scores: np.ndarray, labels: Wd14Labels, config: Wd14Config) -> tuple[list[str], dict, dict]:
    """(tags in caption order, tag -> score, rating -> score) for one row of model output."""
    scores = np.asarray(scores, dtype=np.float64)
    names = labels.names
    excluded = {underscores_to_spaces(t.strip()) for t in config.exclude} | {
        spaces_to_underscores(t.strip()) for t in config.exclude}

    def pick(indices: tuple[int, ...], threshold: float, mcut: bool, floor: float) -> list[tuple[str, float]]:
        if not indices:
            return []
        probs = scores[list(indices)]
        if mcut:
            threshold = max(floor, mcut_threshold(probs))
        chosen = [(names[i], float(p)) for i, p in zip(indices, probs) if p > threshold and names[i] not in excluded]
        return sorted(chosen, key=lambda x: -x[1])

    chars = pick(labels.character, config.character_threshold, config.character_mcut, 0.15)
    general = pick(labels.general, config.general_threshold, config.general_mcut, 0.0)
    if config.max_tags:
        general = general[:config.max_tags]
    rating = {names[i]: float(scores[i]) for i in labels.rating}
    picked = chars + general
    tags = [t for t, _ in picked]
    if config.add_rating and rating:
        tags.insert(0, max(rating, key=rating.get))
    if config.escape_parens:
        tags = [escape_parens(t) for t in tags]
    return list(dict.fromkeys(tags)), dict(picked), rating


def tag_images(paths: Sequence[Path], model: Wd14Model, config: Wd14Config,
               progress: Optional[Progress] = None, cancelled: Optional[Callable[[], bool]] = None) -> list[ImageTags]:
    """Tag images in batches; decoding of the next batch overlaps inference of the current one."""
    batch = min(config.batch_size, model.fixed_batch or config.batch_size)
    workers = config.workers or min(8, os.cpu_count() or 1)
    chunks = [list(paths[i:i + batch]) for i in range(0, len(paths), batch)]
    results: list[ImageTags] = []
    done = 0
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sdtune-wd14") as pool:
        def submit(chunk: list[Path]) -> list[Future]:
            return [pool.submit(load_and_prepare, p, model.input_size) for p in chunk]

        pending = submit(chunks[0]) if chunks else []
        for k, chunk in enumerate(chunks):
            if cancelled is not None and cancelled():
                for f in pending:
                    f.cancel()
                break
            current, pending = pending, (submit(chunks[k + 1]) if k + 1 < len(chunks) else [])
            arrays, ok = [], []
            for path, fut in zip(chunk, current):
                try:
                    arrays.append(fut.result())
                    ok.append(path)
                except Exception as e:  # PIL raises many types for broken files
                    results.append(ImageTags(path, (), {}, {}, f"cannot read the image: {e}"))
            if arrays:
                stacked = np.stack(arrays)
                if model.fixed_batch and len(arrays) < model.fixed_batch:  # a graph exported with a fixed batch
                    pad = np.full((model.fixed_batch - len(arrays), *stacked.shape[1:]), 255, np.float32)
                    stacked = np.concatenate([stacked, pad])
                out = model.predict(stacked)[:len(arrays)]
                for path, row in zip(ok, out):
                    tags, scores, rating = select_tags(row, model.labels, config)
                    results.append(ImageTags(path, tuple(tags), scores, rating))
            done += len(chunk)
            if progress is not None:
                progress(done, len(paths), chunk[-1].name)
    return results


@dataclass(frozen=True)
class Wd14Result:
    """What a tagging run found and wrote."""

    images: list[ImageTags]
    written: list[Path]
    backup: Path | None
    seconds: float
    cancelled: bool = False
    errors: list[tuple[Path, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready summary (the CLI's `--json`)."""
        return {"images": len(self.images), "written": [str(p) for p in self.written],
                "backup": str(self.backup) if self.backup else None, "seconds": round(self.seconds, 3),
                "cancelled": self.cancelled, "errors": [{"path": str(p), "error": e} for p, e in self.errors],
                "tags": {str(it.image): list(it.tags) for it in self.images if not it.error}}


def merge_tags(existing: list[str], found: Sequence[str], mode: str) -> list[str]:
    """A caption's new tags for a mode: append / prepend / overwrite (skip is decided before tagging)."""
    if mode == "overwrite":
        return list(dict.fromkeys(found))
    if mode == "prepend":
        return list(dict.fromkeys([*found, *existing]))
    return list(dict.fromkeys([*existing, *found]))


def tag_dataset(config: Wd14Config, progress: Optional[Progress] = None,
                cancelled: Optional[Callable[[], bool]] = None, model: Wd14Model | None = None) -> Wd14Result:
    """Tag every image of a dataset and write the captions (atomic, backed up); a cancel writes what was done."""
    t0 = time.perf_counter()
    session = EditSession(load_captions(config.dataset, LoadConfig(config.caption_extension)), backup=config.backup)
    items = session.store.items
    todo = [i for i, it in enumerate(items) if not it.error and not (config.mode == "skip" and it.tags)]
    model = model or open_model(config.model_dir, config.device, config.replace_underscores)
    found = tag_images([items[i].image for i in todo], model, config, progress, cancelled)
    was_cancelled = len(found) < len(todo)
    index = {items[i].image: i for i in todo}
    new_tags = {index[r.image]: merge_tags(items[index[r.image]].tags, r.tags, config.mode)
                for r in found if not r.error}
    errors = [(r.image, r.error) for r in found if r.error]
    errors += [(it.caption, it.error) for it in items if it.error]
    if config.dry_run:
        return Wd14Result(found, [], None, time.perf_counter() - t0, was_cancelled, errors)
    written = session.write_tags(new_tags, "WD14 tagger")
    return Wd14Result(found, written.changed, written.backup, time.perf_counter() - t0, was_cancelled, errors)
