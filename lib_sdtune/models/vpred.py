"""A1111's test for SD2 v-prediction, used when neither the user nor a yaml says which it is.

It runs the UNet once at t=999 on a constant latent: a v-model's output minus the input
averages below -1, an eps-model's does not (A1111 `is_using_v_parameterization_for_sd2`).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def is_v_prediction_unet(unet: torch.nn.Module) -> bool:
    """True when the loaded SD2 UNet predicts v (A1111's heuristic, fp32 on CPU)."""
    param = next(unet.parameters())
    if param.device.type == "meta":
        raise ValueError("the v-prediction test needs real weights, not meta tensors")
    ctx = unet.config.cross_attention_dim
    in_ch = unet.config.in_channels
    dtype, device = param.dtype, param.device
    unet.to(torch.float32)
    try:
        x = torch.ones((1, in_ch, 8, 8), device=device) * 0.5
        cond = torch.ones((1, 2, ctx), device=device) * 0.5
        out = unet(x, torch.tensor([999], device=device), encoder_hidden_states=cond).sample
        return float((out - x[:, : out.shape[1]]).mean()) < -1
    finally:
        unet.to(dtype)
