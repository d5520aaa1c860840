"""Tiny Stable Diffusion checkpoints in the original single-file layout, for tests and `sdtune demo`.

Each tiny checkpoint has exactly the key names of the real model of its architecture: the same
levels, res blocks, transformer depths (SDXL 0/2/10, mid 10; refiner 4), text-encoder layer counts
(CLIP-L 12, OpenCLIP-H 24, bigG 32), vocabulary 49408 and 77 positions. Only widths differ:
UNet/VAE channels (32, 64, 96[, 96]) (multiples of 32 for GroupNorm, growing wherever the real
ones grow, so the same skip connections exist), text encoders 64 wide (bigG 128, so SDXL's two
encoders differ in width as diffusers' detection needs). Where the tiny head layout differs from
the loader's family defaults (SD2/SDXL: 64 channels per head), an original-format `.yaml` with
`num_head_channels: 16` is written beside the checkpoint, as A1111 expects.

Weights are random but deterministic (seeded per component), numerically sane, and rounded to
values that fp16 and bf16 store exactly: loading a written checkpoint gives back bit-identical
weights, so its modules reproduce `build_tiny_components`' outputs exactly.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import Any, Optional

import torch

from ..models import to_ldm

__all__ = ["TINY_ARCHITECTURES", "build_tiny_components", "tiny_configs", "tiny_state_dict", "tiny_yaml",
           "write_tiny_checkpoint"]

TINY_ARCHITECTURES = ("sd1", "sd2", "sd2-v", "sdxl", "sdxl-refiner")

HEAD_CHANNELS = 16  # tiny SD2/SDXL attention width per head (real: 64); SD1 keeps its 8 heads
TIME_EMBED_DIM = 32  # tiny SDXL size-conditioning width per id (real: 256)
LOGIT_SCALE = math.log(100.0)  # trained CLIP's value
_CH4, _CH3 = (32, 64, 96, 96), (32, 64, 96)
_CA, _D, _U = "CrossAttnDownBlock2D", "DownBlock2D", "UpBlock2D"
_CU = "CrossAttnUpBlock2D"

# text encoders: CLIPTextConfig kwargs as the loader infers them (64-wide heads)
_CLIP_L = dict(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=12, num_attention_heads=1,
               max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=64,
               bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
_OPEN_CLIP_H = dict(_CLIP_L, num_hidden_layers=23, hidden_act="gelu", pad_token_id=0)  # SD2: penultimate of 24
_BIG_G = dict(_OPEN_CLIP_H, hidden_size=128, intermediate_size=256, num_hidden_layers=32, num_attention_heads=2,
              projection_dim=128)

# component -> (key prefix in the checkpoint, kind) per family
_LAYOUT = {
    "sd1": {"text_encoder": ("cond_stage_model.transformer.", "clip")},
    "sd2": {"text_encoder": ("cond_stage_model.model.", "open_clip")},
    "sdxl": {"text_encoder": ("conditioner.embedders.0.transformer.", "clip"),
             "text_encoder_2": ("conditioner.embedders.1.model.", "open_clip")},
    "sdxl-refiner": {"text_encoder_2": ("conditioner.embedders.0.model.", "open_clip")},
}


def _family(arch: str) -> str:
    if arch not in TINY_ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(TINY_ARCHITECTURES)}")
    return "sd2" if arch == "sd2-v" else arch


def _unet(arch: str) -> dict[str, Any]:
    common = dict(in_channels=4, out_channels=4, layers_per_block=2, use_linear_projection=True)
    if arch == "sd1":
        return dict(common, sample_size=64, block_out_channels=_CH4, down_block_types=(_CA, _CA, _CA, _D),
                    up_block_types=(_U, _CU, _CU, _CU), cross_attention_dim=64, attention_head_dim=8,
                    use_linear_projection=False, transformer_layers_per_block=1)
    if arch in ("sd2", "sd2-v"):
        return dict(common, sample_size=96 if arch == "sd2-v" else 64, block_out_channels=_CH4,
                    down_block_types=(_CA, _CA, _CA, _D), up_block_types=(_U, _CU, _CU, _CU),
                    cross_attention_dim=64, attention_head_dim=[c // HEAD_CHANNELS for c in _CH4],
                    transformer_layers_per_block=1)
    text_time = dict(addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED_DIM)
    if arch == "sdxl":  # context = CLIP-L 64 + bigG 128; label_emb in = pooled 128 + 6 size ids
        return dict(common, **text_time, sample_size=128, block_out_channels=_CH3, down_block_types=(_D, _CA, _CA),
                    up_block_types=(_CU, _CU, _U), cross_attention_dim=192,
                    attention_head_dim=[c // HEAD_CHANNELS for c in _CH3], transformer_layers_per_block=(1, 2, 10),
                    projection_class_embeddings_input_dim=128 + 6 * TIME_EMBED_DIM)
    # refiner: attention on levels 1 and 2 (depth 4, mid 4), context = bigG only, 5 size ids
    return dict(common, **text_time, sample_size=128, block_out_channels=_CH4, down_block_types=(_D, _CA, _CA, _D),
                up_block_types=(_U, _CU, _CU, _U), cross_attention_dim=128,
                attention_head_dim=[c // HEAD_CHANNELS for c in _CH4], transformer_layers_per_block=(1, 4, 4, 4),
                projection_class_embeddings_input_dim=128 + 5 * TIME_EMBED_DIM)


def tiny_configs(arch: str) -> dict[str, dict[str, Any]]:
    """Constructor kwargs of each component: `UNet2DConditionModel`, `AutoencoderKL`, `CLIPTextConfig`.

    They equal what sdtune's loader infers from the written checkpoint (plus its `.yaml`).
    """
    family = _family(arch)
    out: dict[str, dict[str, Any]] = {
        "unet": _unet(arch),
        "vae": dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=_CH4, latent_channels=4,
                    layers_per_block=2, norm_num_groups=32, sample_size=512,
                    scaling_factor=0.13025 if family.startswith("sdxl") else 0.18215),
    }
    for name, (_, kind) in _LAYOUT[family].items():
        if kind == "clip":
            out[name] = dict(_CLIP_L)
        else:
            out[name] = dict(_OPEN_CLIP_H if family == "sd2" else _BIG_G)
    return out


def _seeded(seed: int, name: str) -> torch.Generator:
    """One generator per (seed, component), so components do not shift each other's weights."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def _exact(t: torch.Tensor) -> torch.Tensor:
    """Round to values fp32, fp16 and bf16 all store exactly (bf16 precision, no fp16 subnormals)."""
    b = t.to(torch.bfloat16)
    return b.masked_fill_(b.abs() < 2.0**-14, 0.0).float()


