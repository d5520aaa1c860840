"""The canonical LoRA module names of SD1.x/SD2.x/SDXL models (kohya sd-scripts' scheme), both ways.

sd-scripts names a LoRA module after the path of the layer it wraps in the model object it trains:
SD1/SD2 U-Nets in the diffusers tree (`lora_unet_down_blocks_0_attentions_0_proj_in`), SDXL U-Nets
in the original SGM tree (`lora_unet_input_blocks_4_1_proj_in`), and CLIP text encoders as
transformers 4.x lays them out (`lora_te_text_model_encoder_layers_0_mlp_fc1`; `lora_te1_`/`lora_te2_`
for SDXL's two). sdtune trains diffusers/transformers modules whose paths differ (SDXL) or drift
between versions (transformers >= 5.6 has no `CLIPTextModel.text_model`), so the names are built
here from the tree's structure and the original checkpoint keys (`models.to_ldm`), never copied
from a live module path. Only module types and sizes are read: meta-device modules work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Optional

import torch
from torch import nn

from ..errors import SdtuneError
from ..io.detect import COMPONENT_PREFIXES, UNET_PREFIX
from ..models import to_ldm

__all__ = ["LoraTarget", "LoraNameMap", "lora_targets", "lora_prefix"]

# U-Net blocks whose Linear/Conv2d layers sd-scripts wraps (`networks/lora.py`, matched by class name)
UNET_TARGET_BLOCKS = ("Transformer2DModel",)  # LoRA-LierLa (default)
UNET_CONV_TARGET_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")  # added by `conv_dim` (C3Lier/LoCon)
# parts of a CLIP encoder layer that sd-scripts wraps (CLIPAttention, CLIPMLP): q/k/v/out_proj, fc1, fc2
TE_TARGET_PARTS = ("self_attn", "mlp")
_QKV = ("q_proj", "k_proj", "v_proj")  # fused in this order into OpenCLIP's `attn.in_proj_weight`
_ENCODER_LAYER_PATHS = ("text_model.encoder.layers", "encoder.layers")  # transformers 4.x / >= 5.6 CLIPTextModel
_CANONICAL_ENCODER_LAYERS = "text_model.encoder.layers"


@dataclass(frozen=True)
class LoraTarget:
    """One layer a LoRA wraps: its kohya name, where it lives in sdtune's module, its original key."""

    name: str  # kohya module name, e.g. "lora_unet_input_blocks_4_1_proj_in"
    component: str  # "unet" | "text_encoder" | "text_encoder_2"
    module_path: str  # path in the live module (this transformers/diffusers version), for get_submodule
    original_key: str  # the weight's key in the original single-file checkpoint
    layer_type: str  # "Linear" | "Conv2d"
    in_features: int  # in_channels for Conv2d
    out_features: int  # out_channels for Conv2d
    kernel_size: Optional[tuple[int, int]] = None  # Conv2d only
    original_rows: Optional[tuple[int, int]] = None  # [start, stop) rows of a fused OpenCLIP in_proj_weight

    @property
    def uses_conv_dim(self) -> bool:
        """True for convs larger than 1x1, which sd-scripts gives `conv_dim`/`conv_alpha` (else network_dim)."""
        return self.kernel_size is not None and self.kernel_size != (1, 1)

    def lora_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The (lora_down, lora_up) weight shapes at `rank`, as sd-scripts creates them."""
        if self.kernel_size is None:
            return (rank, self.in_features), (self.out_features, rank)
        return (rank, self.in_features, *self.kernel_size), (self.out_features, rank, 1, 1)


def lora_prefix(family: str, component: str) -> str:
    """`lora_unet`, or `lora_te` for a model's only text encoder, `lora_te1`/`lora_te2` for SDXL's two."""
    if component == "unet":
        return "lora_unet"
    encoders = [c for c in ("text_encoder", "text_encoder_2") if c in _prefixes(family)]
    if component not in encoders:
        raise SdtuneError(f"{family} models have no {component!r} component")
    # sd-scripts numbers text encoders only when there are several; the refiner's one bigG is `lora_te`
    return f"lora_te{encoders.index(component) + 1}" if len(encoders) > 1 else "lora_te"


def lora_targets(modules: Mapping[str, nn.Module], family: str, conv: bool = False) -> list[LoraTarget]:
    """Every layer sd-scripts' `networks.lora` wraps in these components (with `conv_dim` set if `conv`).

    `modules` is `load_checkpoint(...).modules` (any subset of components; the VAE is ignored);
    `family` is sd1 | sd2 | sdxl | sdxl-refiner. Text encoders come first, in module order.
    """
    prefixes = _prefixes(family)
    out: list[LoraTarget] = []
    for component in ("text_encoder", "text_encoder_2"):
        if component in modules and component in prefixes:
            open_clip = family == "sd2" or component == "text_encoder_2"
            out += _text_encoder_targets(modules[component], component, lora_prefix(family, component),
                                         prefixes[component], open_clip)
    if "unet" in modules:
        out += _unet_targets(modules["unet"], sgm_names=family.startswith("sdxl"), conv=conv)
    return out


class LoraNameMap(Mapping[str, LoraTarget]):
    """kohya name -> `LoraTarget`, and back from an original checkpoint key (plus rows for fused q/k/v)."""

    def __init__(self, targets: Iterable[LoraTarget]):
        self._by_name: dict[str, LoraTarget] = {}
        self._by_key: dict[str, list[LoraTarget]] = {}
        for t in targets:
            if t.name in self._by_name:
                raise SdtuneError(f"two layers share the LoRA name {t.name!r}")
            self._by_name[t.name] = t
            self._by_key.setdefault(t.original_key, []).append(t)

    def __getitem__(self, name: str) -> LoraTarget:
        return self._by_name[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)

    def original_key(self, name: str) -> str:
        """The original checkpoint key a LoRA module's delta belongs to (see `original_rows` for q/k/v)."""
        return self._by_name[name].original_key

    def targets_for_key(self, original_key: str) -> list[LoraTarget]:
        """The targets writing into one original tensor: one, or q/k/v for an OpenCLIP `in_proj_weight`."""
        return list(self._by_key.get(original_key, ()))

    def kohya_name(self, original_key: str, rows: Optional[tuple[int, int]] = None) -> str:
        """The LoRA name of an original key (`rows` picks q, k or v inside a fused `in_proj_weight`)."""
        for t in self._by_key.get(original_key, ()):
            if t.original_rows == (tuple(rows) if rows is not None else None):
                return t.name
        what = f"{original_key!r} rows {rows}" if rows is not None else repr(original_key)
        raise KeyError(f"no LoRA target for {what}")


