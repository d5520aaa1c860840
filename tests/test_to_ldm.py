"""lib_sdtune.models.to_ldm: diffusers/transformers -> original layout, exact and inverse to diffusers' converters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lib_sdtune.errors import SdtuneError
from lib_sdtune.models.to_ldm import clip_to_ldm, open_clip_to_ldm, unet_to_ldm, vae_to_ldm

torch.set_num_threads(1)

REF = Path(__file__).resolve().parent / "data" / "reference"

# ---- real-size architectures (feasibility study, Appendix B; OpenCLIP-H as the full 24-block tower) ----
SD15_UNET = dict(sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768,
                 attention_head_dim=8)
SD21_UNET = dict(SD15_UNET, sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                 use_linear_projection=True)
SDXL_UNET = dict(sample_size=128, layers_per_block=2, block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
VAE = dict(latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              projection_dim=768, hidden_act="quick_gelu")
OPENCLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                  projection_dim=1024, hidden_act="gelu")
BIGG = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
            projection_dim=1280, hidden_act="gelu")
FULL_SIZE = {  # reference name -> (unet, [(converter, text config, prefix)])
    "sd15": (SD15_UNET, [(clip_to_ldm, CLIP_L, "cond_stage_model.transformer.")]),
    "sd21": (SD21_UNET, [(open_clip_to_ldm, OPENCLIP_H, "cond_stage_model.model.")]),
    "sdxl_base": (SDXL_UNET, [(clip_to_ldm, CLIP_L, "conditioner.embedders.0.transformer."),
                              (open_clip_to_ldm, BIGG, "conditioner.embedders.1.model.")]),
}


def _reference(name: str) -> dict[str, list[int]]:
    return json.loads((REF / f"{name}_keys.json").read_text())


def _shapes(sd: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in sd.items()}


def _text_model(cfg: dict, with_projection: bool = True) -> torch.nn.Module:
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(CLIPTextConfig(**cfg))


@pytest.mark.parametrize("name", list(FULL_SIZE))
def test_full_size_modules_convert_to_exactly_the_reference_keys_and_shapes_on_meta(name):
    unet_cfg, encoders = FULL_SIZE[name]
    with init_empty_weights():
        out = {**unet_to_ldm(UNet2DConditionModel(**unet_cfg).state_dict()),
               **vae_to_ldm(AutoencoderKL(**VAE).state_dict())}
        for convert, cfg, prefix in encoders:
            out.update(convert(_text_model(cfg, convert is open_clip_to_ldm).state_dict(), prefix))
    assert all(v.device.type == "meta" for v in out.values())
    ref = _reference(name)
    # OpenCLIP's logit_scale is the one reference tensor no HF text model holds (a documented extra)
    assert set(ref) - set(out) == {k for k in ref if k.endswith(".model.logit_scale")}
    assert set(out) - set(ref) == set()
    assert _shapes(out) == {k: v for k, v in ref.items() if k in out}


def test_sd2_penultimate_text_encoder_maps_to_the_reference_minus_last_block_and_projection():
    with init_empty_weights():
        te = _text_model(dict(OPENCLIP_H, num_hidden_layers=23), with_projection=False)
        out = open_clip_to_ldm(te.state_dict(), "cond_stage_model.model.")
    ref = {k: v for k, v in _reference("sd21").items() if k.startswith("cond_stage_model.")}
    dropped = {k for k in ref if ".resblocks.23." in k or k.endswith(("text_projection", "logit_scale"))}
    assert len(dropped) == 14
    assert _shapes(out) == {k: v for k, v in ref.items() if k not in dropped}


# ---- round trips with real values through diffusers' own converters ----

def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter distinct and random, so a swapped key cannot go unnoticed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return module.eval()


def _assert_same(back: dict[str, torch.Tensor], original: dict[str, torch.Tensor]) -> None:
    assert set(back) == set(original)
    bad = [k for k in original if back[k].shape != original[k].shape or not torch.equal(back[k], original[k])]
    assert bad == []


CA, D, CU, U = "CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"
SMALL_UNETS = {
    # SD-like: attention at full resolution; up block 1 has attentions AND an upsampler (output_blocks.N.2.conv)
    "sd_like_3_levels": dict(block_out_channels=(32, 64, 64), down_block_types=(CA, CA, D), up_block_types=(U, CU, CU),
                             layers_per_block=2, cross_attention_dim=32, attention_head_dim=2),
    # layers_per_block is read from the keys, not assumed to be 2
    "one_res_block": dict(block_out_channels=(32, 64), down_block_types=(CA, D), up_block_types=(U, CU),
                          layers_per_block=1, cross_attention_dim=32, attention_head_dim=2),
    "three_res_blocks": dict(block_out_channels=(32, 32, 64), down_block_types=(D, CA, CA), up_block_types=(CU, CU, U),
                             layers_per_block=3, cross_attention_dim=32, attention_head_dim=4,
                             use_linear_projection=True),
    # SDXL-like: add_embedding -> label_emb, deeper transformers, linear proj_in
    "sdxl_like": dict(block_out_channels=(32, 64), down_block_types=(D, CA), up_block_types=(CU, U),
                      layers_per_block=2, cross_attention_dim=48, attention_head_dim=(2, 4),
                      transformer_layers_per_block=(1, 2), use_linear_projection=True,
                      addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=32 + 6 * 8),
}


@pytest.mark.parametrize("layout", list(SMALL_UNETS))
def test_unet_round_trips_through_diffusers_convert_ldm_unet_checkpoint(layout):
    unet = _randomize(UNet2DConditionModel(sample_size=16, **SMALL_UNETS[layout]), seed=1)
    original = unet.state_dict()
    ldm = unet_to_ldm(original)
    assert all(k.startswith("model.diffusion_model.") for k in ldm)
    _assert_same(sfu.convert_ldm_unet_checkpoint(ldm, dict(unet.config)), original)


def test_sdxl_add_embedding_becomes_label_emb_and_upsampler_slot_follows_attentions():
    unet = UNet2DConditionModel(sample_size=16, **SMALL_UNETS["sdxl_like"])
    ldm = unet_to_ldm(unet.state_dict(), prefix="")
    assert {k for k in ldm if k.startswith("label_emb.")} == {
        "label_emb.0.0.weight", "label_emb.0.0.bias", "label_emb.0.2.weight", "label_emb.0.2.bias"}
    assert "output_blocks.2.2.conv.weight" in ldm  # up block 0 has attentions: upsampler is the third module
    sd_like = unet_to_ldm(UNet2DConditionModel(sample_size=16, **SMALL_UNETS["sd_like_3_levels"]).state_dict())
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in sd_like  # no attentions: second module
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in sd_like


@pytest.mark.parametrize("channels,layers", [((32, 64), 1), ((32, 64, 64), 2)])
def test_vae_round_trips_and_stores_mid_attention_as_1x1_convs(channels, layers):
    vae = _randomize(AutoencoderKL(block_out_channels=channels, layers_per_block=layers, latent_channels=4,
                                   down_block_types=("DownEncoderBlock2D",) * len(channels),
                                   up_block_types=("UpDecoderBlock2D",) * len(channels)), seed=2)
    original = vae.state_dict()
    ldm = vae_to_ldm(original)
    c = channels[-1]
    for side in ("encoder", "decoder"):
        for proj in ("q", "k", "v", "proj_out"):
            assert ldm[f"first_stage_model.{side}.mid.attn_1.{proj}.weight"].shape == (c, c, 1, 1)
    assert ldm["first_stage_model.decoder.up.0.block.0.nin_shortcut.weight"].shape == (channels[0], channels[1], 1, 1)
    _assert_same(sfu.convert_ldm_vae_checkpoint(ldm, dict(vae.config)), original)


SMALL_CLIP = dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3,
                  max_position_embeddings=77, projection_dim=24)


def _with_text_model_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The transformers 4.x layout of a CLIP text model's state dict (5.6+ flattened it)."""
    return {k if k.startswith("text_model.") or k == "text_projection.weight" else "text_model." + k: v
            for k, v in sd.items()}


