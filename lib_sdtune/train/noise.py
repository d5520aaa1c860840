"""Noise and timesteps for one training step, as sd-scripts draws them.

Formulas follow sd-scripts `library/train_util.py` `get_noise_noisy_latents_and_timesteps` / `get_timesteps` and
`library/custom_train_functions.py` (`apply_noise_offset`, `pyramid_noise_like`,
`fix_noise_scheduler_betas_for_zero_terminal_snr`); see research/kohya_lycoris.md 3.4.

One difference on purpose: sd-scripts draws from the global RNGs (torch's and Python's `random` for the
multires scale factors). Here every draw comes from an explicit `torch.Generator`, so a step is reproducible from
the generator's state alone (resume, fixed validation noise) and nothing else in the host process moves it.
Draws are made on the generator's device and moved to the latents' device, so a CPU generator gives the same
noise on CPU and GPU. With `generator=None` the global RNG of the target device is used, as sd-scripts does.
Calling sample_noise, sample_timesteps and perturb_noise in that order draws in sd-scripts' order.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ..errors import SdtuneError

__all__ = ["sample_noise", "sample_timesteps", "perturb_noise", "zero_terminal_snr_betas", "add_noise"]

Device = Union[torch.device, str, None]


def _randn(shape: Sequence[int], generator: Optional[torch.Generator], device: torch.device,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal draws from the generator (on its device), moved to `device`."""
    where = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=where, dtype=dtype).to(device)


def _rand1(generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    """One uniform [0, 1) draw as a 1-element tensor on `device` (sd-scripts' torch.rand(1))."""
    where = generator.device if generator is not None else device
    return torch.rand(1, generator=generator, device=where).to(device)


def _pyramid(noise: torch.Tensor, generator: Optional[torch.Generator], iterations: int,
             discount: float) -> torch.Tensor:
    """Multires (pyramid) noise: add upsampled coarser noise, weighted discount**i, renormalised to unit std."""
    b, c, h, w = noise.shape
    out = noise.clone()
    for i in range(iterations):
        where = generator.device if generator is not None else noise.device
        r = float(torch.rand((), generator=generator, device=where)) * 2 + 2  # scale factor in [2, 4)
        hn, wn = max(1, int(h / (r**i))), max(1, int(w / (r**i)))
        coarse = _randn((b, c, hn, wn), generator, noise.device)
        up = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
        out = (out + up * discount**i).to(noise.dtype)  # sd-scripts adds in place into the noise tensor
        if hn == 1 or wn == 1:
            break  # the coarsest level is one pixel
    return out / out.std()


def sample_noise(latents: torch.Tensor, generator: Optional[torch.Generator], noise_offset: Optional[float] = None,
                 noise_offset_random_strength: bool = False, adaptive_noise_scale: Optional[float] = None,
                 multires_noise_iterations: Optional[int] = None, multires_noise_discount: float = 0.3) -> torch.Tensor:
    """The noise added to latents: Gaussian, plus sd-scripts' noise offset and multires noise when asked."""
    if adaptive_noise_scale is not None and noise_offset is None:
        raise SdtuneError("adaptive_noise_scale needs noise_offset: set noise_offset (e.g. 0.0357) or remove "
                          "adaptive_noise_scale")
    if latents.ndim != 4 and (noise_offset or multires_noise_iterations):
        raise SdtuneError(f"noise_offset/multires_noise_iterations need latents shaped (B, C, H, W), got "
                          f"{tuple(latents.shape)}")
    device = latents.device
    noise = _randn(latents.shape, generator, device, latents.dtype)
    if noise_offset:
        offset: Union[float, torch.Tensor] = noise_offset
        if noise_offset_random_strength:
            offset = _rand1(generator, device) * noise_offset
        if adaptive_noise_scale is not None:
            latent_mean = torch.abs(latents.mean(dim=(2, 3), keepdim=True))  # per sample and channel
            offset = torch.clamp(offset + adaptive_noise_scale * latent_mean, 0.0, None)
        noise = noise + offset * _randn((latents.shape[0], latents.shape[1], 1, 1), generator, device)
    if multires_noise_iterations:
        noise = _pyramid(noise, generator, int(multires_noise_iterations), multires_noise_discount)
    return noise


def sample_timesteps(batch_size: int, min_timestep: int = 0, max_timestep: int = 1000,
                     generator: Optional[torch.Generator] = None, device: Device = None) -> torch.Tensor:
    """One training timestep per sample, uniform in [min_timestep, max_timestep) (all max_timestep if equal)."""
    if min_timestep < 0 or max_timestep < min_timestep:
        raise SdtuneError(f"min_timestep/max_timestep = {min_timestep}/{max_timestep}: need 0 <= min <= max")
    where = generator.device if generator is not None else torch.device("cpu")
    if min_timestep < max_timestep:
        t = torch.randint(min_timestep, max_timestep, (batch_size,), generator=generator, device=where)
    else:
        t = torch.full((batch_size,), max_timestep, device=where)
    return t.long().to(device if device is not None else where)


def perturb_noise(noise: torch.Tensor, ip_noise_gamma: Optional[float], random_strength: bool = False,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Input perturbation (ip_noise_gamma): the noise to add to latents is noise + gamma * fresh Gaussian noise."""
    if not ip_noise_gamma:
        return noise
    strength: Union[float, torch.Tensor] = ip_noise_gamma
    if random_strength:
        strength = _rand1(generator, noise.device) * ip_noise_gamma
    return noise + strength * _randn(noise.shape, generator, noise.device, noise.dtype)


def add_noise(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
              alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Forward diffusion sqrt(ac_t)*latents + sqrt(1-ac_t)*noise, as DDPMScheduler.add_noise on any ac table."""
    ac = alphas_cumprod.to(device=latents.device, dtype=latents.dtype)[timesteps.to(latents.device)]
    shape = (-1,) + (1,) * (latents.ndim - 1)
    return (ac**0.5).reshape(shape) * latents + ((1 - ac) ** 0.5).reshape(shape) * noise


def zero_terminal_snr_betas(betas: torch.Tensor) -> torch.Tensor:
    """Betas rescaled so the last timestep has zero SNR (Lin et al. 2023, sd-scripts --zero_terminal_snr)."""
    alphas_bar_sqrt = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))  # last -> 0, first unchanged
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas
