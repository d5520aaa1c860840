"""Which Stable Diffusion architecture a single-file checkpoint holds, from key names and shapes.

Only the layout decides (tiny test models are detected like the real ones); files of other
families (SD3, Flux, LoRAs, VAEs, embeddings, ...) are refused with a message naming what they are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from ..errors import SdtuneError, UnsupportedModelError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

# component name -> key prefix in the original (ldm/sgm) layout, per family
COMPONENT_PREFIXES: dict[str, dict[str, str]] = {
    "sd1": {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": "cond_stage_model.transformer."},
    "sd2": {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": "cond_stage_model.model."},
    "sdxl": {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": "conditioner.embedders.0.transformer.",
             "text_encoder_2": "conditioner.embedders.1.model."},
    "sdxl-refiner": {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder_2": "conditioner.embedders.0.model."},
}

# Keys real files carry that no component loads: schedule buffers, EMA copies, ids, markers.
_IGNORED_PATTERNS = [
    r"(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod"
    r"|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|posterior_\w+|logvar)",
    r"model_ema\..*", r"denoiser\..*", r"v_pred", r"ztsnr", r"edm_\w+(\.\w+)*",
    r".*\.position_ids", r".*\.logit_scale",
]
# Keys a family's diffusers modules do not have: SD2 uses the penultimate OpenCLIP layer and no projection.
_FAMILY_IGNORED = {
    "sd2": [r"cond_stage_model\.model\.transformer\.resblocks\.23\..*", r"cond_stage_model\.model\.text_projection"],
}


def ignored_key_pattern(family: str) -> re.Pattern:
    """A regex matching the keys that a loader of `family` may skip without loss."""
    pats = _IGNORED_PATTERNS + _FAMILY_IGNORED.get(family, [])
    return re.compile("^(?:" + "|".join(pats) + ")$")


@dataclass(frozen=True)
class ArchInfo:
    """What a checkpoint is, decided from its keys and shapes."""

    family: str  # sd1 | sd2 | sdxl | sdxl-refiner
    prediction_type: str  # epsilon | v_prediction | undecided (SD2: needs the v test)
    in_channels: int
    components: dict[str, str] = field(default_factory=dict)  # present component -> key prefix
    variant: str = ""  # "" | inpaint | instruct-pix2pix

    @property
    def architecture(self) -> str:
        """The CLI's name: sd1, sd2, sd2-v, sdxl or sdxl-refiner."""
        if self.family == "sd2" and self.prediction_type == "v_prediction":
            return "sd2-v"
        return self.family


