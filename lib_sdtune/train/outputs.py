"""What a training run writes: LoRA files named as sd-scripts names them, their `ss_*` metadata, pruning.

Names (`library/train_util.py` EPOCH_FILE_NAME etc.): `<name>-<epoch:06d>.safetensors` per epoch,
`<name>-step<step:08d>.safetensors` per step, `<name>.safetensors` at the end; `save_last_n_epochs` /
`save_last_n_steps` delete older files of the same kind. The metadata adds sd-scripts' training keys to
the network's own (`networks/kohya_file.py`) and the effective config as `sdtune_train_config`.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..io.hashes import file_hashes
from .config import TrainConfig, config_to_dict

__all__ = ["RunInfo", "epoch_file", "step_file", "final_file", "training_metadata", "prune_old"]


def epoch_file(out_dir: Path, name: str, epoch: int) -> Path:
    return out_dir / f"{name}-{epoch:06d}.safetensors"


def step_file(out_dir: Path, name: str, step: int) -> Path:
    return out_dir / f"{name}-step{step:08d}.safetensors"


def final_file(out_dir: Path, name: str) -> Path:
    return out_dir / f"{name}.safetensors"


def prune_old(out_dir: Path, name: str, keep_epochs: Optional[int], keep_steps: Optional[int],
              epoch: int, step: int, every_n_epochs: Optional[int], every_n_steps: Optional[int]) -> list[Path]:
    """Delete the epoch/step file that fell out of the last-N window (sd-scripts' rule); returns what went."""
    gone = []
    if keep_epochs and every_n_epochs:
        old = epoch - every_n_epochs * keep_epochs
        if old > 0:
            gone.append(epoch_file(out_dir, name, old))
    if keep_steps and every_n_steps:
        old = step - every_n_steps * keep_steps
        if old > 0:
            gone.append(step_file(out_dir, name, old))
    removed = []
    for p in gone:
        if p.exists():
            p.unlink()
            removed.append(p)
    return removed


@dataclass
class RunInfo:
    """Facts about a run that go into every saved file's metadata."""

    config: TrainConfig
    seed: int
    num_batches_per_epoch: int
    num_epochs: int
    max_train_steps: int
    optimizer: str
    dataset_metadata: dict[str, str]
    session_id: int = field(default_factory=lambda: random.randint(0, 2**32))
    started_at: float = field(default_factory=time.time)
    model_hashes: dict[str, str] = field(default_factory=dict)

    def fill_model_hashes(self) -> None:
        """`ss_sd_model_hash` (A1111's old hash) and `ss_new_sd_model_hash` (sha256) of the base model file, and
        `ss_vae_name`/`ss_vae_hash`/`ss_new_vae_hash` of a separate VAE file, as sd-scripts writes them."""
        if self.model_hashes:
            return
        path = Path(self.config.pretrained_model_name_or_path)
        if path.is_file():
            h = file_hashes(path)
            self.model_hashes = {"ss_sd_model_hash": h.autov1, "ss_new_sd_model_hash": h.sha256}
        if self.config.vae:
            vae = Path(self.config.vae)
            self.model_hashes["ss_vae_name"] = vae.name
            if vae.is_file():
                h = file_hashes(vae)
                self.model_hashes.update(ss_vae_hash=h.autov1, ss_new_vae_hash=h.sha256)


def _s(value: Any) -> str:
    return str(value)


def training_metadata(run: RunInfo, epoch: int, step: int) -> dict[str, str]:
    """sd-scripts' `ss_*` training keys for a file saved at (epoch, step), plus the effective config."""
    c = run.config
    meta = {
        "ss_session_id": _s(run.session_id),
        "ss_training_started_at": _s(run.started_at),
        "ss_training_finished_at": _s(time.time()),
        "ss_output_name": c.output_name,
        "ss_learning_rate": _s(c.learning_rate),
        "ss_text_encoder_lr": _s(c.text_encoder_lr),
        "ss_unet_lr": _s(c.unet_lr),
        "ss_num_batches_per_epoch": _s(run.num_batches_per_epoch),
        "ss_num_epochs": _s(run.num_epochs),
        "ss_epoch": _s(epoch),
        "ss_steps": _s(step),
        "ss_max_train_steps": _s(run.max_train_steps),
        "ss_gradient_checkpointing": _s(c.gradient_checkpointing),
        "ss_gradient_accumulation_steps": _s(c.gradient_accumulation_steps),
        "ss_lr_warmup_steps": _s(c.lr_warmup_steps),
        "ss_lr_scheduler": c.lr_scheduler,
        "ss_mixed_precision": c.mixed_precision,
        "ss_full_fp16": _s(c.full_fp16),
        "ss_clip_skip": _s(c.clip_skip),
        "ss_max_token_length": _s(c.max_token_length),
        "ss_cache_latents": _s(c.cache_latents),
        "ss_seed": _s(run.seed),
        "ss_noise_offset": _s(c.noise_offset),
        "ss_multires_noise_iterations": _s(c.multires_noise_iterations),
        "ss_multires_noise_discount": _s(c.multires_noise_discount),
        "ss_adaptive_noise_scale": _s(c.adaptive_noise_scale),
        "ss_zero_terminal_snr": _s(c.zero_terminal_snr),
        "ss_training_comment": _s(c.training_comment),
        "ss_sd_scripts_commit_hash": "(unknown)",
        "ss_optimizer": run.optimizer,
        "ss_max_grad_norm": _s(c.max_grad_norm),
        "ss_prior_loss_weight": _s(c.prior_loss_weight),
        "ss_min_snr_gamma": _s(c.min_snr_gamma),
        "ss_scale_weight_norms": _s(c.scale_weight_norms),
        "ss_ip_noise_gamma": _s(c.ip_noise_gamma),
        "ss_debiased_estimation": _s(c.debiased_estimation_loss),
        "ss_loss_type": c.loss_type,
        "ss_huber_schedule": c.huber_schedule,
        "ss_huber_c": _s(c.huber_c),
        "ss_sd_model_name": Path(c.pretrained_model_name_or_path).name,
        **run.model_hashes,
        **run.dataset_metadata,
        "sdtune_train_config": json.dumps(config_to_dict(c), default=str),
    }
    if c.metadata_title:
        meta["modelspec.title"] = c.metadata_title
    for key in ("author", "description", "license", "tags", "trigger_phrase"):
        value = getattr(c, f"metadata_{key}")
        if value:
            meta[f"modelspec.{key}"] = value
    return meta
