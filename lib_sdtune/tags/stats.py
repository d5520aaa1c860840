"""Caption statistics: tag frequency, `ss_tag_frequency`, tags per image, missing captions, trigger candidates."""

from __future__ import annotations

import os
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .store import CaptionStore, LoadConfig, load_captions


@dataclass(frozen=True)
class TagStats:
    """Statistics of one dataset; `frequency` counts images per tag, most common first."""

    root: Path
    images: int
    captioned: int
    frequency: list[tuple[str, int]]
    ss_tag_frequency: dict[str, dict[str, int]]
    tags_per_image: dict[str, float]
    without_caption: list[Path]
    empty_captions: list[Path]
    unreadable_captions: list[tuple[Path, str]]
    on_every_image: list[str]
    orphan_captions: list[Path] = field(default_factory=list)
    load_seconds: float = 0.0

    def to_dict(self, top: int | None = None) -> dict:
        """JSON-ready summary (the CLI's `--json`); `top` limits the frequency list."""
        freq = self.frequency if top is None else self.frequency[:top]
        return {
            "dataset": str(self.root), "images": self.images, "captioned": self.captioned,
            "unique_tags": len(self.frequency), "frequency": dict(freq),
            "ss_tag_frequency": self.ss_tag_frequency, "tags_per_image": self.tags_per_image,
            "without_caption": [str(p) for p in self.without_caption],
            "empty_captions": [str(p) for p in self.empty_captions],
            "unreadable_captions": [{"path": str(p), "error": e} for p, e in self.unreadable_captions],
            "on_every_image": self.on_every_image,
            "orphan_captions": [str(p) for p in self.orphan_captions],
            "load_seconds": round(self.load_seconds, 4),
        }


def _lowered(counts: Counter) -> dict[str, int]:
    """Merge counts of tags that differ only in case under the lower-case name (as sd-scripts counts them)."""
    out: dict[str, int] = {}
    for tag, n in counts.items():
        low = tag.lower()
        out[low] = out.get(low, 0) + n
    return out


def compute_stats(store: CaptionStore) -> TagStats:
    """Statistics of a loaded store; `on_every_image` is over the captioned images (trigger-word candidates).

    `ss_tag_frequency` follows sd-scripts' `set_tag_frequency` exactly: per image folder basename, every
    tag occurrence lower-cased and counted (a tag repeated in one caption counts twice).
    """
    freq: Counter = Counter()
    ss: dict[str, Counter] = {}
    counts: list[int] = []
    without, empty, unreadable = [], [], []
    every: set[str] | None = None
    for it in store.items:
        if it.error:
            unreadable.append((it.caption, it.error))
            continue
        if it.raw is None:
            without.append(it.image)
        elif not it.tags:
            empty.append(it.caption)
        tags = it.tags
        unique = set(tags)
        freq.update(unique)
        counts.append(len(tags))
        if it.raw is not None:
            folder = ss.get(it.image.parent.name)
            if folder is None:
                folder = ss[it.image.parent.name] = Counter()
            folder.update(tags)  # lower-cased once per folder below, not once per occurrence
            every = unique if every is None else every & unique
    per_image = {"min": min(counts, default=0), "max": max(counts, default=0),
                 "mean": round(statistics.fmean(counts), 3) if counts else 0.0,
                 "median": float(statistics.median(counts)) if counts else 0.0}
    ranked = sorted(freq.items(), key=lambda kv: (-kv[1], kv[0]))
    return TagStats(
        root=store.root, images=len(store.items), captioned=sum(1 for it in store.items if it.raw is not None),
        frequency=ranked, ss_tag_frequency={k: _lowered(v) for k, v in ss.items()}, tags_per_image=per_image,
        without_caption=without, empty_captions=empty, unreadable_captions=unreadable,
        on_every_image=sorted(every or ()),
        orphan_captions=list(store.orphan_captions), load_seconds=store.load_seconds,
    )


@dataclass(frozen=True)
class StatsConfig:
    """Which dataset to summarise and its caption extension."""

    dataset: Path
    caption_extension: str = ".txt"
    recursive: bool = True


def tag_stats(config: StatsConfig) -> TagStats:
    """Load a dataset and compute its statistics."""
    return compute_stats(load_captions(os.fspath(config.dataset), LoadConfig(config.caption_extension,
                                                                                  config.recursive)))