@pytest.mark.parametrize("layout", ["flattened", "text_model_prefixed"])
@pytest.mark.parametrize("prefix", ["cond_stage_model.transformer.", "conditioner.embedders.0.transformer."])
def test_clip_round_trips_through_diffusers_convert_ldm_clip_checkpoint(layout, prefix):
    sd = _randomize(CLIPTextModel(CLIPTextConfig(**SMALL_CLIP)), seed=3).state_dict()
    if layout == "text_model_prefixed":
        sd = _with_text_model_prefix(sd)
    ldm = clip_to_ldm(sd, prefix)
    assert all(k.startswith(prefix + "text_model.") for k in ldm)
    assert not any(k.endswith("position_ids") for k in ldm)  # not a tensor of the model, so not invented
    _assert_same(sfu.convert_ldm_clip_checkpoint(ldm, remove_prefix=prefix), _with_text_model_prefix(sd))


def test_clip_position_ids_are_kept_when_the_input_has_them():
    sd = dict(CLIPTextModel(CLIPTextConfig(**SMALL_CLIP)).state_dict())
    sd["embeddings.position_ids"] = torch.arange(77)[None]
    out = clip_to_ldm(sd, "cond_stage_model.transformer.")
    assert torch.equal(out["cond_stage_model.transformer.text_model.embeddings.position_ids"], torch.arange(77)[None])


