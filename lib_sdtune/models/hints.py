"""Settings a checkpoint's keys cannot tell: attention heads, v-prediction, VAE scale.

They come from, in order: the caller (a user flag), an original `.yaml` config beside the file
(the A1111 convention, ldm and sgm formats), then the family's published defaults.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..errors import SdtuneError


@dataclass(frozen=True)
class ModelHints:
    """Architecture settings outside the weights; None means "use the family default"."""

    prediction_type: Optional[str] = None  # "epsilon" | "v_prediction"
    num_heads: Optional[int] = None  # fixed heads per attention layer (SD1: 8)
    num_head_channels: Optional[int] = None  # channels per head (SD2/SDXL: 64)
    vae_scaling_factor: Optional[float] = None
    source: str = "defaults"  # where the non-default values came from


FAMILY_DEFAULTS = {
    "sd1": ModelHints(num_heads=8, vae_scaling_factor=0.18215),
    "sd2": ModelHints(num_head_channels=64, vae_scaling_factor=0.18215),
    "sdxl": ModelHints(num_head_channels=64, vae_scaling_factor=0.13025),
    "sdxl-refiner": ModelHints(num_head_channels=64, vae_scaling_factor=0.13025),
}


def yaml_beside(path: str | os.PathLike) -> Optional[Path]:
    """The `<name>.yaml` next to a checkpoint, as A1111 looks for it."""
    p = Path(path)
    for cand in (p.with_suffix(".yaml"), p.with_suffix(".yml")):
        if cand.is_file():
            return cand
    return None


def _dig(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def hints_from_yaml(path: str | os.PathLike) -> ModelHints:
    """Read the settings sdtune needs from an ldm (`unet_config`) or sgm (`network_config`) yaml."""
    import yaml

    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise SdtuneError(f"{p}: cannot read this model config ({e})") from e
    params = _dig(doc, "model", "params")
    if not isinstance(params, dict):
        raise SdtuneError(f"{p}: not a Stable Diffusion config (no model.params section)")
    unet = _dig(params, "unet_config", "params") or _dig(params, "network_config", "params") or {}
    prediction = None
    if params.get("parameterization") == "v":
        prediction = "v_prediction"
    elif "unet_config" in params:
        prediction = "epsilon"  # ldm configs without `parameterization` are eps models
    denoiser = str(_dig(params, "denoiser_config", "params", "scaling_config", "target") or "")
    if denoiser:
        prediction = "v_prediction" if "VScaling" in denoiser else "epsilon"
    heads = unet.get("num_heads")
    head_ch = unet.get("num_head_channels")
    return ModelHints(
        prediction_type=prediction,
        num_heads=int(heads) if heads not in (None, -1) else None,
        num_head_channels=int(head_ch) if head_ch not in (None, -1) else None,
        vae_scaling_factor=float(params["scale_factor"]) if "scale_factor" in params else None,
        source=str(p),
    )


def resolve_hints(family: str, checkpoint_path: Optional[str | os.PathLike], user: Optional[ModelHints] = None
                  ) -> ModelHints:
    """Combine user flags, the yaml beside the checkpoint and the family defaults (first set wins).

    Heads come as either a count or a width, so they are taken as a pair from the first layer
    that sets either.
    """
    layers = [user or ModelHints(source="family defaults")]
    found = yaml_beside(checkpoint_path) if checkpoint_path else None
    if found is not None:
        layers.append(hints_from_yaml(found))
    layers.append(FAMILY_DEFAULTS[family])

    def first(attr: str):
        return next((getattr(h, attr) for h in layers if getattr(h, attr) is not None), None)

    heads_from = next(h for h in layers if h.num_heads is not None or h.num_head_channels is not None)
    return ModelHints(prediction_type=first("prediction_type"), num_heads=heads_from.num_heads,
                      num_head_channels=heads_from.num_head_channels,
                      vae_scaling_factor=first("vae_scaling_factor"),
                      source=str(found) if found is not None else layers[0].source)
