"""train/noise.py and train/loss.py against sd-scripts' formulas, each written out here on the same tensors.

The references transcribe sd-scripts `library/train_util.py` (get_noise_noisy_latents_and_timesteps,
get_timesteps, get_huber_threshold_if_needed, conditional_loss) and `library/custom_train_functions.py`
(apply_noise_offset, pyramid_noise_like, fix_noise_scheduler_betas_for_zero_terminal_snr, apply_snr_weight,
get_snr_scale, add_v_prediction_like_loss, apply_debiased_estimation) with one change: random draws come from
the same torch.Generator in the same order (sd-scripts uses the global RNGs and Python's random for the
multires scale factor).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lib_sdtune.errors import SdtuneError
from lib_sdtune.train.loss import diffusion_loss, huber_threshold, snr, target_for
from lib_sdtune.train.noise import add_noise, perturb_noise, sample_noise, sample_timesteps, zero_terminal_snr_betas


def _betas() -> torch.Tensor:
    """SD's scaled_linear schedule as DDPMScheduler builds it (beta 0.00085..0.012, 1000 steps)."""
    return torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2


def _ac(betas: torch.Tensor | None = None) -> torch.Tensor:
    return torch.cumprod(1.0 - (_betas() if betas is None else betas), dim=0)


def _latents(b: int = 3, c: int = 4, h: int = 16, w: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed)) * 0.8 + 0.3


# ----- references (sd-scripts' formulas) -----


def ref_noise(latents, g, noise_offset=None, random_strength=False, adaptive=None, iterations=None, discount=0.3):
    noise = torch.randn(latents.shape, generator=g, dtype=latents.dtype)
    if noise_offset:
        offset = torch.rand(1, generator=g) * noise_offset if random_strength else noise_offset
        if adaptive is not None:
            latent_mean = torch.abs(latents.mean(dim=(2, 3), keepdim=True))
            offset = offset + adaptive * latent_mean
            offset = torch.clamp(offset, 0.0, None)
        noise = noise + offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=g)
    if iterations:
        b, c, w, h = noise.shape
        u = torch.nn.Upsample(size=(w, h), mode="bilinear")
        for i in range(iterations):
            r = torch.rand((), generator=g).item() * 2 + 2  # sd-scripts: random.random() * 2 + 2
            wn, hn = max(1, int(w / (r**i))), max(1, int(h / (r**i)))
            noise += u(torch.randn(b, c, wn, hn, generator=g)) * discount**i
            if wn == 1 or hn == 1:
                break
        noise = noise / noise.std()
    return noise


def ref_zero_terminal_snr(betas):
    alphas = 1 - betas
    alphas_bar = alphas.cumprod(0)
    alphas_bar_sqrt = alphas_bar.sqrt()
    alphas_bar_sqrt_0 = alphas_bar_sqrt[0].clone()
    alphas_bar_sqrt_t = alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= alphas_bar_sqrt_t
    alphas_bar_sqrt *= alphas_bar_sqrt_0 / (alphas_bar_sqrt_0 - alphas_bar_sqrt_t)
    alphas_bar = alphas_bar_sqrt**2
    alphas = alphas_bar[1:] / alphas_bar[:-1]
    alphas = torch.cat([alphas_bar[0:1], alphas])
    return 1 - alphas


