"""Load an original single-file SD1.x/SD2.x/SDXL checkpoint into diffusers/transformers modules.

Offline by construction: configs are inferred in code from the weights' shapes (plus
`ModelHints`), modules are built empty and filled with `load_state_dict(assign=True)`, and the
key conversion is diffusers' own single-file code. Nothing here touches a hub.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Optional

import torch

from ..errors import SdtuneError, missing_requirement
from ..io.checkpoint import StateDictSource, open_checkpoint
from ..io.detect import ArchInfo, component_keys, detect_architecture, ignored_key_pattern
from . import configs
from .diffusers_folder import is_diffusers_folder, load_diffusers_folder
from .hints import ModelHints, resolve_hints

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@dataclass
class LoadReport:
    """Keys that did not line up while loading, across all components ("<component>.<key>")."""

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    ignored_keys: list[str] = field(default_factory=list)  # known extras: schedule buffers, EMA, ids


@dataclass
class LoadedModel:
    """The modules of one checkpoint, what it is, and how loading went."""

    arch: ArchInfo
    hints: ModelHints
    modules: dict[str, torch.nn.Module]
    report: LoadReport
    path: Optional[Path] = None

    @property
    def scheduler_config(self) -> dict:
        """The DDPM training schedule every SD1/SD2/SDXL model was trained with."""
        return noise_scheduler_config(self.arch.prediction_type)


def noise_scheduler_config(prediction_type: str) -> dict:
    """DDPMScheduler kwargs of SD1.x/SD2.x/SDXL (scaled-linear betas 0.00085..0.012, 1000 steps)."""
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                clip_sample=False, steps_offset=1, prediction_type=prediction_type)


def _text_encoder_classes(family: str, name: str):
    """(transformers class, is OpenCLIP layout) for a text-encoder component of `family`."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if name == "text_encoder_2":
        return CLIPTextModelWithProjection, True
    return CLIPTextModel, family == "sd2"


def build_configs(shapes, arch: ArchInfo, hints: ModelHints) -> dict[str, dict]:
    """The diffusers/transformers config kwargs of every present component."""
    out = {}
    for name, prefix in arch.components.items():
        if name == "unet":
            out[name] = configs.unet_config(shapes, arch, hints, prefix)
        elif name == "vae":
            out[name] = configs.vae_config(shapes, hints, prefix)
        elif _text_encoder_classes(arch.family, name)[1]:
            out[name] = configs.open_clip_config(shapes, prefix, drop_last_layer=arch.family == "sd2")
        else:
            out[name] = configs.clip_config(shapes, prefix)
    return out


def _empty_module(name: str, family: str, cfg: dict) -> torch.nn.Module:
    """Build a component with parameters on the meta device (no memory, no init time)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        if name == "unet":
            from diffusers import UNet2DConditionModel

            return UNet2DConditionModel(**cfg)
        if name == "vae":
            from diffusers import AutoencoderKL

            return AutoencoderKL(**cfg)
        from transformers import CLIPTextConfig

        cls, _ = _text_encoder_classes(family, name)
        return cls(CLIPTextConfig(**cfg))


def _convert(name: str, family: str, source: StateDictSource, prefix: str, cfg: dict,
             module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Original keys -> the module's keys, with diffusers' single-file converters."""
    from diffusers.loaders import single_file_utils as sfu

    if name == "unet":
        return sfu.convert_ldm_unet_checkpoint(source, cfg)
    if name == "vae":
        return sfu.convert_ldm_vae_checkpoint(source, cfg)
    if _text_encoder_classes(family, name)[1]:
        sd = sfu.convert_open_clip_checkpoint(module, source, prefix=prefix)
    else:
        sd = sfu.convert_ldm_clip_checkpoint(source)   # strips the SD1 and SDXL-TE1 prefixes
    return fit_clip_keys(sd, module)


