"""The trainer's one typed config, with sd-scripts' `train_network.py` argument names and defaults.

A config file is sd-scripts' `--config_file` TOML (sections are flattened, keys are argument names) or a
kohya_ss GUI JSON (its differently named keys are mapped; GUI-only settings are listed as ignored).
Unknown keys are an error naming the key. Where sdtune's default differs from sd-scripts' it says so.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from ..errors import SdtuneError

try:  # Python 3.11+
    import tomllib
except ImportError:  # pragma: no cover - Python 3.10 (A1111)
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = ["TrainConfig", "load_train_config", "config_from_dict", "apply_overrides", "config_to_dict"]

Floats = Union[float, list[float], None]


@dataclass
class TrainConfig:
    """Everything one training run needs (sd-scripts names; see research/kohya_lycoris.md section 3)."""

    # model
    pretrained_model_name_or_path: str = ""
    v2: bool = False  # accepted: the architecture is detected from the file
    v_parameterization: Optional[bool] = None  # None = detected (SD2 768-v); True/False forces it
    vae: Optional[str] = None
    # data (folder mode, or dataset_config)
    train_data_dir: Optional[str] = None
    reg_data_dir: Optional[str] = None
    dataset_config: Optional[str] = None
    resolution: Any = 512
    train_batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    caption_extension: str = ".txt"  # sd-scripts' CLI default is ".caption" (also tried)
    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: Optional[str] = None
    caption_prefix: Optional[str] = None
    caption_suffix: Optional[str] = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0.0
    color_aug: bool = False
    flip_aug: bool = False
    random_crop: bool = False
    prior_loss_weight: float = 1.0
    max_token_length: Optional[int] = None  # None = 75; 150 or 225
    clip_skip: Optional[int] = None
    cache_latents: bool = False
    cache_latents_to_disk: bool = False
    cache_text_encoder_outputs: bool = False
    validation_split: float = 0.0
    validation_seed: Optional[int] = None
    validate_every_n_epochs: Optional[int] = None
    max_data_loader_n_workers: int = 2  # sd-scripts: 8 (capped at the CPU count)
    # network
    network_module: str = "networks.lora"
    network_dim: Optional[int] = None  # None = 4
    network_alpha: Optional[float] = None  # None = 1
    network_args: list[str] = field(default_factory=list)
    network_dropout: Optional[float] = None
    network_weights: Optional[str] = None
    network_train_unet_only: bool = False
    network_train_text_encoder_only: bool = False
    scale_weight_norms: Optional[float] = None
    # optimizer and schedule
    learning_rate: float = 1e-4  # sd-scripts: 2e-6 (its fine-tuning default); 1e-4 is the LoRA norm
    unet_lr: Optional[float] = None
    text_encoder_lr: Floats = None
    optimizer_type: str = "AdamW"
    optimizer_args: list[str] = field(default_factory=list)
    lr_scheduler: str = "constant"
    lr_warmup_steps: float = 0
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    lr_scheduler_min_lr_ratio: Optional[float] = None
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1
    max_train_steps: int = 1600
    max_train_epochs: Optional[int] = None
    seed: Optional[int] = None  # None = a random seed, recorded in the metadata
    # precision and memory
    mixed_precision: str = "no"
    full_fp16: bool = False
    full_bf16: bool = False
    fp8_base: bool = False
    no_half_vae: bool = False
    save_precision: Optional[str] = None  # float | fp16 | bf16; None = the network's dtype (fp32)
    gradient_checkpointing: bool = False
    # noise, timesteps, loss
    noise_offset: Optional[float] = None
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: Optional[float] = None
    multires_noise_iterations: Optional[int] = None
    multires_noise_discount: float = 0.3
    ip_noise_gamma: Optional[float] = None
    ip_noise_gamma_random_strength: bool = False
    min_timestep: int = 0
    max_timestep: int = 1000
    zero_terminal_snr: bool = False
    min_snr_gamma: Optional[float] = None
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: Optional[float] = None
    debiased_estimation_loss: bool = False
    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    # saving and resuming
    output_dir: str = "output"
    output_name: str = "last"  # sd-scripts' default name
    save_model_as: str = "safetensors"
    save_every_n_epochs: Optional[int] = None
    save_every_n_steps: Optional[int] = None
    save_last_n_epochs: Optional[int] = None
    save_last_n_steps: Optional[int] = None
    save_state: bool = False
    save_state_on_train_end: bool = False
    resume: Optional[str] = None
    training_comment: Optional[str] = None
    no_metadata: bool = False
    metadata_title: Optional[str] = None
    metadata_author: Optional[str] = None
    metadata_description: Optional[str] = None
    metadata_license: Optional[str] = None
    metadata_tags: Optional[str] = None
    metadata_trigger_phrase: Optional[str] = None  # sdtune: modelspec.trigger_phrase
    logging_dir: Optional[str] = None  # TensorBoard logs (when tensorboard is installed)
    # sample images
    sample_prompts: Optional[str] = None  # sd-scripts prompt file (.txt with --n --w --h --d --l --s --ss, or .json)
    sample_every_n_epochs: Optional[int] = None
    sample_every_n_steps: Optional[int] = None
    sample_at_first: bool = False
    sample_sampler: str = "ddim"

    def validate(self) -> None:
        """Refuse contradictory or impossible settings before anything is loaded."""
        if not self.pretrained_model_name_or_path:
            raise SdtuneError("pretrained_model_name_or_path is required: the checkpoint to train on")
        if not (self.train_data_dir or self.dataset_config):
            raise SdtuneError("train_data_dir (the parent of '<repeats>_<name>' folders) or dataset_config is required")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise SdtuneError(f"mixed_precision = {self.mixed_precision!r}: use no, fp16 or bf16")
        if self.save_precision not in (None, "float", "fp32", "fp16", "bf16"):
            raise SdtuneError(f"save_precision = {self.save_precision!r}: use float, fp16 or bf16")
        if self.save_model_as != "safetensors":
            raise SdtuneError(f"save_model_as = {self.save_model_as!r}: sdtune writes safetensors only "
                              "(pickled .ckpt/.pt files can run code when loaded)")
        if self.network_train_unet_only and self.network_train_text_encoder_only:
            raise SdtuneError("network_train_unet_only and network_train_text_encoder_only exclude each other")
        if self.max_token_length not in (None, 75, 150, 225):
            raise SdtuneError(f"max_token_length = {self.max_token_length}: use 75, 150 or 225")
        if self.train_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise SdtuneError("train_batch_size and gradient_accumulation_steps must be at least 1")
        if not 0 <= self.min_timestep < self.max_timestep <= 1000:
            raise SdtuneError(f"min_timestep/max_timestep = {self.min_timestep}/{self.max_timestep}: "
                              "need 0 <= min < max <= 1000")
        if self.full_fp16 and self.mixed_precision != "fp16" or self.full_bf16 and self.mixed_precision != "bf16":
            raise SdtuneError("full_fp16/full_bf16 need the matching mixed_precision (fp16/bf16)")
        if self.vae and not Path(self.vae).is_file():
            raise SdtuneError(f"vae = {self.vae!r}: no such file (give a VAE .safetensors, e.g. from "
                              "A1111's models/VAE)")
        if not self.max_train_epochs and not self.max_train_steps:
            raise SdtuneError("max_train_epochs or max_train_steps must be set (sd-scripts' default is 1600 steps)")
        if self.fp8_base:
            from .fp8 import check_fp8_base

            check_fp8_base(self.mixed_precision)
        if self.network_module not in ("networks.lora", "lycoris.kohya"):
            raise SdtuneError(f"network_module = {self.network_module!r}: sdtune trains networks.lora "
                              "(LoRA/LoCon) and lycoris.kohya (algo=loha, lokr, full, dora_wd=True ...)")

    @property
    def train_unet(self) -> bool:
        return not self.network_train_text_encoder_only

    @property
    def train_text_encoder(self) -> bool:
        return not self.network_train_unet_only


_FIELDS = {f.name: f for f in fields(TrainConfig)}
# sd-scripts arguments that sdtune accepts and that change nothing here (attention kernels are SDPA, ...)
NO_EFFECT = {"xformers", "sdpa", "mem_eff_attn", "lowram", "highvram", "persistent_data_loader_workers",
             "log_with", "log_prefix", "log_tracker_name", "wandb_run_name", "console_log_level",
             "max_data_loader_workers", "vae_batch_size", "skip_cache_check", "huggingface_repo_id"}
# kohya_ss GUI JSON names -> sd-scripts names
GUI_KEYS = {"optimizer": "optimizer_type", "epoch": "max_train_epochs", "max_resolution": "resolution"}
_GUI_LORA_TYPES = {"Standard": ("networks.lora", None), "Kohya LoCon": ("networks.lora", None),
                   "LoCon": ("lycoris.kohya", "locon"), "LyCORIS/LoCon": ("lycoris.kohya", "locon"),
                   "LyCORIS/LoHa": ("lycoris.kohya", "loha"), "LyCORIS/LoKr": ("lycoris.kohya", "lokr"),
                   "LyCORIS/Native Fine-Tuning": ("lycoris.kohya", "full")}


def _coerce(name: str, value: Any) -> Any:
    """A TOML/JSON/CLI value -> the field's type, with an error naming the field."""
    default = _FIELDS[name].default if _FIELDS[name].default is not dataclasses.MISSING else None
    kind = _FIELDS[name].type
    try:
        if value is None or (isinstance(value, str) and value.strip() in ("", "None") and default is None):
            return None
        if name in ("network_args", "optimizer_args"):
            return [str(v) for v in value] if isinstance(value, (list, tuple)) else str(value).split()
        if name == "text_encoder_lr" and isinstance(value, (list, tuple)):
            return [float(v) for v in value]
        if name == "text_encoder_lr" and isinstance(value, str) and "," in value:
            return [float(v) for v in value.split(",")]
        if name == "resolution":
            return value
        if isinstance(default, bool) or "bool" in str(kind):
            if isinstance(value, str):
                low = value.strip().lower()
                if low not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return low in ("true", "1", "yes")
            return bool(value)
        if "int" in str(kind) and "float" not in str(kind):
            f = float(value)
            if f != int(f):
                raise ValueError
            return int(f)
        if "float" in str(kind):
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise SdtuneError(f"{name} = {value!r}: expected {kind}") from None


