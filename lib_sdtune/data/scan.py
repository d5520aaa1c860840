"""Dataset scan: kohya folders or a dataset_config -> images, captions, repeats and counts, once, before training.

Folder mode follows sd-scripts (`generate_dreambooth_subsets_config_by_subdirs`, `DreamBoothDataset`):
the data folder is the *parent* of `<repeats>_<class tokens>` folders; a reg folder uses the same names
and its images are balanced against the training images. Broken files never stop a scan: each is
skipped with a warning naming it, and listed in `DatasetScan.skipped` for the job's report.
"""

from __future__ import annotations

import math
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

from ..errors import SdtuneError
from .config import DatasetConfig, ScanOptions, SubsetConfig
from .images import ImageReadError, is_image_file, read_image_size
from .toml_config import load_dataset_config

CAPTION_EXTENSIONS = (".txt", ".caption")


@dataclass(frozen=True)
class ImageRecord:
    """One image and its caption as read from disk; `repeats` is per epoch (reg images after balancing)."""

    path: Path
    caption: str  # the caption file's text (first line, or all non-empty lines with enable_wildcard)
    size: tuple[int, int]  # (width, height)
    subset_index: int
    is_reg: bool
    repeats: int
    caption_path: Optional[Path] = None  # None when the caption came from class tokens
    is_validation: bool = False


@dataclass(frozen=True)
class SkippedFile:
    """A file the scan could not use, and why."""

    path: Path
    reason: str


@dataclass(frozen=True)
class SubsetScan:
    """One subset's settings and what was found in its folder."""

    config: SubsetConfig
    img_count: int  # images used for training from this folder (validation split excluded)
    missing_captions: tuple[Path, ...] = ()


@dataclass(frozen=True)
class DatasetScan:
    """Everything training needs to know about one dataset before it decodes a pixel."""

    config: DatasetConfig
    subsets: tuple[SubsetScan, ...]
    records: tuple[ImageRecord, ...]  # every readable image, train, reg and validation
    warnings: tuple[str, ...] = ()
    skipped: tuple[SkippedFile, ...] = ()

    @property
    def train_images(self) -> tuple[ImageRecord, ...]:
        """Non-reg training images (validation split excluded)."""
        return tuple(r for r in self.records if not r.is_reg and not r.is_validation)

    @property
    def reg_images(self) -> tuple[ImageRecord, ...]:
        """Reg images used this epoch (repeats > 0 after balancing)."""
        return tuple(r for r in self.records if r.is_reg and r.repeats > 0)

    @property
    def validation_images(self) -> tuple[ImageRecord, ...]:
        """Images held out by `validation_split`."""
        return tuple(r for r in self.records if r.is_validation)

    @property
    def epoch_images(self) -> tuple[ImageRecord, ...]:
        """Every image that is sampled in an epoch (train + balanced reg), each `repeats` times."""
        return tuple(r for r in self.records if not r.is_validation and r.repeats > 0)

    @property
    def num_train_images(self) -> int:
        """Training images x repeats (sd-scripts' `num_train_images`, `ss_num_train_images`)."""
        return sum(r.repeats for r in self.train_images)

    @property
    def num_reg_images(self) -> int:
        """Reg images x their folder repeats, before balancing (sd-scripts' `num_reg_images`)."""
        return sum(self.subsets[r.subset_index].config.num_repeats for r in self.records if r.is_reg)

    @property
    def samples_per_epoch(self) -> int:
        """Samples drawn in one epoch: training images x repeats plus the balanced reg samples."""
        return sum(r.repeats for r in self.epoch_images)

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """`ss_tag_frequency` of this dataset: folder basename -> lower-cased tag -> images carrying it."""
        out: dict[str, dict[str, int]] = {}
        for sub_i, sub in enumerate(self.subsets):
            freq = out.setdefault(os.path.basename(sub.config.image_dir.rstrip("/\\")), {})
            for r in self.records:
                if r.subset_index != sub_i or r.is_validation:
                    continue
                for tag in r.caption.split(","):
                    tag = tag.strip().lower()
                    if tag:
                        freq[tag] = freq.get(tag, 0) + 1
        return out

    def dataset_dirs(self, reg: bool = False) -> dict[str, dict[str, int]]:
        """`ss_dataset_dirs` (or with reg=True `ss_reg_dataset_dirs`): basename -> n_repeats, img_count."""
        out: dict[str, dict[str, int]] = {}
        for sub in self.subsets:
            if sub.config.is_reg == reg:
                out[os.path.basename(sub.config.image_dir.rstrip("/\\"))] = {
                    "n_repeats": sub.config.num_repeats, "img_count": sub.img_count}
        return out


    def validation_scan(self) -> DatasetScan:
        """The held-out images as a dataset of their own (1 repeat each), for validation batches."""
        recs = tuple(replace(r, is_validation=False, repeats=1) for r in self.records if r.is_validation)
        return replace(self, records=recs, warnings=(), skipped=())

    def report(self) -> str:
        """A plain-text summary for a job's report: folders, counts, skipped files and warnings."""
        lines = []
        for sub in self.subsets:
            c = sub.config
            extra = f", {len(sub.missing_captions)} without a caption" if sub.missing_captions else ""
            lines.append(f"{'reg' if c.is_reg else 'train'} {c.image_dir}: {sub.img_count} image(s) x "
                         f"{c.num_repeats} repeat(s){extra}")
        reg = sum(r.repeats for r in self.reg_images)
        lines.append(f"{self.num_train_images} training sample(s) per epoch" + (f" + {reg} reg" if reg else "")
                     + (f"; {len(self.validation_images)} image(s) held out for validation"
                        if self.validation_images else ""))
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} file(s):")
            lines += [f"  {s.path}: {s.reason}" for s in self.skipped]
        other = [w for w in self.warnings if not any(w.startswith(str(s.path)) for s in self.skipped)]
        if other:
            lines.append("warnings:")
            lines += [f"  {w}" for w in other]
        return "\n".join(lines)


