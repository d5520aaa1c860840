"""The training planner: from a dataset, a base model and a GPU size, a LoRA config with a reason for each value.

Beginners do not know how big a batch, how high an LR or how many steps to use. `plan_training` scans
the dataset (`lib_sdtune.data`), reads the model's family, applies the rules table (`planner_rules.RULES`,
one row per number with its source), does sd-scripts' exact steps math over aspect-ratio buckets, and
returns a `TrainingPlan`: values with reasons, warnings, and a config using sd-scripts' argument names
that `train` accepts as is.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from ..data.buckets import plan_buckets
from ..data.scan import DatasetScan, scan_dataset_config, scan_folder, scan_path
from ..data.toml_config import folder_mode_templates, split_train_args
from ..errors import SdtuneError
from .config import TrainConfig, config_from_dict
from .planner_dataset import DatasetFacts, PlanWarning, dataset_facts, dataset_warnings, find_dataset_root
from .planner_rules import METHODS, PlanFacts, decide, keys_in_order, optimizer_family
from .planner_toml import to_toml, write_toml

__all__ = ["BucketSteps", "ModelFacts", "PlanValue", "PlanWarning", "RepeatsAdvice", "StepsMath", "TrainingPlan",
           "detect_device", "plan_training"]

# keys the rules decide that are not sd-scripts arguments (they feed other values)
_INTERNAL = {"train_batch_size_cap", "lr_warmup_ratio", "total_samples", "max_epochs", "target_epochs"}
_FAMILY_ARGS = {"sd1": ("sd1", False), "sd2": ("sd2", False), "sd2-v": ("sd2", True), "sdxl": ("sdxl", False),
                "sdxl-v": ("sdxl", True)}


@dataclass(frozen=True)
class PlanValue:
    """One recommended setting: its sd-scripts name, value, why, where the number comes from, and the case."""

    key: str
    value: Any
    reason: str
    source: str
    when: str = ""


@dataclass(frozen=True)
class ModelFacts:
    """The base model as far as the plan needs it."""

    family: str  # sd1 | sd2 | sdxl
    v_pred: bool
    architecture: str  # as `model info` names it
    path: Optional[Path]
    how: str  # "checkpoint" | "--family" | "assumed"


@dataclass(frozen=True)
class BucketSteps:
    """One aspect-ratio bucket of an epoch: its size, samples (with repeats and reg) and batches."""

    resolution: tuple[int, int]
    samples: int
    batches: int


@dataclass(frozen=True)
class StepsMath:
    """sd-scripts' steps: batches/epoch = sum over buckets of ceil(samples/batch); steps = epochs x that."""

    train_samples_per_epoch: int  # images x repeats (sd-scripts' num_train_images)
    samples_per_epoch: int  # plus the balanced reg samples
    batch_size: int
    buckets: tuple[BucketSteps, ...]
    batches_per_epoch: int
    target_samples: int
    epochs: int
    total_steps: int


@dataclass(frozen=True)
class RepeatsAdvice:
    """A folder whose repeats would bring the run to about the target number of epochs."""

    folder: str
    current: int
    suggested: int