def _prefixes(family: str) -> dict[str, str]:
    if family not in COMPONENT_PREFIXES:
        raise SdtuneError(f"unknown model family {family!r}; expected one of {', '.join(COMPONENT_PREFIXES)}")
    return COMPONENT_PREFIXES[family]


def _target(name: str, component: str, path: str, key: str, layer: nn.Module,
            rows: Optional[tuple[int, int]] = None) -> LoraTarget:
    if isinstance(layer, nn.Conv2d):
        return LoraTarget(name, component, path, key, "Conv2d", layer.in_channels, layer.out_channels,
                          tuple(layer.kernel_size), rows)
    return LoraTarget(name, component, path, key, "Linear", layer.in_features, layer.out_features, None, rows)


def _encoder_layers(te: nn.Module) -> tuple[str, nn.Module]:
    """The CLIP encoder's layer list and its live path, with or without the `text_model.` level."""
    for path in _ENCODER_LAYER_PATHS:
        try:
            return path, te.get_submodule(path)
        except AttributeError:
            continue
    raise SdtuneError(f"{type(te).__name__} is not a CLIP text model: no {' or '.join(_ENCODER_LAYER_PATHS)}")


def _text_encoder_targets(te: nn.Module, component: str, lora_prefix: str, key_prefix: str,
                          open_clip: bool) -> list[LoraTarget]:
    """CLIP attention and MLP Linears, named by the transformers 4.x path whatever the live one is."""
    live_root, layers = _encoder_layers(te)
    out = []
    for i, layer in enumerate(layers):
        for part in TE_TARGET_PARTS:
            for sub, linear in getattr(layer, part).named_modules():
                if isinstance(linear, nn.Linear):
                    canonical = f"{_CANONICAL_ENCODER_LAYERS}.{i}.{part}.{sub}"
                    key, rows = _te_original_key(canonical, linear, key_prefix, open_clip)
                    out.append(_target(f"{lora_prefix}_{canonical.replace('.', '_')}", component,
                                       f"{live_root}.{i}.{part}.{sub}", key, linear, rows))
    return out


def _te_original_key(canonical: str, linear: nn.Linear, prefix: str,
                     open_clip: bool) -> tuple[str, Optional[tuple[int, int]]]:
    """A CLIP Linear's original weight key, and its rows where OpenCLIP fuses q/k/v into one tensor."""
    weight = torch.empty(linear.out_features, linear.in_features, device="meta")
    head, _, proj = canonical.rpartition(".")
    if not open_clip:
        (key,) = to_ldm.clip_to_ldm({f"{canonical}.weight": weight}, prefix)
        return key, None
    if proj not in _QKV:
        (key,) = to_ldm.open_clip_to_ldm({f"{canonical}.weight": weight}, prefix)
        return key, None
    (key,) = to_ldm.open_clip_to_ldm({f"{head}.{p}.weight": weight for p in _QKV}, prefix)
    j = _QKV.index(proj)
    return key, (j * linear.out_features, (j + 1) * linear.out_features)


def _unet_targets(unet: nn.Module, sgm_names: bool, conv: bool) -> list[LoraTarget]:
    """Linear/Conv2d layers inside the target blocks; SDXL named by their original (SGM) keys."""
    blocks = UNET_TARGET_BLOCKS + (UNET_CONV_TARGET_BLOCKS if conv else ())
    # unet_to_ldm only renames the UNet's keys, so feeding it names maps every diffusers key to its original one
    ldm = to_ldm.unet_to_ldm({k: k for k, _ in unet.named_parameters()}, prefix=UNET_PREFIX)
    original = {diffusers_key: key for key, diffusers_key in ldm.items()}
    out = []
    for path, block in unet.named_modules():
        if type(block).__name__ not in blocks:
            continue
        for sub, layer in block.named_modules():
            if not isinstance(layer, (nn.Linear, nn.Conv2d)):
                continue
            diffusers_path = f"{path}.{sub}"
            key = original.get(f"{diffusers_path}.weight")
            if key is None:
                raise SdtuneError(f"UNet layer {diffusers_path!r} has no weight in the original layout")
            # SD1/SD2: sd-scripts trains a copy of the diffusers tree; SDXL: the original SGM tree
            tree = key[len(UNET_PREFIX):-len(".weight")] if sgm_names else diffusers_path
            out.append(_target("lora_unet_" + tree.replace(".", "_"), "unet", diffusers_path, key, layer))
    return out