def _init_tensor(name: str, shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    """normal(0, 1/sqrt(fan_in)) for weights, ~1 for norm scales, small biases (nothing zero)."""
    noise = torch.randn(shape, generator=gen)
    if len(shape) >= 2:
        fan_in = math.prod(shape[1:])
        # residual-branch outputs a bit smaller, so 10-deep SDXL blocks keep activations moderate
        scale = 0.5 if name.endswith(("to_out.0.weight", "conv2.weight", "fc2.weight", "ff.net.2.weight")) else 1.0
        return _exact(noise.mul_(scale / math.sqrt(fan_in)))
    if name.endswith("weight"):  # GroupNorm / LayerNorm scale
        return _exact(noise.mul_(0.1).add_(1.0))
    return _exact(noise.mul_(0.02))


def _materialize(module: torch.nn.Module, gen: torch.Generator) -> torch.nn.Module:
    """Replace every meta parameter by a deterministic random one, in `named_modules` order."""
    for mod_name, mod in module.named_modules():
        for p_name, p in list(mod._parameters.items()):
            if p is None:
                continue
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            mod._parameters[p_name] = torch.nn.Parameter(_init_tensor(full, p.shape, gen),
                                                         requires_grad=p.requires_grad)
    return module.eval()


def _build(kind: str, cfg: dict[str, Any], gen: Optional[torch.Generator]) -> torch.nn.Module:
    """Build a component and fill it from `gen`; with `gen=None` its parameters stay on meta."""
    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on meta (no default init), buffers real
        if kind == "unet":
            from diffusers import UNet2DConditionModel

            module: torch.nn.Module = UNet2DConditionModel(**cfg)
        elif kind == "vae":
            from diffusers import AutoencoderKL

            module = AutoencoderKL(**cfg)
        else:
            from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

            cls = CLIPTextModelWithProjection if kind == "with_projection" else CLIPTextModel
            module = cls(CLIPTextConfig(**cfg))
    return module.eval() if gen is None else _materialize(module, gen)


def _build_all(arch: str, seed: int) -> tuple[dict[str, torch.nn.Module], dict[str, torch.nn.Module]]:
    """(components as the loader builds them, full OpenCLIP towers keyed by component)."""
    family = _family(arch)
    cfgs = tiny_configs(arch)
    comps = {"unet": _build("unet", cfgs["unet"], _seeded(seed, f"{arch}/unet")),
             "vae": _build("vae", cfgs["vae"], _seeded(seed, f"{arch}/vae"))}
    towers: dict[str, torch.nn.Module] = {}
    for name, (_, kind) in _LAYOUT[family].items():
        gen = _seeded(seed, f"{arch}/{name}")
        if kind == "clip":
            comps[name] = _build("clip", cfgs[name], gen)
        elif family == "sd2":
            # the checkpoint holds all 24 OpenCLIP blocks and the projection; SD2 uses the first 23
            tower = _build("with_projection", dict(cfgs[name], num_hidden_layers=24), gen)
            full = _bare(tower.state_dict())
            te = _build("clip", cfgs[name], None)
            te.load_state_dict({k: full[_bare_key(k)].clone() for k in te.state_dict()}, strict=True, assign=True)
            comps[name], towers[name] = te, tower
        else:
            comps[name] = _build("with_projection", cfgs[name], gen)
    return comps, towers


def _bare_key(key: str) -> str:
    return key[len("text_model."):] if key.startswith("text_model.") else key


def _bare(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF CLIP keys without `text_model.` (transformers 4.x and 5.6+ layouts alike)."""
    return {_bare_key(k): v for k, v in sd.items()}


def build_tiny_components(arch: str, seed: int = 0) -> dict[str, torch.nn.Module]:
    """The tiny diffusers/transformers modules of `arch` (fp32, eval mode), as sdtune's loader builds them.

    Keys: `unet`, `vae`, and `text_encoder` (SD1/SD2/SDXL) and/or `text_encoder_2` (SDXL, refiner).
    SD2's `text_encoder` is the penultimate-layer model (23 of the checkpoint's 24 OpenCLIP blocks).
    """
    return _build_all(arch, seed)[0]


def _schedule_buffers() -> dict[str, torch.Tensor]:
    """The DDPM buffers ldm's LatentDiffusion saves (scaled-linear betas 0.00085..0.012, 1000 steps)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1.0 - betas, 0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    post_var = betas * (1.0 - prev) / (1.0 - ac)
    return {
        "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": ac.sqrt(), "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - ac).log(), "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1).sqrt(), "posterior_variance": post_var,
        "posterior_log_variance_clipped": torch.cat([post_var[1:2], post_var[1:]]).log(),
        "posterior_mean_coef1": betas * prev.sqrt() / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - prev) * (1.0 - betas).sqrt() / (1.0 - ac),
    }


