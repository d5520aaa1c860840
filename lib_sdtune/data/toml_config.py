"""sd-scripts `--dataset_config` files (TOML or JSON): general / datasets / subsets, same keys, same precedence.

A value is looked up subset > dataset > [general] > the caller's defaults (the command line's role in
sd-scripts), as `BlueprintGenerator.generate_params_by_fallbacks` does (`library/config_util.py`).
Unknown keys are an error that names the key and where it was, with the nearest known key.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from ..errors import SdtuneError
from .config import INTERPOLATIONS, DatasetConfig, SubsetConfig, normalize_resolution

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (A1111): the same parser, as a package
    import tomli as tomllib

# sd-scripts' schema groups (ConfigSanitizer): which level may hold which key
SUBSET_ASCENDABLE = frozenset({
    "color_aug", "face_crop_aug_range", "flip_aug", "num_repeats", "random_crop", "shuffle_caption", "keep_tokens",
    "keep_tokens_separator", "secondary_separator", "caption_separator", "enable_wildcard", "token_warmup_min",
    "token_warmup_step", "caption_prefix", "caption_suffix", "custom_attributes", "resize_interpolation",
    "caption_dropout_every_n_epochs", "caption_dropout_rate", "caption_tag_dropout_rate",
    "caption_extension", "class_tokens", "cache_info",
    "grayscale_aug_rate",  # sdtune only
})
SUBSET_ONLY = frozenset({"image_dir", "is_reg", "alpha_mask"})
DATASET_ASCENDABLE = frozenset({
    "batch_size", "bucket_no_upscale", "bucket_reso_steps", "enable_bucket", "max_bucket_reso", "min_bucket_reso",
    "validation_seed", "validation_split", "resolution", "network_multiplier", "resize_interpolation",
})
GENERAL_KEYS = SUBSET_ASCENDABLE | DATASET_ASCENDABLE
DATASET_KEYS = GENERAL_KEYS | {"subsets"}
SUBSET_KEYS = SUBSET_ASCENDABLE | SUBSET_ONLY
# keys sd-scripts knows elsewhere, with what to do instead
MISPLACED = {
    "prior_loss_weight": "it is a training option in sd-scripts (--prior_loss_weight), not a dataset_config key: "
                         "set it in the training settings",
    "metadata_file": "fine-tuning subsets (captions from a metadata JSON) are not supported: use image folders with "
                     "caption files",
    "conditioning_data_dir": "ControlNet datasets are not supported: sdtune trains LoRA from image folders",
    "train_batch_size": "in a dataset_config the key is batch_size",
    "dataset_repeats": "in a dataset_config the key is num_repeats",
    "train_data_dir": "a dataset_config lists folders as [[datasets.subsets]] image_dir = \"...\" entries",
    "reg_data_dir": "a dataset_config lists reg folders as [[datasets.subsets]] with is_reg = true",
}


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    raise ValueError("expected true or false")


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError("expected a whole number")
    return v


def _float(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError("expected a number")
    return float(v)


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError("expected a string in quotes")
    return v


def _dict(v: Any) -> dict:
    if not isinstance(v, dict):
        raise ValueError("expected a table")
    return dict(v)


def _pair(v: Any) -> tuple[float, float]:
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise ValueError("expected two numbers, like [2.0, 4.0]")
    return _float(v[0]), _float(v[1])


def _interp(v: Any) -> str:
    s = _str(v)
    if s not in INTERPOLATIONS:
        raise ValueError(f"expected one of {', '.join(INTERPOLATIONS)}")
    return s


def _unit_rate(v: Any) -> float:
    f = _float(v)
    if not 0.0 <= f <= 1.0:
        raise ValueError("expected a probability between 0 and 1")
    return f


CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "image_dir": _str, "num_repeats": _int, "is_reg": _bool, "class_tokens": _str, "caption_extension": _str,
    "shuffle_caption": _bool, "caption_separator": _str, "keep_tokens": _int, "keep_tokens_separator": _str,
    "secondary_separator": _str, "enable_wildcard": _bool, "caption_prefix": _str, "caption_suffix": _str,
    "caption_dropout_rate": _unit_rate, "caption_dropout_every_n_epochs": _int, "caption_tag_dropout_rate": _unit_rate,
    "token_warmup_min": _int, "token_warmup_step": _float, "color_aug": _bool, "flip_aug": _bool,
    "random_crop": _bool, "grayscale_aug_rate": _unit_rate, "face_crop_aug_range": _pair, "custom_attributes": _dict,
    "resize_interpolation": _interp, "cache_info": _bool, "alpha_mask": _bool,
    "batch_size": _int, "enable_bucket": _bool, "min_bucket_reso": _int, "max_bucket_reso": _int,
    "bucket_reso_steps": _int, "bucket_no_upscale": _bool, "network_multiplier": _float, "validation_seed": _int,
    "validation_split": _unit_rate, "resolution": normalize_resolution, "prior_loss_weight": _float,
}


def _check_keys(table: Mapping[str, Any], allowed: frozenset[str], where: str, source: str) -> None:
    """Raise for the first key not allowed at this level, naming it and the nearest allowed key."""
    for key in table:
        if key in allowed:
            continue
        if key in MISPLACED:
            raise SdtuneError(f"{source}: {where} has the key '{key}': {MISPLACED[key]}.")
        if key in SUBSET_ONLY and allowed is not SUBSET_KEYS:
            raise SdtuneError(f"{source}: {where} has the key '{key}', which belongs in each [[datasets.subsets]] "
                              f"entry: move it there.")
        near = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.6)
        hint = f" Did you mean '{near[0]}'?" if near else f" Keys allowed there: {', '.join(sorted(allowed))}."
        raise SdtuneError(f"{source}: {where} has an unknown key '{key}'.{hint}")


def _convert(key: str, value: Any, where: str, source: str) -> Any:
    """Type-check one value, raising an error that names the file, table and key."""
    try:
        return CONVERTERS[key](value)
    except ValueError as e:
        raise SdtuneError(f"{source}: {where}.{key} = {value!r}: {e}.") from None
    except SdtuneError as e:
        raise SdtuneError(f"{source}: {where}: {e}") from None


def _resolve_dir(image_dir: str, base: Optional[Path]) -> str:
    """sd-scripts resolves relative folders from the working directory; fall back to the config's folder."""
    p = Path(os.path.expanduser(image_dir))
    if p.is_absolute() or p.is_dir() or base is None:
        return str(p)
    return str(base / p)


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a `.toml` (tomllib) or `.json` dataset config into a plain dict."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise SdtuneError(f"cannot read the dataset config {p}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8-sig")
        if p.suffix.lower() == ".json":
            return json.loads(text)
        return tomllib.loads(text)
    except UnicodeDecodeError:
        raise SdtuneError(f"the dataset config {p} is not UTF-8 text: save it as UTF-8") from None
    except (ValueError, tomllib.TOMLDecodeError) as e:  # JSONDecodeError is a ValueError
        raise SdtuneError(f"the dataset config {p} is not valid {'JSON' if p.suffix.lower() == '.json' else 'TOML'}: "
                          f"{e}") from None