def fit_clip_keys(sd: dict[str, torch.Tensor], module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Adapt CLIP keys to the installed transformers: `text_model.` kept (4.x) or dropped (5.6+)."""
    own = module.state_dict()
    flat = not any(k.startswith("text_model.") for k in own)
    out = {}
    for k, v in sd.items():
        bare = k[len("text_model."):] if k.startswith("text_model.") else k
        if bare != "text_projection.weight" and not flat:
            bare = "text_model." + bare
        out[bare] = v
    for k, v in own.items():  # position_ids: a buffer in some versions, absent from some files
        if k.endswith("position_ids") and k not in out:
            out[k] = v
    return {k: v for k, v in out.items() if k in own or not k.endswith("position_ids")}


def _expected_original_keys(name: str, family: str, module_sd: dict, prefix: str) -> set[str]:
    """The original keys a module's weights map back to (to find checkpoint keys nobody used)."""
    from . import to_ldm

    if name == "unet":
        return set(to_ldm.unet_to_ldm(module_sd, prefix=prefix))
    if name == "vae":
        return set(to_ldm.vae_to_ldm(module_sd, prefix=prefix))
    if _text_encoder_classes(family, name)[1]:
        return set(to_ldm.open_clip_to_ldm(module_sd, prefix=prefix))
    return set(to_ldm.clip_to_ldm(module_sd, prefix=prefix))


def _old_clip_alias(key: str, prefix: str) -> str:
    """Very old SD1 saves lack `text_model.` in the TE keys; compare both spellings as one."""
    return key.replace(prefix + "text_model.", prefix, 1)


def load_components(source: StateDictSource, arch: ArchInfo, hints: ModelHints,
                    components: Optional[Iterable[str]] = None, dtype: Optional[torch.dtype] = None
                    ) -> tuple[dict[str, torch.nn.Module], LoadReport]:
    """Build and fill each requested component; report missing, unexpected and ignored keys."""
    wanted = [c for c in COMPONENTS if c in arch.components and (components is None or c in components)]
    shapes = source.shapes()
    cfgs = build_configs(shapes, arch, hints)
    per_component = component_keys(shapes, arch)
    ignored = ignored_key_pattern(arch.family)
    report = LoadReport(ignored_keys=sorted(k for k in shapes if ignored.match(k)))
    owned = {k for keys in per_component.values() for k in keys}
    report.unexpected_keys += sorted(f"checkpoint.{k}" for k in shapes if k not in owned and not ignored.match(k))

    modules: dict[str, torch.nn.Module] = {}
    for name in wanted:
        prefix = arch.components[name]
        module = _empty_module(name, arch.family, cfgs[name])
        sd = _convert(name, arch.family, source, prefix, cfgs[name], module)
        if dtype is not None:
            sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
        result = module.load_state_dict(sd, strict=False, assign=True)
        del sd
        report.missing_keys += [f"{name}.{k}" for k in result.missing_keys]
        report.unexpected_keys += [f"{name}.{k}" for k in result.unexpected_keys]
        expected = {_old_clip_alias(k, prefix) for k in
                    _expected_original_keys(name, arch.family, module.state_dict(), prefix)}
        report.unexpected_keys += sorted(f"checkpoint.{k}" for k in per_component[name]
                                         if _old_clip_alias(k, prefix) not in expected)
        module.eval()
        modules[name] = module
    return modules, report


def load_checkpoint(path: str | os.PathLike | StateDictSource, *, components: Optional[Iterable[str]] = None,
                    hints: Optional[ModelHints] = None, dtype: Optional[torch.dtype] = None) -> LoadedModel:
    """Open, detect, and load a checkpoint; SD2's v-prediction is settled by flag, yaml, or A1111's test."""
    try:
        return _load_checkpoint(path, components, hints, dtype)
    except ImportError as e:
        raise missing_requirement(e) from e


def _load_checkpoint(path, components, hints, dtype) -> LoadedModel:
    if not isinstance(path, StateDictSource) and is_diffusers_folder(path):
        return _load_folder(Path(path), components, hints, dtype)
    source = path if isinstance(path, StateDictSource) else open_checkpoint(path)
    what = str(source.path) if source.path else "checkpoint"
    arch = detect_architecture(source.shapes(), what)
    resolved = resolve_hints(arch.family, source.path, hints)
    if resolved.prediction_type:
        arch = replace(arch, prediction_type=resolved.prediction_type)
    need = None if components is None else set(components)
    undecided = arch.prediction_type == "undecided"
    if undecided and need is not None and "unet" in arch.components:
        need.add("unet")
    modules, report = load_components(source, arch, resolved, need, dtype)
    if undecided:
        arch = replace(arch, prediction_type=decide_sd2_prediction(arch, modules.get("unet")))
        resolved = replace(resolved, prediction_type=arch.prediction_type, source=resolved.source + " + v test")
        if arch.prediction_type == "v_prediction" and "unet" in modules:
            modules["unet"].register_to_config(sample_size=96)
        if components is not None and "unet" not in components:
            modules.pop("unet", None)
    return LoadedModel(arch=arch, hints=resolved, modules=modules, report=report, path=source.path)


def _load_folder(folder: Path, components, hints: Optional[ModelHints], dtype) -> LoadedModel:
    """A diffusers-format folder: its scheduler config says eps or v unless the user does."""
    arch, modules, missing, unexpected = load_diffusers_folder(folder, components, dtype)
    source = f"{folder / 'scheduler' / 'scheduler_config.json'}"
    if hints is not None and hints.prediction_type:
        arch, source = replace(arch, prediction_type=hints.prediction_type), hints.source
    return LoadedModel(arch=arch, hints=ModelHints(prediction_type=arch.prediction_type, source=source),
                       modules=modules, report=LoadReport(missing_keys=missing, unexpected_keys=unexpected),
                       path=folder)


def decide_sd2_prediction(arch: ArchInfo, unet: Optional[torch.nn.Module]) -> str:
    """A1111's default for SD2 with no yaml and no flag: run the v test on the loaded UNet."""
    from .vpred import is_v_prediction_unet

    if unet is None:
        raise SdtuneError("cannot tell whether this SD2 model predicts v or eps without its UNet; "
                          "pass --v-pred/--eps or put the original .yaml beside the checkpoint")
    if next(unet.parameters()).device.type == "meta":
        raise SdtuneError("the SD2 v-prediction test needs real weights; pass the prediction type explicitly")
    return "v_prediction" if is_v_prediction_unet(unet) else "epsilon"