def config_from_dict(values: Mapping[str, Any], source: str = "config") -> tuple[TrainConfig, list[str]]:
    """A TrainConfig from sd-scripts argument names (TOML sections flattened first); returns (config, notes).

    Unknown keys raise an error naming them; keys that exist in sd-scripts but change nothing here are noted.
    """
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping) and key not in ("network_args",):
            flat.update(value)  # sd-scripts flattens one level of [sections]
        else:
            flat[key] = value
    notes: list[str] = []
    kwargs: dict[str, Any] = {}
    for key, value in flat.items():
        if key in _FIELDS:
            kwargs[key] = _coerce(key, value)
        elif key in NO_EFFECT:
            notes.append(f"{key}: accepted, no effect in sdtune")
        else:
            raise SdtuneError(f"{source}: unknown setting {key!r} (sd-scripts train_network.py argument names are "
                              "expected; see `python -m lib_sdtune train --help`)")
    return TrainConfig(**kwargs), notes


def _from_gui_json(data: Mapping[str, Any], source: str) -> tuple[TrainConfig, list[str]]:
    """kohya_ss GUI JSON -> TrainConfig: known GUI names mapped, sd-scripts names kept, the rest listed."""
    values: dict[str, Any] = {}
    ignored: list[str] = []
    for key, value in data.items():
        if key == "LoRA_type":
            module, algo = _GUI_LORA_TYPES.get(str(value), (None, None))
            if module is None:
                raise SdtuneError(f"{source}: LoRA_type {value!r} is not trained by sdtune "
                                  f"(one of {', '.join(_GUI_LORA_TYPES)})")
            values["network_module"] = module
            if algo:
                values.setdefault("network_args", [])
                values["_algo"] = algo
        elif key in GUI_KEYS:
            values[GUI_KEYS[key]] = value
        elif key in _FIELDS:
            values[key] = value
        elif value not in ("", None, False, 0):
            ignored.append(key)
    algo = values.pop("_algo", None)
    args = values.get("network_args") or []
    if isinstance(args, str):
        args = args.split()
    for k in ("conv_dim", "conv_alpha"):
        if k in data and data[k] not in ("", None, 0):
            args.append(f"{k}={data[k]}")
    if algo:
        args.insert(0, f"algo={algo}")
    values["network_args"] = args
    for k in ("conv_dim", "conv_alpha"):
        values.pop(k, None)
    cfg, notes = config_from_dict(values, source)
    if ignored:
        notes.append(f"kohya_ss GUI settings not used by sdtune: {', '.join(sorted(ignored))}")
    return cfg, notes