def parse_dataset_config(data: Mapping[str, Any], defaults: Optional[Mapping[str, Any]] = None,
                         source: str = "dataset config", base_dir: Optional[Path] = None) -> tuple[DatasetConfig, ...]:
    """Validate an sd-scripts dataset config dict and resolve every value subset > dataset > general > defaults."""
    if not isinstance(data, Mapping):
        raise SdtuneError(f"{source}: expected a table with [general] and [[datasets]]")
    _check_keys(data, frozenset({"general", "datasets"}), "the top level", source)
    general = data.get("general", {}) or {}
    if not isinstance(general, Mapping):
        raise SdtuneError(f"{source}: [general] must be a table")
    _check_keys(general, GENERAL_KEYS, "[general]", source)
    datasets = data.get("datasets", [])
    if not isinstance(datasets, list) or not datasets:
        raise SdtuneError(f"{source}: no [[datasets]] entry: add one with at least one [[datasets.subsets]] "
                          f"image_dir = \"...\"")
    defaults = dict(defaults or {})
    unknown_defaults = set(defaults) - GENERAL_KEYS - {"prior_loss_weight"}
    if unknown_defaults:
        raise SdtuneError(f"internal: unknown dataset defaults {sorted(unknown_defaults)}")
    base_levels = [("[general]", general), ("defaults", defaults)]
    out = []
    for di, ds in enumerate(datasets):
        where_ds = f"datasets[{di}]"
        if not isinstance(ds, Mapping):
            raise SdtuneError(f"{source}: {where_ds} must be a table ([[datasets]])")
        _check_keys(ds, DATASET_KEYS, where_ds, source)
        subsets = ds.get("subsets", [])
        if not isinstance(subsets, list) or not subsets:
            raise SdtuneError(f"{source}: {where_ds} has no [[datasets.subsets]]: add one with image_dir = \"...\"")
        ds_levels = [(where_ds, ds), *base_levels]
        sub_cfgs = []
        for si, sub in enumerate(subsets):
            where = f"{where_ds}.subsets[{si}]"
            if not isinstance(sub, Mapping):
                raise SdtuneError(f"{source}: {where} must be a table ([[datasets.subsets]])")
            _check_keys(sub, SUBSET_KEYS, where, source)
            if "image_dir" not in sub:
                raise SdtuneError(f"{source}: {where} has no image_dir: every subset names its image folder")
            values = _resolve(SubsetConfig, [(where, sub), *ds_levels], source)
            values["image_dir"] = _resolve_dir(values["image_dir"], base_dir)
            sub_cfgs.append(SubsetConfig(**values))
        values = _resolve(DatasetConfig, ds_levels, source)
        out.append(DatasetConfig(subsets=tuple(sub_cfgs), **values))
    return tuple(out)