@dataclass(frozen=True)
class TrainingPlan:
    """The planner's recommendation: values with reasons, the steps math, warnings, and the config."""

    dataset: Path
    model: ModelFacts
    method: str
    vram_gb: float  # 0 = CPU
    values: tuple[PlanValue, ...]
    config: dict[str, Any]
    steps: StepsMath
    dataset_facts: DatasetFacts
    warnings: tuple[PlanWarning, ...] = ()
    repeats_advice: tuple[RepeatsAdvice, ...] = ()

    def value(self, key: str) -> Any:
        """The planned value of one setting (None when the plan leaves it at sd-scripts' default)."""
        return next((v.value for v in self.values if v.key == key), None)

    def reason(self, key: str) -> Optional[PlanValue]:
        """The PlanValue (value, reason, source) of one setting."""
        return next((v for v in self.values if v.key == key), None)

    def _comments(self) -> dict[str, str]:
        return {v.key: f"{v.reason} [{v.source}]" for v in self.values if v.reason}

    def _header(self) -> str:
        return (f"sdtune plan for {self.dataset} ({self.model.architecture}, {self.method}, "
                f"{_device_text(self.vram_gb)}): {self.steps.epochs} epochs, {self.steps.total_steps} steps.\n"
                "sd-scripts train_network.py argument names; `python -m lib_sdtune train THIS_FILE` runs it.")

    def train_config(self, overrides: Optional[dict[str, Any]] = None, source: str = "the plan"
                     ) -> tuple[TrainConfig, list[str]]:
        """The plan as a TrainConfig, with a face's choices (sd-scripts names, e.g. network_dim) on top."""
        return config_from_dict({**self.config, **(overrides or {})}, source)

    def to_toml(self) -> str:
        """The config as TOML, each value with its reason as a comment."""
        return to_toml(self.config, self._comments(), self._header())

    def write(self, path: str | os.PathLike) -> Path:
        """Write the config atomically as TOML."""
        return write_toml(path, self.config, self._comments(), self._header())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: values, reasons, steps, warnings (the CLI's --json)."""
        return {
            "dataset": str(self.dataset), "architecture": self.model.architecture, "family": self.model.family,
            "model_detected_from": self.model.how, "method": self.method, "vram_gb": self.vram_gb,
            "config": self.config,
            "values": {v.key: {"value": v.value, "reason": v.reason, "source": v.source, "when": v.when}
                       for v in self.values},
            "steps": {"train_samples_per_epoch": self.steps.train_samples_per_epoch,
                      "samples_per_epoch": self.steps.samples_per_epoch, "batch_size": self.steps.batch_size,
                      "batches_per_epoch": self.steps.batches_per_epoch, "epochs": self.steps.epochs,
                      "total_steps": self.steps.total_steps, "target_samples": self.steps.target_samples,
                      "buckets": [{"resolution": list(b.resolution), "samples": b.samples, "batches": b.batches}
                                  for b in self.steps.buckets]},
            "images": self.dataset_facts.n_images, "reg_images": self.dataset_facts.n_reg,
            "warnings": [{"kind": w.kind, "message": w.message, "source": w.source} for w in self.warnings],
            "repeats_advice": [{"folder": a.folder, "current": a.current, "suggested": a.suggested}
                               for a in self.repeats_advice],
        }

    def to_text(self) -> str:
        """The plan for people: each value with its reason and source, the steps math, then the warnings."""
        from .planner_report import format_plan

        return format_plan(self)


def detect_device() -> tuple[float, bool]:
    """(VRAM in GB of CUDA device 0, bf16 supported) on this machine; (0, False) without CUDA."""
    try:
        import torch

        if not torch.cuda.is_available():
            return 0.0, False
        props = torch.cuda.get_device_properties(0)
        return round(props.total_memory / 1024 ** 3, 1), bool(torch.cuda.is_bf16_supported())
    except Exception:  # a broken CUDA install plans for the CPU rather than failing
        return 0.0, False


def _device_text(vram_gb: float) -> str:
    return f"{vram_gb:g} GB GPU" if vram_gb else "CPU only"


def _model_facts(model_path: Optional[str | os.PathLike], family: Optional[str],
                 warnings: list[PlanWarning]) -> ModelFacts:
    """Family and prediction type from the checkpoint (`model info`'s detection), else from `family`."""
    if family is not None and family not in _FAMILY_ARGS:
        raise SdtuneError(f"family {family!r}: use one of {', '.join(_FAMILY_ARGS)}")
    if model_path is None:
        if family is None:
            warnings.append(PlanWarning("model", "no base model given: planned for SD1.x; give --model CKPT (or "
                                        "--family) and add pretrained_model_name_or_path before training"))
            return ModelFacts("sd1", False, "sd1", None, "assumed")
        fam, v = _FAMILY_ARGS[family]
        return ModelFacts(fam, v, family, None, "--family")
    from ..models.inspect import inspect_model

    info = inspect_model(model_path, hashes=False)
    if info.family == "sdxl-refiner":
        raise SdtuneError(f"{model_path}: an SDXL refiner; LoRAs are trained on the SDXL base model (or a "
                          "fine-tune of it), not the refiner")
    v = info.prediction_type == "v_prediction"
    arch = info.architecture + ("-v" if info.family == "sdxl" and v else "")
    if family is not None and _FAMILY_ARGS[family] != (info.family, v):
        warnings.append(PlanWarning("model", f"--family {family} disagrees with the checkpoint, which is {arch}: "
                                    "the checkpoint wins"))
    return ModelFacts(info.family, v, arch, Path(model_path).resolve(), "checkpoint")


def _scan(root: Path, is_config: bool, reg: Optional[Path], data_keys: Optional[dict] = None
          ) -> tuple[DatasetScan, ...]:
    """Scan the dataset as `train` will: folder mode from the dataset keys, or the dataset_config with them
    as fallbacks (sd-scripts' precedence: the file's own values win)."""
    if data_keys is None:
        return scan_path(root, reg)
    if is_config:
        return scan_dataset_config(root, defaults=data_keys)
    ds, sub = folder_mode_templates(data_keys, "the plan")
    return (scan_folder(root, reg, dataset=ds, subset=sub),)


def _steps(scans: Sequence[DatasetScan], target: float, max_epochs: int) -> tuple[StepsMath, float]:
    """sd-scripts' steps math (research §2.6) over the real buckets; also the unclamped epoch count."""
    buckets: list[BucketSteps] = []
    for scan in scans:
        recs = scan.epoch_images
        plan = plan_buckets(scan.config, [r.size for r in recs], [r.repeats for r in recs])
        buckets += [BucketSteps(reso, len(m), math.ceil(len(m) / plan.batch_size))
                    for reso, m in zip(plan.resos, plan.members)]
    train = sum(s.num_train_images for s in scans)
    raw = target / train
    epochs = min(max_epochs, max(1, round(raw)))
    per_epoch = sum(b.batches for b in buckets)
    steps = StepsMath(train, sum(s.samples_per_epoch for s in scans), scans[0].config.batch_size, tuple(buckets),
                      per_epoch, round(target), epochs, epochs * per_epoch)
    return steps, raw


def _repeats_advice(scans: Sequence[DatasetScan], factor: float) -> tuple[RepeatsAdvice, ...]:
    """Per training folder: repeats x factor (at least 1), where that changes anything."""
    out = []
    for scan in scans:
        for sub in scan.subsets:
            c = sub.config
            new = max(1, round(c.num_repeats * factor))
            if not c.is_reg and new != c.num_repeats:
                out.append(RepeatsAdvice(c.image_dir, c.num_repeats, new))
    return tuple(out)


def _output_name(root: Path, facts: DatasetFacts) -> str:
    name = facts.first_tag if facts.first_tag and facts.first_tag in facts.shared_tags else root.stem
    return re.sub(r"[^\w.-]+", "_", name).strip("._") or "lora"


def plan_training(dataset_path: str | os.PathLike, model_path: Optional[str | os.PathLike] = None,
                  method: str = "lora", vram_gb: Optional[float] = None, family: Optional[str] = None, *,
                  optimizer: Optional[str] = None, reg_data_dir: Optional[str | os.PathLike] = None,
                  output_dir: Optional[str | os.PathLike] = None, output_name: Optional[str] = None,
                  bf16: Optional[bool] = None, check_duplicates: bool = True) -> TrainingPlan:
    """Plan a LoRA/LyCORIS run for a dataset (kohya parent folder or dataset_config .toml/.json).

    `vram_gb`: the GPU's memory (0 = no GPU, train on the CPU; None = this machine's CUDA device 0).
    `family` (sd1, sd2, sd2-v, sdxl) is used when no `model_path` is given. `optimizer` overrides the
    planner's choice (its LRs follow the optimizer's family). `bf16`: whether the GPU runs bf16
    (None = ask this machine's GPU when `vram_gb` is None, else assume not and use fp16).
    """
    method = method.lower()
    if method not in METHODS:
        raise SdtuneError(f"method {method!r}: use one of {', '.join(METHODS)}")
    warnings: list[PlanWarning] = []
    model = _model_facts(model_path, family, warnings)
    if vram_gb is None:
        vram_gb, local_bf16 = detect_device()
        bf16 = local_bf16 if bf16 is None else bf16
    elif vram_gb < 0:
        raise SdtuneError(f"vram {vram_gb} GB: give the GPU's memory in GB (0 for no GPU)")
    bf16 = bool(bf16) and vram_gb > 0
    path = Path(dataset_path).expanduser().resolve()
    if not path.exists():
        raise SdtuneError(f"{path}: no such folder or file; give the training folder (the parent of "
                          "'<repeats>_<name>' folders) or a dataset_config .toml")
    is_config = path.is_file() and path.suffix.lower() in (".toml", ".json")
    root, level = (path, None) if is_config else find_dataset_root(path)
    if level is not None:
        warnings.append(level)
    reg = Path(reg_data_dir).expanduser().resolve() if reg_data_dir else None
    facts = dataset_facts(_scan(root, is_config, reg), check_duplicates)
    pf = PlanFacts(model.family, model.v_pred, method, optimizer_family(optimizer) if optimizer else "adamw",
                   vram_gb, bf16, facts.n_images, facts.tag_captions,
                   bool(facts.first_tag and facts.first_tag in facts.shared_tags), facts.long_captions,
                   facts.caption_extension)

    d = _Decisions(pf)
    _decide_settings(d, optimizer, warnings)
    _decide_files(d, root, is_config, reg, model, facts, output_dir, output_name)
    data_keys, _ = split_train_args(_config(d.values))
    scans = _scan(root, is_config, reg, data_keys)
    if is_config and any(s.config.batch_size != d.chosen["train_batch_size"] for s in scans):
        warnings.append(PlanWarning("dataset_config", f"{root} sets its own batch_size "
                                    f"({', '.join(str(s.config.batch_size) for s in scans)}); it wins over the "
                                    f"planned {d.chosen['train_batch_size']}"))
    steps, advice = _decide_duration(d, scans, warnings)
    res = tuple(int(x) for x in str(d.chosen["resolution"]).split(","))
    warnings += dataset_warnings(scans, facts, (res[0], res[-1]))
    warnings += _device_warnings(pf, model)
    values = {k: v for k, v in d.values.items() if k not in _INTERNAL}
    return TrainingPlan(root, model, method, float(vram_gb), tuple(values.values()), _config(values), steps, facts,
                        tuple(warnings), advice)


class _Decisions:
    """The values decided so far for one plan (rules read earlier choices), each with its reason."""

    def __init__(self, facts: PlanFacts):
        self.facts = facts
        self.chosen: dict[str, Any] = {}
        self.values: dict[str, PlanValue] = {}

    def put(self, key: str, value: Any, reason: str, source: str, when: str = "") -> None:
        """Set one value with its reason and source."""
        self.chosen[key] = value
        self.values[key] = PlanValue(key, value, reason, source, when)

    def rule(self, key: str) -> None:
        """Set one value from the rules table."""
        value, row = decide(key, self.facts, self.chosen)
        self.put(key, value, row.reason, row.source, row.when)


def _decide_settings(d: _Decisions, optimizer: Optional[str], warnings: list[PlanWarning]) -> None:
    """Every rule-table setting that does not depend on the epoch count, in table order."""
    keys = keys_in_order()
    for key in keys[:keys.index("total_samples")]:
        if key == "optimizer_type" and optimizer:
            d.put(key, optimizer, "your choice; the LRs below follow its family", "--optimizer")
            if not d.facts.cuda and "8bit" in optimizer.lower():
                warnings.append(PlanWarning("optimizer", f"{optimizer} needs a CUDA GPU (bitsandbytes); on the CPU "
                                            "use AdamW", "research §3.2"))
            continue
        d.rule(key)
        if key == "train_batch_size_cap" and d.chosen[key] is not None:
            cap = d.values[key]
            d.put("train_batch_size", cap.value, cap.reason, cap.source, cap.when)
    if d.chosen["network_train_unet_only"]:
        d.values.pop("text_encoder_lr")
        d.chosen["text_encoder_lr"] = None
    if d.chosen.get("validation_split"):
        d.put("validation_seed", d.chosen["seed"], "the same images are held out on every run", "research §3.6")


def _decide_files(d: _Decisions, root: Path, is_config: bool, reg: Optional[Path], model: ModelFacts,
                  facts: DatasetFacts, output_dir: Optional[str | os.PathLike], output_name: Optional[str]) -> None:
    """The model, the data and the output: paths, and the model's flags (v2, v_parameterization)."""
    d.put("output_dir", str(Path(output_dir).expanduser().resolve()) if output_dir else str(root.parent / "output"),
          "where the LoRA files go", "sdtune")
    d.put("output_name", output_name or _output_name(root, facts),
          "the file name (the trigger word when there is one)", "sdtune")
    if model.path is not None:
        d.put("pretrained_model_name_or_path", str(model.path), f"the base model ({model.architecture})", "--model")
    if model.family == "sd2":
        d.put("v2", True, "an SD2 model (OpenCLIP text encoder)", "research §3.4")
    if model.v_pred:
        d.put("v_parameterization", True, "the model predicts v, not noise", "research §3.4")
    if is_config:
        d.put("dataset_config", str(root), "your dataset_config (its own values win over the ones here)",
              "research §2.2")
    else:
        d.put("train_data_dir", str(root), "the parent of the '<repeats>_<name>' folders", "research §2.1")
    if reg is not None:
        d.put("reg_data_dir", str(reg), "regularisation images, balanced to the training samples", "research §2.1")


def _decide_duration(d: _Decisions, scans: Sequence[DatasetScan], warnings: list[PlanWarning]
                     ) -> tuple[StepsMath, tuple[RepeatsAdvice, ...]]:
    """Epochs from the target samples and the real samples per epoch, then saving, validation and warm-up."""
    keys = keys_in_order()
    for key in keys[keys.index("total_samples"):keys.index("save_every_n_epochs")]:
        d.rule(key)
    c = d.chosen
    steps, raw = _steps(scans, c["total_samples"], c["max_epochs"])
    d.put("max_train_epochs", steps.epochs,
          f"{steps.target_samples} target samples / {steps.train_samples_per_epoch} training samples per epoch = "
          f"{raw:.1f}" + (f", capped at {c['max_epochs']}" if round(raw) > c["max_epochs"] else ""),
          d.values["total_samples"].source)
    advice: tuple[RepeatsAdvice, ...] = ()
    if round(raw) > c["max_epochs"] or raw < c["target_epochs"] / 2:
        advice = _repeats_advice(scans, raw / c["target_epochs"])
        if advice:
            change = "; ".join(f"{Path(a.folder).name}: {a.current} -> {a.suggested}" for a in advice)
            why = "too few" if round(raw) > c["max_epochs"] else "too many"
            warnings.append(PlanWarning("repeats", f"the folders' repeats give {why} samples per epoch for about "
                                        f"{c['target_epochs']} epochs; rename them for repeats {change} "
                                        "(then plan again)", "seed 001 (0-20 epochs); research §2.6"))
    d.rule("save_every_n_epochs")
    if c.get("validation_split"):
        d.put("validate_every_n_epochs", c["save_every_n_epochs"], "check the validation loss at every save",
              "research §3.6")
    warmup = round(c["lr_warmup_ratio"] * steps.total_steps)
    d.put("lr_warmup_steps", warmup or None, f"{c['lr_warmup_ratio']:.0%} of {steps.total_steps} steps"
          if warmup else "", d.values["lr_warmup_ratio"].source)
    return steps, advice


# the order keys appear in the config file
_CONFIG_ORDER = (
    "pretrained_model_name_or_path", "v2", "v_parameterization", "train_data_dir", "dataset_config", "reg_data_dir",
    "output_dir", "output_name", "caption_extension", "resolution", "enable_bucket", "min_bucket_reso",
    "max_bucket_reso", "bucket_reso_steps", "train_batch_size", "max_train_epochs", "save_every_n_epochs",
    "validation_split", "validation_seed", "validate_every_n_epochs", "network_module", "network_dim",
    "network_alpha", "network_args", "network_train_unet_only", "optimizer_type", "learning_rate", "unet_lr",
    "text_encoder_lr", "lr_scheduler", "lr_warmup_steps", "max_grad_norm", "mixed_precision", "save_precision",
    "no_half_vae", "gradient_checkpointing", "cache_latents", "cache_text_encoder_outputs", "shuffle_caption",
    "keep_tokens", "max_token_length", "clip_skip", "flip_aug", "min_snr_gamma", "noise_offset", "seed",
)


def _config(values: dict[str, PlanValue]) -> dict[str, Any]:
    """The sd-scripts arguments, in a readable order, None values left out."""
    out = {k: values[k].value for k in _CONFIG_ORDER if k in values and values[k].value is not None}
    out.update({k: v.value for k, v in values.items() if k not in out and k not in _INTERNAL
                and not k.startswith("train_batch_size_") and v.value is not None})
    return out


def _device_warnings(pf: PlanFacts, model: ModelFacts) -> list[PlanWarning]:
    out = []
    if not pf.cuda:
        out.append(PlanWarning("device", "no CUDA GPU: this plan trains on the CPU, which takes hours even for a small "
                               "SD1 LoRA; with a GPU, plan again with --vram GB", "research §7"))
    elif pf.vram_gb is not None and pf.vram_gb < 8 and model.family == "sdxl":
        out.append(PlanWarning("vram", f"{pf.vram_gb:g} GB is below the 8 GB SDXL LoRA training needs even with "
                               "every saving on; expect out-of-memory or very slow shared-memory spilling",
                               "research §7 (sd-scripts train_SDXL-en: 8 GB minimum)"))
    elif pf.vram_gb is not None and pf.vram_gb < 6:
        out.append(PlanWarning("vram", f"{pf.vram_gb:g} GB is very little: if it runs out of memory, lower "
                               "train_batch_size to 1", "research §7"))
    return out