def load_train_config(path: Union[str, Path], overrides: Sequence[str] = ()) -> tuple[TrainConfig, list[str]]:
    """Read a train config (.toml: sd-scripts names; .json: kohya_ss GUI or sd-scripts names) plus `k=v` overrides."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise SdtuneError(f"{p}: cannot read the train config ({e.strerror or e})") from None
    try:
        if p.suffix.lower() == ".json":
            cfg, notes = _from_gui_json(json.loads(text), str(p))
        else:
            cfg, notes = config_from_dict(tomllib.loads(text), str(p))
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise SdtuneError(f"{p}: not valid {'JSON' if p.suffix.lower() == '.json' else 'TOML'} ({e})") from None
    cfg = apply_overrides(cfg, overrides)
    base = p.parent
    # relative paths are relative to the config file
    for name in ("pretrained_model_name_or_path", "train_data_dir", "reg_data_dir", "dataset_config", "vae",
                 "network_weights", "output_dir", "resume", "sample_prompts", "logging_dir"):
        value = getattr(cfg, name)
        if value and not Path(value).is_absolute():
            setattr(cfg, name, str((base / value).resolve()))
    return cfg, notes


def apply_overrides(cfg: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """`--set key=value` entries on top of a config (values parsed as TOML scalars where they parse)."""
    values = config_to_dict(cfg)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or key not in _FIELDS:
            raise SdtuneError(f"--set {item!r}: expected key=value with a train setting name")
        try:
            values[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            values[key] = raw
    return config_from_dict(values)[0]


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config as plain values (for the effective-config file and the metadata)."""
    return dataclasses.asdict(cfg)