def ref_loss(pred, target, timesteps, ac, loss_type="l2", huber_c=0.1, huber_schedule="snr", huber_scale=1.0,
             loss_weights=None, min_snr_gamma=None, v_pred=False, scale_v=False, v_pred_like=None, debiased=False,
             snr_ac=None, mask=None):
    all_snr = (torch.sqrt(snr_ac if snr_ac is not None else ac) / torch.sqrt(1.0 - (snr_ac if snr_ac is not None
                                                                                   else ac))) ** 2
    c = None
    if loss_type in ("huber", "smooth_l1"):
        if huber_schedule == "exponential":
            alpha = -math.log(huber_c) / 1000
            c = torch.exp(-alpha * timesteps) * huber_scale
        elif huber_schedule == "snr":
            a = torch.index_select(ac, 0, timesteps)
            sigmas = ((1.0 - a) / a) ** 0.5
            c = (1 - huber_c) / (1 + sigmas) ** 2 + huber_c
        else:
            c = torch.full((timesteps.shape[0],), huber_c * huber_scale)
    p, t = pred.float(), target.float()
    if loss_type == "l2":
        loss = torch.nn.functional.mse_loss(p, t, reduction="none")
    elif loss_type == "l1":
        loss = torch.nn.functional.l1_loss(p, t, reduction="none")
    elif loss_type == "huber":
        c = c.view(-1, 1, 1, 1)
        loss = 2 * c * (torch.sqrt((p - t) ** 2 + c**2) - c)
    else:
        c = c.view(-1, 1, 1, 1)
        loss = 2 * (torch.sqrt((p - t) ** 2 + c**2) - c)
    if mask is not None:
        loss = loss * torch.nn.functional.interpolate(mask.to(loss.dtype), size=loss.shape[2:], mode="area")
    loss = loss.mean(dim=list(range(1, loss.ndim)))
    if loss_weights is not None:
        loss = loss * loss_weights
    if min_snr_gamma:
        s = torch.stack([all_snr[i] for i in timesteps])
        m = torch.minimum(s, torch.full_like(s, min_snr_gamma))
        loss = loss * (torch.div(m, s + 1) if v_pred else torch.div(m, s)).float()
    if scale_v:
        s = torch.stack([all_snr[i] for i in timesteps])
        s = torch.minimum(s, torch.ones_like(s) * 1000)
        loss = loss * (s / (s + 1))
    if v_pred_like:
        s = torch.stack([all_snr[i] for i in timesteps])
        s = torch.minimum(s, torch.ones_like(s) * 1000)
        loss = loss + loss / (s / (s + 1)) * v_pred_like
    if debiased:
        s = torch.stack([all_snr[i] for i in timesteps])
        s = torch.minimum(s, torch.ones_like(s) * 1000)
        loss = (1 / (s + 1) if v_pred else 1 / torch.sqrt(s)) * loss
    return loss.mean()


# ----- noise -----


@pytest.mark.parametrize("kw", [
    {},
    {"noise_offset": 0.1},
    {"noise_offset": 0.1, "random_strength": True},
    {"noise_offset": 0.05, "adaptive": 0.02},
    {"noise_offset": 0.05, "random_strength": True, "adaptive": -0.5},
    {"iterations": 6, "discount": 0.3},
    {"iterations": 10, "discount": 0.4},  # stops at the 1-pixel level
    {"noise_offset": 0.1, "iterations": 3, "discount": 0.3},
])
def test_sample_noise_matches_sd_scripts(kw):
    latents = _latents()
    want = ref_noise(latents, torch.Generator().manual_seed(7), kw.get("noise_offset"),
                     kw.get("random_strength", False), kw.get("adaptive"), kw.get("iterations"),
                     kw.get("discount", 0.3))
    got = sample_noise(latents, torch.Generator().manual_seed(7), kw.get("noise_offset"),
                       kw.get("random_strength", False), kw.get("adaptive"), kw.get("iterations"),
                       kw.get("discount", 0.3))
    assert got.shape == latents.shape and got.dtype == latents.dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_sample_noise_deterministic_and_leaves_global_rng_alone():
    latents = _latents()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = sample_noise(latents, torch.Generator().manual_seed(1), 0.1, True, 0.01, 4)
    b = sample_noise(latents, torch.Generator().manual_seed(1), 0.1, True, 0.01, 4)
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), before)
    assert not torch.equal(a, sample_noise(latents, torch.Generator().manual_seed(2), 0.1, True, 0.01, 4))
    assert sample_noise(latents, None).shape == latents.shape  # global RNG, as sd-scripts


def test_multires_noise_has_unit_std():
    noise = sample_noise(torch.zeros(2, 4, 32, 32), torch.Generator().manual_seed(0), multires_noise_iterations=6)
    assert noise.std().item() == pytest.approx(1.0, abs=1e-5)


def test_adaptive_noise_scale_needs_noise_offset():
    with pytest.raises(SdtuneError, match="adaptive_noise_scale needs noise_offset"):
        sample_noise(_latents(), torch.Generator(), adaptive_noise_scale=0.1)