def tiny_state_dict(arch: str, seed: int = 0, extras: bool = True) -> dict[str, torch.Tensor]:
    """The whole tiny checkpoint in the original layout (fp32), as `write_tiny_checkpoint` saves it.

    With `extras`, it also carries what real files do beside the weights: CLIP-L `position_ids`
    (int64 [1, 77]), the DDPM schedule buffers (SD1/SD2); OpenCLIP `logit_scale` is always there
    (it is part of the real layout).
    """
    family = _family(arch)
    comps, towers = _build_all(arch, seed)
    out = {**to_ldm.unet_to_ldm(comps["unet"].state_dict()), **to_ldm.vae_to_ldm(comps["vae"].state_dict())}
    for name, (prefix, kind) in _LAYOUT[family].items():
        if kind == "clip":
            out.update(to_ldm.clip_to_ldm(comps[name].state_dict(), prefix))
            if extras:
                out[prefix + "text_model.embeddings.position_ids"] = torch.arange(77, dtype=torch.int64)[None]
        else:
            out.update(to_ldm.open_clip_to_ldm(towers.get(name, comps[name]).state_dict(), prefix))
            out[prefix + "logit_scale"] = torch.tensor(LOGIT_SCALE)
    if extras and family in ("sd1", "sd2"):
        out.update({k: v.float() for k, v in _schedule_buffers().items()})
    return {k: v.detach().contiguous() for k, v in out.items()}


def _ddconfig() -> dict[str, Any]:
    return dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 3, 3],
                num_res_blocks=2, attn_resolutions=[], dropout=0.0)