@pytest.mark.parametrize("with_projection", [False, True])
@pytest.mark.parametrize("layout", ["flattened", "text_model_prefixed"])
def test_open_clip_round_trips_through_diffusers_convert_open_clip_checkpoint(with_projection, layout):
    model = _randomize(_text_model(SMALL_CLIP, with_projection), seed=4)
    sd = model.state_dict()
    if layout == "text_model_prefixed":
        sd = _with_text_model_prefix(sd)
    prefix = "conditioner.embedders.1.model."
    ldm = open_clip_to_ldm(sd, prefix)
    assert ldm[prefix + "transformer.resblocks.0.attn.in_proj_weight"].shape == (96, 32)
    if with_projection:
        assert torch.equal(ldm[prefix + "text_projection"], sd["text_projection.weight"].T)
    back = sfu.convert_open_clip_checkpoint(model, ldm, prefix=prefix)
    _assert_same(back, _with_text_model_prefix(sd))


def test_diffusers_drops_sd2s_last_openclip_block_and_projection_under_the_sd2_prefix():
    cfg = dict(SMALL_CLIP, num_hidden_layers=24)
    model = _randomize(_text_model(cfg), seed=5)
    sd = model.state_dict()
    ldm = open_clip_to_ldm(sd, "cond_stage_model.model.")
    assert "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight" in ldm
    back = sfu.convert_open_clip_checkpoint(model, ldm, prefix="cond_stage_model.model.")
    _assert_same(back, {k: v for k, v in sd.items() if ".layers.23." not in k and k != "text_projection.weight"})


@pytest.mark.parametrize("convert,key", [
    (unet_to_ldm, "time_embedding.cond_proj.weight"),
    (vae_to_ldm, "encoder.mid_block.attentions.0.to_q.lora_A.weight"),
    (open_clip_to_ldm, "encoder.layers.0.self_attn.q_proj.lora_A.weight"),
])
def test_a_key_with_no_place_in_the_original_layout_raises_instead_of_vanishing(convert, key):
    unet_keys = {"down_blocks.0.resnets.0.conv1.weight": torch.zeros(1)}
    sd = {**(unet_keys if convert is unet_to_ldm else {}), key: torch.zeros(1)}
    with pytest.raises(SdtuneError, match="has no place"):
        convert(sd, prefix="x.")