def _resolve(klass: type, levels: list[tuple[str, Mapping[str, Any]]], source: str) -> dict[str, Any]:
    """Each field of `klass` from the first level that has it (sd-scripts' fallback order), type-checked."""
    values: dict[str, Any] = {}
    for f in fields(klass):
        if f.name == "subsets":
            continue
        for where, table in levels:
            if f.name in table:
                values[f.name] = _convert(f.name, table[f.name], where, source)
                break
    return values


def load_dataset_config(path: str | os.PathLike,
                        defaults: Optional[Mapping[str, Any]] = None) -> tuple[DatasetConfig, ...]:
    """Read and validate an sd-scripts `--dataset_config` file (TOML or JSON)."""
    p = Path(path)
    return parse_dataset_config(read_config_file(p), defaults, source=str(p), base_dir=p.parent)


ARG_ALIASES = {"train_batch_size": "batch_size", "dataset_repeats": "num_repeats"}  # sd-scripts' CLI -> config


def split_train_args(args: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """sd-scripts-style training settings -> (dataset keys under their dataset_config names, all other keys).

    The dataset keys are what sd-scripts' command line gives a dataset_config as fallbacks (and what
    folder mode uses directly); `train_batch_size` and `dataset_repeats` are renamed as sd-scripts does.
    """
    data, rest = {}, {}
    for key, value in args.items():
        name = ARG_ALIASES.get(key, key)
        if (name in GENERAL_KEYS or name == "prior_loss_weight") and value is not None:
            data[name] = value
        else:
            rest[key] = value
    return data, rest


def folder_mode_templates(settings: Mapping[str, Any],
                          source: str = "training settings") -> tuple[DatasetConfig, SubsetConfig]:
    """The DatasetConfig and SubsetConfig folder mode starts from, from dataset keys (type-checked as in a
    dataset_config; `num_repeats`/`class_tokens` come from each folder's name instead)."""
    _check_keys(settings, GENERAL_KEYS | {"prior_loss_weight"}, "the dataset settings", source)
    levels = [("settings", settings)]
    return DatasetConfig(**_resolve(DatasetConfig, levels, source)), SubsetConfig(**_resolve(SubsetConfig, levels,
                                                                                               source))