def test_sample_timesteps_like_sd_scripts():
    got = sample_timesteps(64, 100, 900, torch.Generator().manual_seed(3))
    want = torch.randint(100, 900, (64,), generator=torch.Generator().manual_seed(3))
    assert got.dtype == torch.long and torch.equal(got, want)
    assert torch.equal(sample_timesteps(4, 500, 500, torch.Generator()), torch.full((4,), 500))  # min == max
    full = sample_timesteps(5000, generator=torch.Generator().manual_seed(0))
    assert full.min() >= 0 and full.max() <= 999 and full.max() > 990
    with pytest.raises(SdtuneError, match="min_timestep/max_timestep"):
        sample_timesteps(2, 600, 500)


def test_perturb_noise_input_perturbation():
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(5)
    want = noise + 0.1 * torch.randn(noise.shape, generator=g)
    torch.testing.assert_close(perturb_noise(noise, 0.1, False, torch.Generator().manual_seed(5)), want, rtol=0, atol=0)
    g = torch.Generator().manual_seed(5)
    strength = torch.rand(1, generator=g) * 0.1
    want = noise + strength * torch.randn(noise.shape, generator=g)
    torch.testing.assert_close(perturb_noise(noise, 0.1, True, torch.Generator().manual_seed(5)), want, rtol=0, atol=0)
    assert perturb_noise(noise, None) is noise and perturb_noise(noise, 0.0) is noise


def test_zero_terminal_snr_betas_like_sd_scripts_and_diffusers():
    from diffusers import DDPMScheduler

    betas = _betas()
    got = zero_terminal_snr_betas(betas)
    torch.testing.assert_close(got, ref_zero_terminal_snr(betas.clone()), rtol=0, atol=0)
    ac = torch.cumprod(1 - got, 0)
    assert ac[-1].item() == 0.0 and ac[0].item() == pytest.approx(_ac()[0].item(), rel=1e-6)
    assert torch.equal(betas, _betas())  # input untouched
    ddpm = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                         clip_sample=False, rescale_betas_zero_snr=True)
    torch.testing.assert_close(got, ddpm.betas, rtol=1e-6, atol=1e-7)


def test_add_noise_and_velocity_match_ddpm_scheduler():
    from diffusers import DDPMScheduler

    ddpm = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                         clip_sample=False)
    latents, noise = _latents(), _latents(seed=1)
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(add_noise(latents, noise, t, ddpm.alphas_cumprod),
                               ddpm.add_noise(latents, noise, t), rtol=0, atol=0)
    torch.testing.assert_close(target_for("v_prediction", latents, noise, t, ddpm.alphas_cumprod),
                               ddpm.get_velocity(latents, noise, t), rtol=0, atol=0)
    assert target_for("epsilon", latents, noise, t, ddpm.alphas_cumprod) is noise
    with pytest.raises(SdtuneError, match="prediction_type 'sample'"):
        target_for("sample", latents, noise, t, ddpm.alphas_cumprod)


# ----- loss -----


def test_snr_table():
    ac = _ac()
    t = torch.tensor([0, 10, 999])
    want = torch.stack([((torch.sqrt(ac) / torch.sqrt(1.0 - ac)) ** 2)[i] for i in t])
    torch.testing.assert_close(snr(t, ac), want, rtol=0, atol=0)
    assert snr(t, ac)[0] > 1000  # why sd-scripts caps it for the v-pred scales


CASES = [
    {},
    {"loss_type": "l1"},
    {"loss_type": "huber"},
    {"loss_type": "huber", "huber_schedule": "exponential", "huber_c": 0.2, "huber_scale": 2.0},
    {"loss_type": "huber", "huber_schedule": "constant", "huber_c": 0.3, "huber_scale": 0.5},
    {"loss_type": "smooth_l1", "huber_schedule": "snr", "huber_scale": 3.0},  # scale unused by snr (sd-scripts)
    {"loss_type": "smooth_l1", "huber_schedule": "exponential"},
    {"min_snr_gamma": 5.0},
    {"min_snr_gamma": 1.0, "v_pred": True},
    {"scale_v": True},
    {"v_pred_like": 0.2},
    {"scale_v": True, "v_pred_like": 0.1},
    {"debiased": True},
    {"debiased": True, "v_pred": True},
    {"loss_type": "huber", "min_snr_gamma": 5.0, "scale_v": True, "v_pred_like": 0.3, "debiased": True,
     "v_pred": True},
]