def tiny_yaml(arch: str) -> Optional[dict[str, Any]]:
    """The original-format config written beside the checkpoint (ldm for SD2, sgm for SDXL); None for SD1.

    SD1's tiny UNet keeps the family default of 8 heads, so it needs none (like most real SD1 files).
    """
    family = _family(arch)
    first_stage = dict(embed_dim=4, monitor="val/rec_loss", ddconfig=_ddconfig(),
                       lossconfig={"target": "torch.nn.Identity"})
    unet = tiny_configs(arch)["unet"]
    if family == "sd1":
        return None
    if family == "sd2":
        params: dict[str, Any] = {"parameterization": "v"} if arch == "sd2-v" else {}
        params.update(
            linear_start=0.00085, linear_end=0.012, num_timesteps_cond=1, log_every_t=200, timesteps=1000,
            first_stage_key="jpg", cond_stage_key="txt", image_size=unet["sample_size"], channels=4,
            cond_stage_trainable=False, conditioning_key="crossattn", monitor="val/loss_simple_ema",
            scale_factor=0.18215, use_ema=False,
            unet_config={"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": dict(
                use_checkpoint=True, use_fp16=True, image_size=32, in_channels=4, out_channels=4, model_channels=32,
                attention_resolutions=[4, 2, 1], num_res_blocks=2, channel_mult=[1, 2, 3, 3],
                num_head_channels=HEAD_CHANNELS, use_spatial_transformer=True, use_linear_in_transformer=True,
                transformer_depth=1, context_dim=64, legacy=False)},
            first_stage_config={"target": "ldm.models.autoencoder.AutoencoderKL", "params": first_stage},
            cond_stage_config={"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                               "params": {"freeze": True, "layer": "penultimate"}},
        )
        return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}}
    refiner = family == "sdxl-refiner"
    ids = ["original_size_as_tuple", "crop_coords_top_left"] + (
        ["aesthetic_score"] if refiner else ["target_size_as_tuple"])
    size_embedders = [{"is_trainable": False, "input_key": key,
                       "target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND",
                       "params": {"outdim": TIME_EMBED_DIM}} for key in ids]
    open_clip = {"is_trainable": False, "input_key": "txt",
                 "target": "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2",
                 "params": {"arch": "ViT-bigG-14", "version": "laion2b_s39b_b160k", "freeze": True,
                            "layer": "penultimate", "always_return_pooled": True, "legacy": False}}
    clip = {"is_trainable": False, "input_key": "txt", "target": "sgm.modules.encoders.modules.FrozenCLIPEmbedder",
            "params": {"layer": "hidden", "layer_idx": 11}}
    network = dict(
        adm_in_channels=unet["projection_class_embeddings_input_dim"], num_classes="sequential", use_checkpoint=True,
        in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2], num_res_blocks=2,
        channel_mult=[1, 2, 3, 3] if refiner else [1, 2, 3], num_head_channels=HEAD_CHANNELS,
        use_linear_in_transformer=True, transformer_depth=4 if refiner else [0, 2, 10],
        context_dim=unet["cross_attention_dim"], spatial_transformer_attn_type="softmax-xformers", legacy=False)
    params = dict(
        scale_factor=0.13025, disable_first_stage_autocast=True,
        denoiser_config={"target": "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser", "params": {
            "num_idx": 1000,
            "scaling_config": {"target": "sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling"},
            "discretization_config": {
                "target": "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization"}}},
        network_config={"target": "sgm.modules.diffusionmodules.openaimodel.UNetModel", "params": network},
        conditioner_config={"target": "sgm.modules.GeneralConditioner", "params": {
            "emb_models": ([] if refiner else [clip]) + [open_clip] + size_embedders}},
        first_stage_config={"target": "sgm.models.autoencoder.AutoencoderKLInferenceWrapper",
                            "params": dict(first_stage, ddconfig=dict(_ddconfig(), attn_type="vanilla-xformers"))},
    )
    return {"model": {"target": "sgm.models.diffusion.DiffusionEngine", "params": params}}


def write_tiny_checkpoint(arch: str, out_dir: str | Path, seed: int = 0, dtype: torch.dtype = torch.float16,
                          name: Optional[str] = None, extras: bool = True) -> Path:
    """Write `<out_dir>/<name>.safetensors` (default name `tiny-<arch>`) and, for SD2/SDXL, `<name>.yaml`.

    Floating tensors are stored as `dtype` (fp16 by default; the weights are exact in fp16/bf16).
    Returns the checkpoint path.
    """
    import yaml

    from ..io.safetensors_io import save_safetensors

    sd = tiny_state_dict(arch, seed, extras=extras)
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name or 'tiny-' + arch}.safetensors"
    doc = tiny_yaml(arch)
    if doc is not None:
        path.with_suffix(".yaml").write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    else:
        path.with_suffix(".yaml").unlink(missing_ok=True)  # a stale yaml would override the defaults
    save_safetensors(sd, path, metadata={"sdtune.tiny.architecture": arch, "sdtune.tiny.seed": str(seed)})
    return path
