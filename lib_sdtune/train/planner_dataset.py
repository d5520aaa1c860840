"""What the planner reads off a scanned dataset: counts, caption style, shared tags, duplicates, warnings.

The scan itself is `lib_sdtune.data.scan`'s; this module only summarises it for the rules and turns
what it finds into warnings a beginner can act on.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ..data.images import is_image_file
from ..data.scan import DatasetScan, ImageRecord, parse_concept_folder_name
from ..tags.imagecheck import inspect_image, near_duplicate_groups

_TOKEN = re.compile(r"[A-Za-z0-9]+|[^\sA-Za-z0-9]")
CLIP_TOKENS = 75
DUPLICATE_DISTANCE = 4  # of 64 dHash bits, as `tag lint`'s default


@dataclass(frozen=True)
class PlanWarning:
    """Something in the dataset or the setup that will hurt training, and what to do about it."""

    kind: str  # too_few_images | near_duplicates | untagged | shared_tags | wrong_level | scan | ...
    message: str
    source: str = ""


@dataclass(frozen=True)
class DatasetFacts:
    """The dataset as the rules see it."""

    n_images: int
    n_reg: int
    tag_captions: bool
    shared_tags: tuple[str, ...]  # tags on every training image, in caption order
    first_tag: Optional[str]  # the tag every caption starts with, if there is one
    long_captions: bool
    caption_extension: str
    untagged: tuple[Path, ...]
    duplicate_groups: tuple[tuple[Path, ...], ...]


def find_dataset_root(path: Path) -> tuple[Path, Optional[PlanWarning]]:
    """The folder to give sd-scripts: the path itself, or its parent when the path is a concept folder
    (`10_name` holding images), the #1 layout mistake (research §2.1, §8)."""
    if not path.is_dir() or parse_concept_folder_name(path.name) is None:
        return path, None
    try:
        entries = list(path.iterdir())
    except OSError:
        return path, None
    has_images = any(p.is_file() and is_image_file(p) for p in entries)
    has_concepts = any(p.is_dir() and parse_concept_folder_name(p.name) for p in entries)
    if not has_images or has_concepts:
        return path, None
    return path.parent, PlanWarning(
        "wrong_level", f"{path} is a concept folder ('<repeats>_<name>' holding images); sd-scripts wants its parent: "
        f"the plan uses {path.parent} as train_data_dir (every '<repeats>_<name>' folder in it is trained)",
        "research §2.1, §8 (kohya_ss #216, #3374)")


def _tags(caption: str) -> list[str]:
    return [t.strip().lower() for t in caption.split(",") if t.strip()]


def _is_tag_caption(caption: str) -> bool:
    """Comma-separated short tags (booru/WD14 style) rather than a sentence."""
    tags = _tags(caption)
    return len(tags) >= 3 and sum(len(t.split()) for t in tags) / len(tags) <= 3


def _token_count(caption: str) -> int:
    """A rough CLIP token count (words and punctuation); BPE splits rare words further."""
    return len(_TOKEN.findall(caption))


def _train_records(scans: Sequence[DatasetScan]) -> list[ImageRecord]:
    return [r for s in scans for r in s.train_images]


def dataset_facts(scans: Sequence[DatasetScan], check_duplicates: bool = True) -> DatasetFacts:
    """Summarise the training images of every scanned dataset."""
    train = _train_records(scans)
    n_reg = sum(len(s.reg_images) for s in scans)
    untagged = tuple(p for s in scans for sub in s.subsets if not sub.config.is_reg for p in sub.missing_captions)
    untagged_set = set(untagged)
    captioned = [r for r in train if r.path not in untagged_set and r.caption_path is not None]
    tag_style = sum(_is_tag_caption(r.caption) for r in captioned)
    counts: Counter[str] = Counter()
    order: dict[str, int] = {}
    for r in train:
        tags = set(_tags(r.caption))
        counts.update(tags)
        for i, t in enumerate(_tags(r.caption)):
            order.setdefault(t, i)
    shared = tuple(sorted((t for t, n in counts.items() if n == len(train)), key=lambda t: order[t])) \
        if len(train) >= 2 else ()
    firsts = {(_tags(r.caption) or [""])[0] for r in train}
    first_tag = next(iter(firsts)) if len(firsts) == 1 and "" not in firsts else None
    exts = Counter(r.caption_path.suffix for r in captioned if r.caption_path is not None)
    return DatasetFacts(
        n_images=len(train), n_reg=n_reg,
        tag_captions=bool(captioned) and tag_style * 2 >= len(captioned),
        shared_tags=shared, first_tag=first_tag,
        long_captions=any(_token_count(r.caption) > CLIP_TOKENS for r in train),
        caption_extension=exts.most_common(1)[0][0] if exts else ".txt",
        untagged=untagged,
        duplicate_groups=_duplicates([r.path for r in train]) if check_duplicates else (),
    )


