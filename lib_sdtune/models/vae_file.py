"""A separate VAE file (sd-scripts' `--vae`): load it into the shape of the checkpoint's own VAE.

VAE files come bare (`encoder.down.0...`, as A1111's models/VAE holds them), with the checkpoint prefix
(`first_stage_model.`), or in diffusers' layout (`encoder.down_blocks.0...`). The base model's VAE config is kept
(its scaling factor is the base's, e.g. 0.13025 for SDXL), only the weights change; a VAE of another shape is
refused naming the file.
"""

from __future__ import annotations

import os

import torch

from ..errors import SdtuneError
from ..io.checkpoint import open_checkpoint


def load_vae_file(path: str | os.PathLike, like: torch.nn.Module) -> torch.nn.Module:
    """A copy of the AutoencoderKL `like` (the checkpoint's VAE) holding the weights of the VAE file at `path`."""
    from diffusers import AutoencoderKL
    from diffusers.loaders import single_file_utils as sfu

    source = open_checkpoint(path)
    keys = list(source.keys())
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in keys):
        sd = {k: source[k] for k in keys}  # diffusers layout already
    elif any(k.startswith(("encoder.down.", "first_stage_model.encoder.down.")) for k in keys):
        sd = sfu.convert_ldm_vae_checkpoint(source, dict(like.config))
    else:
        raise SdtuneError(f"{path}: not a VAE file (no encoder.down.* / first_stage_model.* / encoder.down_blocks.* "
                          "keys); give a VAE .safetensors such as the ones in A1111's models/VAE")
    vae = AutoencoderKL.from_config(like.config)
    try:
        missing, unexpected = vae.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # size mismatch
        why = str(e).splitlines()[-1].strip()
        raise SdtuneError(f"{path}: this VAE does not fit the model's VAE ({why})") from None
    if missing or unexpected:
        raise SdtuneError(f"{path}: this VAE does not fit the model's VAE ({len(missing)} missing keys, e.g. "
                          f"{(missing or unexpected)[0]})")
    return vae.to(next(like.parameters()).dtype).eval()
