"""The training loss of one batch, as sd-scripts' `train_network.py` `process_batch` computes it.

Order (research/kohya_lycoris.md 3.4): element-wise loss of pred.float() vs target.float() (l2, l1, huber,
smooth_l1 with sd-scripts' huber_c schedules) -> optional mask -> mean over all but the batch dimension ->
x per-sample loss_weights -> min-SNR gamma -> v-pred scaling like noise prediction -> v-pred-like loss ->
debiased estimation -> mean over the batch. Formulas from sd-scripts `library/train_util.py`
(`get_huber_threshold_if_needed`, `conditional_loss`) and `library/custom_train_functions.py`
(`apply_snr_weight`, `scale_v_prediction_loss_like_noise_prediction`, `add_v_prediction_like_loss`,
`apply_debiased_estimation`, `prepare_scheduler_for_custom_training`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import SdtuneError

__all__ = ["snr", "target_for", "huber_threshold", "diffusion_loss", "LOSS_TYPES", "HUBER_SCHEDULES"]

LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("snr", "exponential", "constant")


def _at(table: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """table[timesteps], indexing on the table's device."""
    return table[timesteps.to(table.device).long()]


def snr(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_t^2 / sigma_t^2 at each timestep (sd-scripts' all_snr), on timesteps' device."""
    ac = _at(alphas_cumprod, timesteps)
    return ((torch.sqrt(ac) / torch.sqrt(1.0 - ac)) ** 2).to(timesteps.device)


def target_for(prediction_type: str, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
               alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """What the U-Net should predict: the noise (epsilon) or the velocity (v-prediction, SD2-768-v)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type != "v_prediction":
        raise SdtuneError(f"prediction_type {prediction_type!r} is not trained by sdtune; the noise scheduler "
                          f"must predict epsilon or v_prediction")
    # DDPMScheduler.get_velocity: the table is cast to the latents' dtype before the square roots
    ac = _at(alphas_cumprod.to(device=latents.device, dtype=latents.dtype), timesteps)
    shape = (-1,) + (1,) * (latents.ndim - 1)
    return (ac**0.5).reshape(shape) * noise - ((1 - ac) ** 0.5).reshape(shape) * latents


def huber_threshold(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, huber_c: float = 0.1,
                    huber_schedule: str = "snr", huber_scale: float = 1.0) -> torch.Tensor:
    """Per-sample huber_c for huber/smooth_l1 losses, with sd-scripts' snr, exponential or constant schedule."""
    if huber_schedule == "exponential":
        alpha = -math.log(huber_c) / alphas_cumprod.shape[0]  # num_train_timesteps
        return torch.exp(-alpha * timesteps) * huber_scale
    if huber_schedule == "snr":  # huber_scale is not applied here, as in sd-scripts
        ac = _at(alphas_cumprod, timesteps)
        sigmas = ((1.0 - ac) / ac) ** 0.5
        return ((1 - huber_c) / (1 + sigmas) ** 2 + huber_c).to(timesteps.device)
    if huber_schedule == "constant":
        return torch.full((timesteps.shape[0],), huber_c * huber_scale, device=timesteps.device)
    raise SdtuneError(f"huber_schedule {huber_schedule!r} is not known; use one of {', '.join(HUBER_SCHEDULES)}")


def _elementwise(pred: torch.Tensor, target: torch.Tensor, loss_type: str,
                 huber_c: Optional[torch.Tensor]) -> torch.Tensor:
    """sd-scripts' conditional_loss with reduction 'none'."""
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    assert huber_c is not None
    c = huber_c.to(pred.device).view(-1, *([1] * (pred.ndim - 1)))
    root = torch.sqrt((pred - target) ** 2 + c**2) - c
    return 2 * c * root if loss_type == "huber" else 2 * root


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
                   *, loss_type: str = "l2", huber_c: float = 0.1, huber_schedule: str = "snr",
                   huber_scale: float = 1.0, loss_weights: Optional[torch.Tensor] = None,
                   min_snr_gamma: Optional[float] = None, v_prediction: bool = False,
                   scale_v_pred_loss_like_noise_pred: bool = False, v_pred_like_loss: Optional[float] = None,
                   debiased_estimation: bool = False, snr_alphas_cumprod: Optional[torch.Tensor] = None,
                   mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The scalar training loss of a batch, weighted per sample and per timestep exactly as sd-scripts does.

    `alphas_cumprod` is the schedule the noise was added with (used by the huber snr schedule);
    `snr_alphas_cumprod`, when given, is the one the SNR weights use. sd-scripts computes its SNR table before
    the zero-terminal-SNR rescale, so to match it with zero_terminal_snr pass the original schedule there (the
    rescaled one has SNR 0 at the last timestep, where min-SNR and debiased weights divide by zero).
    `mask` (B, 1, h, w) in [0, 1] is sd-scripts' masked loss: resized with area interpolation and multiplied in.
    """
    if loss_type not in LOSS_TYPES:
        raise SdtuneError(f"loss_type {loss_type!r} is not known; use one of {', '.join(LOSS_TYPES)}")
    if pred.shape != target.shape:
        raise SdtuneError(f"the model predicted shape {tuple(pred.shape)} but the target is {tuple(target.shape)}")
    c = None
    if loss_type in ("huber", "smooth_l1"):
        c = huber_threshold(timesteps, alphas_cumprod, huber_c, huber_schedule, huber_scale)
    loss = _elementwise(pred.float(), target.float(), loss_type, c)
    if mask is not None:
        mask = F.interpolate(mask.to(device=loss.device, dtype=loss.dtype), size=loss.shape[2:], mode="area")
        loss = loss * mask
    loss = loss.mean(dim=list(range(1, loss.ndim)))
    if loss_weights is not None:
        loss = loss * loss_weights.to(loss.device)

    table = alphas_cumprod if snr_alphas_cumprod is None else snr_alphas_cumprod
    needs_snr = min_snr_gamma or scale_v_pred_loss_like_noise_pred or v_pred_like_loss or debiased_estimation
    s = snr(timesteps, table).float().to(loss.device) if needs_snr else None
    if min_snr_gamma:
        assert s is not None
        weight = torch.minimum(s, torch.full_like(s, min_snr_gamma)) / (s + 1 if v_prediction else s)
        loss = loss * weight
    if scale_v_pred_loss_like_noise_pred or v_pred_like_loss:
        assert s is not None
        capped = torch.minimum(s, torch.ones_like(s) * 1000)  # SNR is huge at t=0; sd-scripts caps it at 1000
        scale = capped / (capped + 1)
        if scale_v_pred_loss_like_noise_pred:
            loss = loss * scale
        if v_pred_like_loss:
            loss = loss + loss / scale * v_pred_like_loss
    if debiased_estimation:
        assert s is not None
        capped = torch.minimum(s, torch.ones_like(s) * 1000)
        loss = (1 / (capped + 1) if v_prediction else 1 / torch.sqrt(capped)) * loss
    return loss.mean()
