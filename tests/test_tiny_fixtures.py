"""lib_sdtune.demo.tiny_models: tiny checkpoints with the real models' key names, yaml hints, and fixed seeds."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from lib_sdtune.demo.tiny_models import (
    TINY_ARCHITECTURES,
    build_tiny_components,
    tiny_configs,
    tiny_state_dict,
    tiny_yaml,
)
from lib_sdtune.io.safetensors_io import SafetensorsFile, read_header
from lib_sdtune.models.hints import hints_from_yaml, yaml_beside
from lib_sdtune.models.to_ldm import open_clip_to_ldm, unet_to_ldm, vae_to_ldm

torch.set_num_threads(1)

REF = Path(__file__).resolve().parent / "data" / "reference"
REFERENCE_OF = {"sd1": "sd15", "sd2": "sd21", "sd2-v": "sd21", "sdxl": "sdxl_base"}
# keys real files may carry beside the reference layout (reference/README.md)
EXTRA = re.compile(r"^(.*\.position_ids|betas|alphas_cumprod(_prev)?|sqrt_\w+|log_one_minus_alphas_cumprod"
                   r"|posterior_\w+)$")


def _header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    return {k: info.shape for k, info in read_header(path)[0].items()}


@pytest.mark.parametrize("arch", list(REFERENCE_OF))
def test_tiny_checkpoint_has_exactly_the_real_key_names_and_ranks(tiny_checkpoints, arch):
    shapes = _header_shapes(tiny_checkpoints[arch])
    ref = json.loads((REF / f"{REFERENCE_OF[arch]}_keys.json").read_text())
    extras = {k for k in shapes if EXTRA.match(k)}
    assert set(shapes) - extras == set(ref)
    assert {k: len(s) for k, s in shapes.items() if k in ref} == {k: len(s) for k, s in ref.items()}
    expected_extras = {"sd1": 13, "sd2": 12, "sd2-v": 12, "sdxl": 1}[arch]  # position_ids and/or 12 DDPM buffers
    assert len(extras) == expected_extras


def test_tiny_refiner_has_the_key_names_of_a_real_size_refiner(tiny_checkpoints):
    with init_empty_weights():  # SDXL refiner: 384 channels, attention on levels 1-2 at depth 4, bigG only
        unet = UNet2DConditionModel(
            block_out_channels=(384, 768, 1536, 1536), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=4, attention_head_dim=(6, 12, 24, 24), cross_attention_dim=1280,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2560)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        big_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120,
                                                           num_attention_heads=20, num_hidden_layers=32,
                                                           projection_dim=1280, hidden_act="gelu"))
        real = {**unet_to_ldm(unet.state_dict()), **vae_to_ldm(vae.state_dict()),
                **open_clip_to_ldm(big_g.state_dict(), "conditioner.embedders.0.model.")}
    real["conditioner.embedders.0.model.logit_scale"] = torch.empty((), device="meta")
    tiny = _header_shapes(tiny_checkpoints["sdxl-refiner"])
    assert set(tiny) == set(real)
    assert {k: len(s) for k, s in tiny.items()} == {k: v.dim() for k, v in real.items()}
    assert real["model.diffusion_model.label_emb.0.0.weight"].shape[1] == 2560


def test_tiny_widths_follow_the_group_norm_clip_head_and_sdxl_conditioning_rules():
    for arch in TINY_ARCHITECTURES:
        cfg = tiny_configs(arch)
        assert all(c % 32 == 0 for c in cfg["unet"]["block_out_channels"] + cfg["vae"]["block_out_channels"])
        for name in ("text_encoder", "text_encoder_2"):
            if name in cfg:
                te = cfg[name]
                assert te["hidden_size"] % 64 == 0 and te["num_attention_heads"] == te["hidden_size"] // 64
                assert (te["vocab_size"], te["max_position_embeddings"]) == (49408, 77)
    xl, refiner = tiny_configs("sdxl"), tiny_configs("sdxl-refiner")
    assert xl["text_encoder"]["hidden_size"] != xl["text_encoder_2"]["hidden_size"]
    assert xl["unet"]["cross_attention_dim"] == xl["text_encoder"]["hidden_size"] + xl["text_encoder_2"]["hidden_size"]
    t = xl["unet"]["addition_time_embed_dim"]
    assert xl["unet"]["projection_class_embeddings_input_dim"] == xl["text_encoder_2"]["projection_dim"] + 6 * t
    assert refiner["unet"]["cross_attention_dim"] == refiner["text_encoder_2"]["hidden_size"]
    pooled = refiner["text_encoder_2"]["projection_dim"]
    assert refiner["unet"]["projection_class_embeddings_input_dim"] == pooled + 5 * t


@pytest.mark.parametrize("arch,prediction,scale", [
    ("sd2", "epsilon", 0.18215), ("sd2-v", "v_prediction", 0.18215),
    ("sdxl", "epsilon", 0.13025), ("sdxl-refiner", "epsilon", 0.13025)])
def test_yaml_beside_the_checkpoint_gives_the_heads_the_tiny_unet_was_built_with(tiny_checkpoints, arch, prediction,
                                                                                scale):
    hints = hints_from_yaml(yaml_beside(tiny_checkpoints[arch]))
    assert (hints.prediction_type, hints.num_heads, hints.vae_scaling_factor) == (prediction, None, scale)
    unet = tiny_configs(arch)["unet"]
    assert list(unet["attention_head_dim"]) == [c // hints.num_head_channels for c in unet["block_out_channels"]]


def test_sd1_needs_no_yaml_because_it_keeps_the_default_eight_heads(tiny_checkpoints):
    assert yaml_beside(tiny_checkpoints["sd1"]) is None and tiny_yaml("sd1") is None
    assert tiny_configs("sd1")["unet"]["attention_head_dim"] == 8


@pytest.mark.parametrize("arch", ["sd2", "sd2-v"])
def test_sd2_yaml_describes_the_same_unet_and_vae_as_the_weights_for_diffusers(tiny_checkpoints, arch):
    doc, shapes = tiny_yaml(arch), _header_shapes(tiny_checkpoints[arch])
    meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    with init_empty_weights():
        unet = UNet2DConditionModel(**sfu.create_unet_diffusers_config_from_ldm(doc, meta))
        vae = AutoencoderKL(**sfu.create_vae_diffusers_config_from_ldm(doc, meta))
    from_yaml = {**unet_to_ldm(unet.state_dict()), **vae_to_ldm(vae.state_dict())}
    assert {k: tuple(v.shape) for k, v in from_yaml.items()} == {k: s for k, s in shapes.items() if k in from_yaml}
    assert unet.config.attention_head_dim == tiny_configs(arch)["unet"]["attention_head_dim"]


def test_diffusers_recognises_the_tiny_sd1_sdxl_and_refiner_layouts(tiny_checkpoints):
    for arch, kind in (("sd1", "v1"), ("sdxl", "xl_base"), ("sdxl-refiner", "xl_refiner")):
        meta = {k: torch.empty(s, device="meta") for k, s in _header_shapes(tiny_checkpoints[arch]).items()}
        assert sfu.infer_diffusers_model_type(meta) == kind


def test_files_are_fp16_by_default_with_int64_position_ids_and_stay_small(tiny_checkpoints):
    for arch in TINY_ARCHITECTURES:
        path = tiny_checkpoints[arch]
        dtypes = {info.dtype for k, info in read_header(path)[0].items() if not k.endswith("position_ids")}
        assert dtypes == {"F16"}
        limit = 70e6 if arch.startswith("sdxl") else 30e6  # SDXL: 60 transformer blocks at >= 96 channels
        assert path.stat().st_size < limit
    assert read_header(tiny_checkpoints["sd1"])[0][
        "cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == "I64"


@pytest.fixture(scope="module")
def sd1_seed0() -> dict[str, torch.Tensor]:
    return tiny_state_dict("sd1", seed=0)


@pytest.fixture(scope="module")
def refiner_seed1() -> dict[str, torch.nn.Module]:
    return build_tiny_components("sdxl-refiner", seed=1)


def test_same_seed_gives_bit_identical_tensors(tiny_checkpoints, sd1_seed0):
    with SafetensorsFile(tiny_checkpoints["sd1"]) as f:  # written by an earlier, separate build
        written = {k: f.get_tensor(k) for k in f.keys()}
    assert set(written) == set(sd1_seed0)
    assert all(torch.equal(written[k], v.to(written[k].dtype)) for k, v in sd1_seed0.items())


def test_another_seed_gives_other_weights(tiny_checkpoints, refiner_seed1):
    with SafetensorsFile(tiny_checkpoints["sdxl-refiner"]) as f:
        seed0 = f.get_tensor("model.diffusion_model.out.2.weight").float()
    assert not torch.equal(refiner_seed1["unet"].state_dict()["conv_out.weight"], seed0)


def test_every_weight_is_random_nonzero_and_exact_in_fp16_and_bf16(sd1_seed0):
    for key, value in sd1_seed0.items():
        if not value.is_floating_point() or EXTRA.match(key):
            continue
        assert value.std() > 0 or value.numel() == 1, key
        assert value.abs().max() < 10, key
        assert torch.equal(value.half().float(), value) and torch.equal(value.bfloat16().float(), value), key
    # ldm zero-initialises these; the tiny model must not, or every output would be zero
    for key in ("model.diffusion_model.out.2.weight", "first_stage_model.decoder.conv_out.weight",
                "model.diffusion_model.input_blocks.1.1.proj_out.weight"):
        assert sd1_seed0[key].std() > 0.01, key


def test_tiny_components_compute_finite_moderate_outputs(refiner_seed1):
    comps = refiner_seed1
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        te = comps["text_encoder_2"](torch.randint(0, 49406, (1, 77), generator=gen), output_hidden_states=True)
        added = {"text_embeds": te.text_embeds, "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 6.0]])}
        eps = comps["unet"](torch.randn(1, 4, 16, 16, generator=gen), 500, te.hidden_states[-2],
                            added_cond_kwargs=added).sample
        image = comps["vae"].decode(torch.randn(1, 4, 8, 8, generator=gen)).sample
    for out in (te.last_hidden_state, eps, image):
        assert torch.isfinite(out).all() and 0.1 < out.std() < 5