def _duplicates(paths: list[Path]) -> tuple[tuple[Path, ...], ...]:
    """Near-duplicate groups by the lint's difference hash + colour thumbnail (tags/imagecheck.py)."""
    if len(paths) < 2:
        return ()
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="sdtune-plan") as pool:
        facts = list(pool.map(inspect_image, paths))
    return tuple(tuple(f.path for f in g) for g in near_duplicate_groups(facts, DUPLICATE_DISTANCE))


def dataset_warnings(scans: Sequence[DatasetScan], facts: DatasetFacts, resolution: tuple[int, int]
                     ) -> list[PlanWarning]:
    """Warnings about the images and captions, each with what to do."""
    out = [PlanWarning("scan", w, "the dataset scan") for s in scans for w in s.warnings]
    n = facts.n_images
    if n < 5:
        out.append(PlanWarning("too_few_images", f"only {n} training image(s): the LoRA will copy them rather than "
                               "learn the concept; 15-50 varied images work much better",
                               "seed 004 (over-fitting from too little data); seed 001 (varied material)"))
    elif n < 10:
        out.append(PlanWarning("too_few_images", f"{n} training images is few: expect over-fitting; aim for 15+",
                               "seed 004 (over-fitting from too little data)"))
    for group in facts.duplicate_groups:
        names = ", ".join(p.name for p in group[:4]) + (" ..." if len(group) > 4 else "")
        out.append(PlanWarning("near_duplicates", f"near-duplicate images ({names}) in {group[0].parent}: they weigh "
                               "that picture several times over; keep one (`tag lint` lists them all)",
                               "seed 001 (no near-identical variant images)"))
    if facts.untagged:
        first = facts.untagged[0]
        out.append(PlanWarning("untagged", f"{len(facts.untagged)} of {n} training image(s) have no or an empty "
                               f"caption (first: {first}); they train with the folder's class tokens only. Caption "
                               "them, e.g. `tag wd14 DATASET --threshold 0.35`",
                               "seed 001 (tag thoroughly; auto-tag threshold 0.35)"))
    others = [t for t in facts.shared_tags if t != facts.first_tag]
    if facts.first_tag and facts.first_tag in facts.shared_tags and n >= 2:
        out.append(PlanWarning("trigger_word", f"'{facts.first_tag}' starts every caption: it is the trigger word "
                               "(keep_tokens 1 keeps it first when tags shuffle); use it in your prompts",
                               "research §2.3"))
    if others and n >= 2:
        tags = ", ".join(f"'{t}'" for t in others[:5])
        out.append(PlanWarning("shared_tags", f"{tags} on every image: such a tag absorbs everything the images have "
                               "in common (trigger-word candidates). Make the one you want as the trigger word the "
                               "first tag (keep_tokens 1 keeps it first), and drop the others",
                               "research §2.3; research §8 (trigger words)"))
    for s in scans:
        captioned_folders = {r.subset_index for r in s.train_images if r.caption_path is not None}
        for i, sub in enumerate(s.subsets):
            tokens = (sub.config.class_tokens or "").strip().lower()
            if sub.config.is_reg or not tokens or i not in captioned_folders:
                continue
            words = tokens.split()
            if not any(w in _tags(r.caption) or w in r.caption.lower().split() for r in s.train_images
                       if r.subset_index == i for w in words):
                out.append(PlanWarning("class_tokens", f"{sub.config.image_dir}: the folder name's '{tokens}' is in no "
                                       "caption; with caption files it is not used at all. Put the trigger word in "
                                       "the captions", "research §8 (folder name is not a trigger word)"))
    small = [r for r in _train_records(scans) if r.size[0] * r.size[1] < 0.5 * resolution[0] * resolution[1]]
    if small:
        out.append(PlanWarning("small_images", f"{len(small)} of {n} training image(s) have under half the pixels of "
                               f"{resolution[0]}x{resolution[1]} (first: {small[0].path.name}); they are upscaled and "
                               "teach blur. Use larger images", "research §2.4 (buckets cover the image)"))
    return out