def _loss_args(kw: dict) -> dict:
    names = {"v_pred": "v_prediction", "scale_v": "scale_v_pred_loss_like_noise_pred",
             "v_pred_like": "v_pred_like_loss", "debiased": "debiased_estimation"}
    return {names.get(k, k): v for k, v in kw.items()}


@pytest.mark.parametrize("kw", CASES)
@pytest.mark.parametrize("weights", [None, [1.0, 0.5, 2.0, 1.0]])
def test_diffusion_loss_matches_process_batch(kw, weights):
    ac = _ac()
    pred = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0)).half()  # the U-Net runs in half
    target = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 37, 500, 999])
    lw = None if weights is None else torch.tensor(weights)
    want = ref_loss(pred, target, t, ac, loss_weights=lw, **kw)
    got = diffusion_loss(pred, target, t, ac, loss_weights=lw, **_loss_args(kw))
    assert got.dim() == 0 and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_huber_threshold_schedules():
    ac, t = _ac(), torch.tensor([0, 999])
    assert huber_threshold(t, ac, 0.1, "exponential")[0].item() == pytest.approx(1.0)
    assert huber_threshold(t, ac, 0.1, "exponential")[1].item() == pytest.approx(0.1 ** 0.999, rel=1e-5)
    snr_c = huber_threshold(t, ac, 0.1, "snr")
    assert 0.1 < snr_c[1] < snr_c[0] < 1.0  # c shrinks toward huber_c as noise grows
    assert torch.equal(huber_threshold(t, ac, 0.1, "constant", 2.0), torch.full((2,), 0.2))


def test_zero_terminal_snr_weights_use_the_original_table():
    """sd-scripts computes all_snr before rescaling betas; the huber snr schedule uses the rescaled table."""
    fixed_ac, orig_ac = _ac(zero_terminal_snr_betas(_betas())), _ac()
    pred, target = _latents(b=2, seed=2), _latents(b=2, seed=3)
    t = torch.tensor([999, 400])
    kw = {"loss_type": "huber", "min_snr_gamma": 5.0, "debiased": True}
    want = ref_loss(pred, target, t, fixed_ac, snr_ac=orig_ac, **kw)
    got = diffusion_loss(pred, target, t, fixed_ac, snr_alphas_cumprod=orig_ac, **_loss_args(kw))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert torch.isfinite(got)
    assert not torch.isfinite(diffusion_loss(pred, target, t, fixed_ac, min_snr_gamma=5.0))  # SNR 0 at t=999


def test_masked_loss():
    ac = _ac()
    pred, target = _latents(b=2, h=8, w=8, seed=4), _latents(b=2, h=8, w=8, seed=5)
    mask = (torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    t = torch.tensor([10, 700])
    torch.testing.assert_close(diffusion_loss(pred, target, t, ac, mask=mask),
                               ref_loss(pred, target, t, ac, mask=mask), rtol=1e-6, atol=0)


def test_zero_gamma_and_zero_v_pred_like_are_off_as_in_sd_scripts():
    ac, t = _ac(), torch.tensor([5, 600, 900])
    pred, target = _latents(seed=6), _latents(seed=7)
    plain = diffusion_loss(pred, target, t, ac)
    assert torch.equal(diffusion_loss(pred, target, t, ac, min_snr_gamma=0.0, v_pred_like_loss=0.0), plain)
    torch.testing.assert_close(plain, F.mse_loss(pred, target))  # equal-sized samples: mean of means


@pytest.mark.parametrize("kw,match", [({"loss_type": "l3"}, "loss_type 'l3'"),
                                      ({"loss_type": "huber", "huber_schedule": "cosine"}, "huber_schedule 'cosine'")])
def test_loss_errors_name_the_field(kw, match):
    x = _latents()
    with pytest.raises(SdtuneError, match=match):
        diffusion_loss(x, x, torch.tensor([1, 2, 3]), _ac(), **kw)
    with pytest.raises(SdtuneError, match="predicted shape"):
        diffusion_loss(x, x[:, :3], torch.tensor([1, 2, 3]), _ac())
