"""The data side of a training run: scan, batches, held-out images, caches and the dataset metadata.

The train config's dataset keys (sd-scripts names) go through `data.toml_config.split_train_args`, so a
folder-mode run and a `dataset_config` run read the same settings the way sd-scripts does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from ..data.latent_cache import LatentCache, vae_fingerprint
from ..data.loader import LoaderOptions, TrainingData, make_training_data
from ..data.metadata import dataset_config_metadata, folder_mode_metadata
from ..data.scan import scan_dataset_config, scan_folder
from ..data.te_cache import text_encoder_cache_refusal
from ..data.toml_config import folder_mode_templates, split_train_args
from ..errors import SdtuneError
from .conditioning import CachedTextEncoding
from .config import TrainConfig, config_to_dict

__all__ = ["RunData", "prepare_data"]

log = logging.getLogger(__name__)


@dataclass
class RunData:
    """Batches for training (and validation), the run's dataset metadata and the optional TE cache."""

    train: TrainingData
    validation: Optional[TrainingData]
    validation_seed: int
    metadata: dict[str, str]
    te_cache: Optional[CachedTextEncoding]


def _dataset_settings(cfg: TrainConfig) -> dict:
    """The config's dataset keys under dataset_config names, only where they differ from the defaults."""
    defaults = config_to_dict(TrainConfig())
    values = {k: v for k, v in config_to_dict(cfg).items() if v != defaults.get(k) or k == "caption_extension"}
    data, _ = split_train_args(values)
    return data


def prepare_data(cfg: TrainConfig, seed: int, vae: Optional[torch.nn.Module] = None,
                 notes: Optional[list[str]] = None) -> RunData:
    """Scan the dataset, plan the batches, build the latent cache if asked, and say what was skipped."""
    notes = notes if notes is not None else []
    settings = _dataset_settings(cfg)
    if cfg.dataset_config:
        scans = scan_dataset_config(cfg.dataset_config, defaults=settings)
        metadata_fn = "config"
    else:
        dataset, subset = folder_mode_templates(settings, "the train config")
        scans = (scan_folder(cfg.train_data_dir, cfg.reg_data_dir, dataset=dataset, subset=subset),)
        metadata_fn = "folder"
    for scan in scans:
        notes += list(scan.warnings) + [f"{s.path}: skipped ({s.reason})" for s in scan.skipped]
    options = LoaderOptions(seed=seed, workers=cfg.max_data_loader_n_workers, max_train_steps=cfg.max_train_steps or 0,
                            gradient_accumulation_steps=cfg.gradient_accumulation_steps)
    cache = None
    if cfg.cache_latents or cfg.cache_latents_to_disk:
        if vae is None:
            raise SdtuneError("cache_latents needs the model's VAE")
        cache = LatentCache(vae_fingerprint(vae), to_disk=cfg.cache_latents_to_disk)
    train = make_training_data(scans, options, cache)
    if cache is not None:
        report = cache.build(train, vae, seed=seed)
        notes += [f"{p}: latent cache rebuilt ({why})" for p, why in report.rebuilt]
    held_out = [s.validation_scan() for s in scans if s.validation_images]
    validation = make_training_data(held_out, options) if held_out else None
    if metadata_fn == "folder":
        metadata = folder_mode_metadata(scans[0], train.plans[0])
    else:
        metadata = dataset_config_metadata(scans, train.plans)
    te_cache = None
    if cfg.cache_text_encoder_outputs:
        why = text_encoder_cache_refusal([s.config for scan in scans for s in scan.subsets],
                                         cfg.train_text_encoder and cfg.text_encoder_lr != 0)
        if why:
            raise SdtuneError(f"cache_text_encoder_outputs cannot be used: {why} (set network_train_unet_only = "
                              "true and turn those caption options off, or turn the cache off)")
        te_cache = CachedTextEncoding()
    val_seed = cfg.validation_seed if cfg.validation_seed is not None else seed
    return RunData(train, validation, val_seed, metadata, te_cache)