def parse_concept_folder_name(name: str) -> Optional[tuple[int, str]]:
    """`10_sks woman` -> (10, "sks woman"), as sd-scripts splits it; None when there is no leading number."""
    tokens = name.split("_")
    try:
        repeats = int(tokens[0])
    except ValueError:
        return None
    return repeats, "_".join(tokens[1:])


def _images_in(folder: Path) -> list[Path]:
    """Image files directly inside `folder` (not recursive), sorted as sd-scripts sorts paths."""
    try:
        return sorted((p for p in folder.iterdir() if p.is_file() and is_image_file(p)), key=str)
    except OSError:
        return []


def _subdirs(folder: Path) -> list[Path]:
    """Visible subfolders, sorted by name (an unreadable folder has none)."""
    try:
        return sorted((d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)
    except OSError:
        return []


def _concept_subsets(parent: Path, is_reg: bool, template: SubsetConfig, accept_concept_folder: bool,
                     warnings: list[str]) -> list[SubsetConfig]:
    """The `<repeats>_<tokens>` subfolders of one data folder, with the wrong-level mistakes explained."""
    role = "reg folder" if is_reg else "training folder"
    if not parent.is_dir():
        raise SdtuneError(f"the {role} {parent} does not exist or is not a folder")
    subdirs = _subdirs(parent)
    direct = _images_in(parent)
    subsets: list[SubsetConfig] = []
    for d in subdirs:
        parsed = parse_concept_folder_name(d.name)
        if parsed is None:
            if _images_in(d):
                warnings.append(f"{d}: ignored, the folder name does not start with a number of repeats "
                                f"(rename it like '10_{d.name}')")
            continue
        repeats, tokens = parsed
        if repeats < 1:
            warnings.append(f"{d}: ignored, {repeats} repeats (use 1 or more)")
            continue
        subsets.append(replace(template, image_dir=str(d), num_repeats=repeats, is_reg=is_reg, class_tokens=tokens))
    if subsets:
        if direct:
            warnings.append(f"{parent}: {len(direct)} image(s) directly in this folder are not used; only the "
                            f"'<repeats>_<name>' folders inside it are (move them into one)")
        return subsets
    parsed = parse_concept_folder_name(parent.name)
    if direct:
        looks = (f" (its name '{parent.name}' is a concept folder's: {parsed[0]} repeats of '{parsed[1]}')"
                 if parsed else "")
        if not accept_concept_folder:
            raise SdtuneError(
                f"the {role} {parent} holds images itself{looks}. Point at the parent folder "
                f"({parent.parent}), which holds '<repeats>_<name>' folders like '10_{parsed[1] if parsed else 'name'}'"
                f" - or ask to use this folder as one concept with 1 repeat.")
        tokens = parsed[1] if parsed else None
        warnings.append(f"{parent} holds images itself: using it as one concept with 1 repeat"
                        + (f" and class tokens '{tokens}'" if tokens else "")
                        + f"; kohya tools want its parent folder ({parent.parent}) instead")
        return [replace(template, image_dir=str(parent), num_repeats=1, is_reg=is_reg, class_tokens=tokens)]
    deeper = [d for d in subdirs if any(parse_concept_folder_name(s.name) for s in _subdirs(d))]
    if deeper:
        raise SdtuneError(f"the {role} {parent} has no '<repeats>_<name>' folders, but {deeper[0]} has: point at "
                          f"{deeper[0]} instead")
    names = ", ".join(d.name for d in subdirs[:5]) or "no subfolders"
    raise SdtuneError(f"no images found in the {role} {parent} ({names}). It should hold folders named "
                      f"'<repeats>_<name>' with images inside, e.g. {parent / '10_mychar'}")


def folder_mode_config(train_data_dir: str | os.PathLike, reg_data_dir: Optional[str | os.PathLike] = None, *,
                       dataset: Optional[DatasetConfig] = None, subset: Optional[SubsetConfig] = None,
                       accept_concept_folder: bool = False) -> tuple[DatasetConfig, tuple[str, ...]]:
    """sd-scripts' `--train_data_dir`/`--reg_data_dir` -> one DatasetConfig (subset settings from `subset`)."""
    dataset, subset = dataset or DatasetConfig(), subset or SubsetConfig()
    warnings: list[str] = []
    subs = _concept_subsets(Path(train_data_dir), False, subset, accept_concept_folder, warnings)
    if reg_data_dir:
        subs += _concept_subsets(Path(reg_data_dir), True, subset, accept_concept_folder, warnings)
    return replace(dataset, subsets=tuple(subs)), tuple(warnings)


def _read_caption_file(path: Path, enable_wildcard: bool) -> str:
    """The caption text (UTF-8, BOM or not): first line, or every non-empty line with wildcards on."""
    text = path.read_bytes().decode("utf-8-sig")  # UnicodeDecodeError / OSError handled by the caller
    lines = text.splitlines()
    if enable_wildcard:
        return "\n".join(line.strip() for line in lines if line.strip())
    return lines[0].strip() if lines else ""


def _caption_candidates(image: Path, extension: str) -> list[Path]:
    """Caption files tried for an image: its stem (and the face-crop-stripped stem) with the configured
    extension first, then with the other of .txt/.caption."""
    stems = [image.with_suffix("")]
    tokens = image.stem.split("_")
    if len(tokens) >= 5 and all(t.lstrip("-").isdigit() for t in tokens[-4:]):
        stems.append(image.with_name("_".join(tokens[:-4])))
    exts = [extension] + [e for e in CAPTION_EXTENSIONS if e != extension]
    return [Path(str(s) + e) for e in exts for s in stems]


def _find_caption(image: Path, sub: SubsetConfig) -> tuple[Optional[str], Optional[Path], Optional[str]]:
    """(caption, its file, problem): the first caption file that exists, read; a file that cannot be read
    comes back with the problem (and no caption), so the image is skipped rather than trained wrongly."""
    for cand in _caption_candidates(image, sub.caption_extension):
        if not cand.is_file():
            continue
        try:
            return _read_caption_file(cand, sub.enable_wildcard), cand, None
        except UnicodeDecodeError:
            return None, cand, "caption is not UTF-8 text (re-save it as UTF-8)"
        except OSError as e:
            return None, cand, f"caption unreadable ({e.strerror or e})"
    return None, None, None


def _scan_subset(sub: SubsetConfig, index: int, options: ScanOptions,
                 warnings: list[str], skipped: list[SkippedFile]) -> tuple[list[ImageRecord], list[Path]]:
    """Read one subset folder: sizes (in threads), captions; broken files skipped and reported."""
    folder = Path(sub.image_dir)
    if not folder.is_dir():
        warnings.append(f"{folder}: not a folder, subset ignored")
        return [], []
    paths = _images_in(folder)
    workers = options.workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        sizes = list(pool.map(lambda p: _size_or_error(p, options.verify_images), paths))
    records, missing, no_file = [], [], []
    fallback = f"the class tokens '{sub.class_tokens}'" if sub.class_tokens else "an empty caption"
    for path, size in zip(paths, sizes):
        if isinstance(size, str):
            skipped.append(SkippedFile(path, size))
            warnings.append(f"{path}: skipped, {size}")
            continue
        caption, cap_path, problem = _find_caption(path, sub)
        if problem is not None:
            skipped.append(SkippedFile(cap_path, problem))
            warnings.append(f"{cap_path}: {problem}; its image {path.name} is skipped")
            continue
        if caption is None or not caption.strip():
            if cap_path is None:
                no_file.append(path)
            else:
                warnings.append(f"{cap_path}: caption file is empty; the image trains with {fallback}")
            missing.append(path)
            caption, cap_path = sub.class_tokens or "", None
        records.append(ImageRecord(path, caption, size, index, sub.is_reg, sub.num_repeats, cap_path))
    if no_file:
        warnings.append(f"{folder}: {len(no_file)} image(s) have no {sub.caption_extension} caption file and train "
                        f"with {fallback} (first: {no_file[0].name})")
    return records, missing


def _size_or_error(path: Path, verify: bool) -> tuple[int, int] | str:
    """Image size, or the reason it cannot be read (so one broken file never stops the scan)."""
    try:
        return read_image_size(path, verify)
    except ImageReadError as e:
        return str(e)


def _split_validation(records: list[ImageRecord], split: float, seed: Optional[int]) -> list[ImageRecord]:
    """sd-scripts' `split_train_val` per subset: shuffle with the validation seed, hold out the tail."""
    if split <= 0 or not records:
        return records
    order = list(range(len(records)))
    random.Random(seed if seed is not None else 0).shuffle(order)  # sd-scripts: unseeded when None
    n_train = math.ceil(len(order) * (1 - split))
    val = set(order[n_train:])
    return [replace(r, is_validation=True, repeats=1) if i in val else r for i, r in enumerate(records)]


def _balance_reg(records: list[ImageRecord], num_train: int) -> list[ImageRecord]:
    """sd-scripts' rule: register reg images until their samples reach the training samples; too few
    get extra repeats round-robin, surplus ones are unused (repeats 0)."""
    reg_idx = [i for i, r in enumerate(records) if r.is_reg]
    if not reg_idx:
        return records
    repeats = {i: 0 for i in reg_idx}
    n, first = 0, True
    while n < num_train:
        for i in reg_idx:
            if first:
                repeats[i] = records[i].repeats
                n += records[i].repeats
            else:
                repeats[i] += 1
                n += 1
            if n >= num_train:
                break
        first = False
    return [replace(r, repeats=repeats[i]) if i in repeats else r for i, r in enumerate(records)]


def scan_dataset(config: DatasetConfig, options: Optional[ScanOptions] = None, *,
                 progress: Optional[Callable[[int, int, str], None]] = None) -> DatasetScan:
    """Scan every subset of one dataset: images, sizes, captions, repeats; reg images balanced as sd-scripts."""
    options = options or ScanOptions()
    warnings: list[str] = []
    skipped: list[SkippedFile] = []
    records: list[ImageRecord] = []
    subsets: list[SubsetScan] = []
    seen: set[tuple[str, bool]] = set()
    kept: list[SubsetConfig] = []
    for sub in config.subsets:
        key = (os.path.realpath(sub.image_dir), sub.is_reg)
        if key in seen:
            warnings.append(f"{sub.image_dir}: listed twice in one dataset, the first entry is used")
            continue
        if sub.num_repeats < 1:
            warnings.append(f"{sub.image_dir}: ignored, num_repeats = {sub.num_repeats} (use 1 or more)")
            continue
        seen.add(key)
        kept.append(sub)
        ignored = [k for k, on in (("face_crop_aug_range", sub.face_crop_aug_range is not None),
                                   ("alpha_mask", sub.alpha_mask)) if on]
        if ignored:
            warnings.append(f"{sub.image_dir}: {' and '.join(ignored)} are accepted for sd-scripts compatibility but "
                            f"not applied by sdtune (transparent pixels are flattened onto white)")
    for i, sub in enumerate(kept):
        if progress is not None:
            progress(i, len(kept), sub.image_dir)
        recs, missing = _scan_subset(sub, len(subsets), options, warnings, skipped)
        if not recs:
            warnings.append(f"{sub.image_dir}: no usable images, subset ignored")
            continue
        if not sub.is_reg:
            recs = _split_validation(recs, config.validation_split, config.validation_seed)
        records += [replace(r, subset_index=len(subsets)) for r in recs]
        subsets.append(SubsetScan(sub, sum(1 for r in recs if not r.is_validation), tuple(missing)))
    if progress is not None:
        progress(len(kept), len(kept), "")
    num_train = sum(r.repeats for r in records if not r.is_reg and not r.is_validation)
    if num_train == 0:
        where = ", ".join(s.image_dir for s in config.subsets[:3]) or "(no folders)"
        unreadable = f"; {len(skipped)} file(s) were unreadable" if skipped else ""
        raise SdtuneError(f"no training images found in {where}. Images must be png, jpg, jpeg, webp or bmp files "
                          f"inside the concept folders{unreadable}")
    num_reg = sum(r.repeats for r in records if r.is_reg)
    if num_reg > num_train:
        warnings.append(f"{num_reg} reg samples for {num_train} training samples: some reg images are not used")
    records = _balance_reg(records, num_train)
    return DatasetScan(config, tuple(subsets), tuple(records), tuple(warnings), tuple(skipped))


def scan_folder(train_data_dir: str | os.PathLike, reg_data_dir: Optional[str | os.PathLike] = None, *,
                dataset: Optional[DatasetConfig] = None, subset: Optional[SubsetConfig] = None,
                options: Optional[ScanOptions] = None,
                progress: Optional[Callable[[int, int, str], None]] = None) -> DatasetScan:
    """Folder mode in one call: `<repeats>_<tokens>` folders under `train_data_dir` (and `reg_data_dir`)."""
    options = options or ScanOptions()
    cfg, warnings = folder_mode_config(train_data_dir, reg_data_dir, dataset=dataset, subset=subset,
                                       accept_concept_folder=options.accept_concept_folder)
    scan = scan_dataset(cfg, options, progress=progress)
    return replace(scan, warnings=warnings + scan.warnings)


def scan_dataset_config(path: str | os.PathLike, defaults: Optional[dict] = None,
                        options: Optional[ScanOptions] = None) -> tuple[DatasetScan, ...]:
    """Read an sd-scripts dataset_config (TOML/JSON) and scan each of its datasets."""
    return tuple(scan_dataset(cfg, options) for cfg in load_dataset_config(path, defaults))


def scan_path(path: str | os.PathLike, reg_data_dir: Optional[str | os.PathLike] = None, *,
              dataset: Optional[DatasetConfig] = None, subset: Optional[SubsetConfig] = None,
              options: Optional[ScanOptions] = None, defaults: Optional[dict] = None) -> tuple[DatasetScan, ...]:
    """Either input sd-scripts takes: a dataset_config file (.toml/.json; `defaults` fill what it leaves
    out) or a training folder of `<repeats>_<name>` folders (with `dataset`/`subset` settings)."""
    p = Path(path)
    if p.is_file() and p.suffix.lower() in (".toml", ".json"):
        if reg_data_dir:
            raise SdtuneError(f"{p} is a dataset_config, which lists its own reg folders (is_reg = true): do not "
                              f"give a reg folder as well")
        return scan_dataset_config(p, defaults, options)
    if p.is_file():
        raise SdtuneError(f"{p} is a file: give the training folder (the parent of '<repeats>_<name>' folders) or a "
                          f"dataset_config .toml")
    return (scan_folder(p, reg_data_dir, dataset=dataset, subset=subset, options=options),)