def _any_prefix(keys: Sequence[str], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def _refuse_other(keys: Sequence[str], what: str) -> None:
    """Raise a message naming the family of a file that is not an SD1/SD2/SDXL checkpoint."""
    def has(pat: str) -> bool:
        rx = re.compile(pat)
        return any(rx.search(k) for k in keys)

    if has(r"(^|\.)joint_blocks\.\d+\."):
        found = "a Stable Diffusion 3 / 3.5 model (MMDiT joint_blocks)"
    elif has(r"(^|\.)double_blocks\.\d+\.") and has(r"(^|\.)single_blocks\.\d+\."):
        found = "a Flux-family model (double_blocks/single_blocks)"
    elif has(r"^lora_(unet|te\d?)_|\.lora_down\.|\.lora_A\.|\.hada_w1_a$|\.lokr_w1$"):
        found = "a LoRA/LyCORIS adapter, not a checkpoint (try `lora info`)"
    elif has(r"^(string_to_param|emb_params|clip_[lg])"):
        found = "a textual-inversion embedding"
    elif has(r"^encoder\.conv_in\.weight$") and has(r"^decoder\.conv_in\.weight$"):
        found = "a standalone VAE"
    elif has(r"^down_blocks\.\d+\.") and has(r"^conv_in\.weight$"):
        found = "a bare diffusers-format UNet (load the whole diffusers model folder instead)"
    elif has(r"^(model\.diffusion_model\.)?blocks\.\d+\.") or has(r"^(model\.)?transformer_blocks\.\d+\."):
        found = "a diffusion-transformer model (PixArt/Hunyuan/Lumina-like)"
    elif has(r"^(model\.)?(down|up)_blocks\.\d+\.\d+\.channelwise"):
        found = "a Stable Cascade model"
    else:
        sample = ", ".join(sorted(keys)[:3])
        found = f"no known model layout (first keys: {sample})"
    raise UnsupportedModelError(f"{what}: sdtune handles Stable Diffusion 1.x, 2.x and SDXL checkpoints; "
                                f"this file is {found}.")


def detect_architecture(shapes: Mapping[str, Sequence[int]], what: str = "checkpoint") -> ArchInfo:
    """Detect the family of an original-layout checkpoint from {key: shape}; `what` names it in errors."""
    keys = list(shapes)
    if not _any_prefix(keys, UNET_PREFIX + "input_blocks."):
        _refuse_other(keys, what)

    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None or len(conv_in) != 4:
        raise SdtuneError(f"{what}: the UNet has no input_blocks.0.0.weight conv; the file looks truncated")
    in_channels = int(conv_in[1])
    variant = {9: "inpaint", 8: "instruct-pix2pix"}.get(in_channels, "")

    has_label_emb = UNET_PREFIX + "label_emb.0.0.weight" in shapes
    if _any_prefix(keys, "conditioner.embedders.1.model."):
        family = "sdxl"
    elif _any_prefix(keys, "conditioner.embedders.0.model."):
        family = "sdxl-refiner"
    elif _any_prefix(keys, "cond_stage_model.model."):
        family = "sd2"
    elif _any_prefix(keys, "cond_stage_model.transformer."):
        family = "sd1"
    else:
        family = _family_from_unet(shapes, has_label_emb, what)
    if family.startswith("sdxl") and not has_label_emb:
        raise SdtuneError(f"{what}: SDXL text encoders but the UNet has no label_emb (size conditioning); "
                          f"the file mixes architectures or is damaged")

    if family.startswith("sdxl"):
        vpred = any(k in shapes for k in ("v_pred", "edm_vpred.sigma_max"))
        prediction = "v_prediction" if vpred else "epsilon"
    elif family == "sd2":
        prediction = "epsilon" if variant else "undecided"  # A1111 runs SD2 inpainting models as eps
    else:
        prediction = "epsilon"

    present = {name: prefix for name, prefix in COMPONENT_PREFIXES[family].items() if _any_prefix(keys, prefix)}
    if "unet" not in present:
        raise SdtuneError(f"{what}: no UNet weights found")
    return ArchInfo(family=family, prediction_type=prediction, in_channels=in_channels, components=present,
                    variant=variant)


def _family_from_unet(shapes: Mapping[str, Sequence[int]], has_label_emb: bool, what: str) -> str:
    """Decide the family of a UNet-only file from its cross-attention width (real sizes only)."""
    ctx = next((s[1] for k, s in shapes.items() if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")),
               None)
    if has_label_emb:
        adm = shapes[UNET_PREFIX + "label_emb.0.0.weight"][1]
        return "sdxl-refiner" if adm == 2560 else "sdxl"
    if ctx == 768:
        return "sd1"
    if ctx == 1024:
        return "sd2"
    raise SdtuneError(f"{what}: a UNet without text encoders, with cross-attention width {ctx}; "
                      f"cannot tell SD1 from SD2 (add the text encoder or use a full checkpoint)")


def component_keys(shapes: Mapping[str, Sequence[int]], info: ArchInfo) -> dict[str, list[str]]:
    """The checkpoint keys belonging to each present component (ignored extras left out)."""
    ignored = ignored_key_pattern(info.family)
    out: dict[str, list[str]] = {name: [] for name in info.components}
    for key in shapes:
        if ignored.match(key):
            continue
        for name, prefix in info.components.items():
            if key.startswith(prefix):
                out[name].append(key)
                break
    return out
