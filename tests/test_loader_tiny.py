"""Tiny real-layout checkpoints load into diffusers/transformers modules that compute exactly what the originals do."""

import shutil

import pytest
import torch

from lib_sdtune.demo.tiny_models import TINY_ARCHITECTURES, build_tiny_components
from lib_sdtune.io.checkpoint import open_checkpoint, source_from_tensors
from lib_sdtune.models.hints import ModelHints
from lib_sdtune.models.loader import load_checkpoint
from lib_sdtune.models.tokenizer import encode_prompts, load_clip_tokenizer
from lib_sdtune.models.vpred import is_v_prediction_unet

EXPECTED_ARCH = {"sd1": "sd1", "sd2": "sd2", "sd2-v": "sd2-v", "sdxl": "sdxl", "sdxl-refiner": "sdxl-refiner"}


@pytest.mark.compat
@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_every_tiny_architecture_loads_with_no_missing_or_unexpected_key(tiny_checkpoints, arch):
    model = load_checkpoint(tiny_checkpoints[arch])
    assert model.arch.architecture == EXPECTED_ARCH[arch]
    assert model.report.missing_keys == [] and model.report.unexpected_keys == []
    assert all(p.device.type == "cpu" for m in model.modules.values() for p in m.parameters())


@pytest.mark.compat
@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_loaded_modules_compute_exactly_what_the_generated_ones_do(tiny_fp32_checkpoints, arch):
    torch.manual_seed(0)
    original = build_tiny_components(arch, seed=0)
    loaded = load_checkpoint(tiny_fp32_checkpoints[arch]).modules
    assert set(loaded) == set(original)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        u0, u1 = original["unet"], loaded["unet"]
        cfg = u1.config
        x = torch.randn(1, cfg.in_channels, 16, 16, generator=gen)
        ctx = torch.randn(1, 7, cfg.cross_attention_dim, generator=gen)
        added = None
        if cfg.addition_embed_type == "text_time":
            n_ids = 5 if arch == "sdxl-refiner" else 6
            pooled = cfg.projection_class_embeddings_input_dim - n_ids * cfg.addition_time_embed_dim
            added = {"text_embeds": torch.randn(1, pooled, generator=gen),
                     "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0][:n_ids]])}
        out0 = u0(x, 500, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
        out1 = u1(x, 500, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
        assert torch.equal(out0, out1)

        img = torch.rand(1, 3, 32, 32, generator=gen) * 2 - 1
        v0, v1 = original["vae"], loaded["vae"]
        lat0, lat1 = v0.encode(img).latent_dist.mean, v1.encode(img).latent_dist.mean
        assert torch.equal(lat0, lat1)
        assert torch.equal(v0.decode(lat0).sample, v1.decode(lat1).sample)
        assert v1.config.scaling_factor == v0.config.scaling_factor

        for name in ("text_encoder", "text_encoder_2"):
            if name not in original:
                continue
            flavour = "open_clip" if (arch.startswith("sd2") or name == "text_encoder_2") else "clip_l"
            ids = encode_prompts(load_clip_tokenizer(flavour), ["a photo of a cat", "sdtdemo shape, red circle"])
            h0 = original[name](ids, output_hidden_states=True)
            h1 = loaded[name](ids, output_hidden_states=True)
            assert torch.equal(h0.hidden_states[-2], h1.hidden_states[-2])
            assert torch.equal(h0[0], h1[0])


def test_sd2_prediction_comes_from_the_yaml_beside_the_file(tiny_checkpoints):
    assert load_checkpoint(tiny_checkpoints["sd2-v"], components=["vae"]).arch.prediction_type == "v_prediction"
    assert load_checkpoint(tiny_checkpoints["sd2"], components=["vae"]).arch.prediction_type == "epsilon"


def test_a_user_flag_overrides_the_yaml(tiny_checkpoints):
    model = load_checkpoint(tiny_checkpoints["sd2-v"], components=["vae"], hints=ModelHints(prediction_type="epsilon"))
    assert model.arch.architecture == "sd2"
    assert model.modules.keys() == {"vae"}


def test_without_yaml_sd2_uses_a1111s_v_test(tiny_checkpoints, tmp_path):
    """No yaml and no flag: A1111's t=999 test decides, on the loaded UNet."""
    bare = tmp_path / "no-yaml-sd2.safetensors"
    shutil.copy(tiny_checkpoints["sd2"], bare)
    src = open_checkpoint(bare)
    tensors = {k: src[k] for k in src}
    prefix = "model.diffusion_model.out.2."
    heads = ModelHints(num_head_channels=8)  # the tiny widths need the yaml's head setting
    for bias, expected in ((-3.0, "v_prediction"), (0.0, "epsilon")):
        tensors[prefix + "weight"] = torch.zeros_like(tensors[prefix + "weight"])
        tensors[prefix + "bias"] = torch.full_like(tensors[prefix + "bias"], bias)
        model = load_checkpoint(source_from_tensors(tensors), hints=heads, components=["vae"])
        assert model.arch.prediction_type == expected
        assert "unet" not in model.modules  # loaded for the test only


def test_v_test_reads_output_minus_input_mean():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=32)
    with torch.no_grad():
        unet.conv_out.weight.zero_()
        unet.conv_out.bias.fill_(-0.6)  # out - x = -1.1 -> v
        assert is_v_prediction_unet(unet)
        unet.conv_out.bias.fill_(-0.4)  # out - x = -0.9 -> eps
        assert not is_v_prediction_unet(unet)


def test_very_old_sd1_text_encoder_keys_without_text_model_load_cleanly(tiny_checkpoints):
    src = open_checkpoint(tiny_checkpoints["sd1"])
    old = "cond_stage_model.transformer.text_model."
    tensors = {k.replace(old, "cond_stage_model.transformer."): src[k] for k in src}
    model = load_checkpoint(source_from_tensors(tensors), components=["text_encoder"])
    assert model.report.missing_keys == [] and model.report.unexpected_keys == []


def test_pickle_checkpoint_loads_like_the_safetensors_one(tiny_checkpoints, tmp_path):
    src = open_checkpoint(tiny_checkpoints["sd1"])
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": {k: src[k] for k in src}, "global_step": 1}, ckpt)
    a = load_checkpoint(ckpt, components=["text_encoder"]).modules["text_encoder"].state_dict()
    b = load_checkpoint(tiny_checkpoints["sd1"], components=["text_encoder"]).modules["text_encoder"].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_checkpoint_keys_are_reported_not_dropped(tiny_checkpoints):
    src = open_checkpoint(tiny_checkpoints["sd1"])
    tensors = {k: src[k] for k in src}
    tensors["model.diffusion_model.input_blocks.1.1.extra_adapter.weight"] = torch.zeros(2)
    tensors["some_other_net.weight"] = torch.zeros(2)
    report = load_checkpoint(source_from_tensors(tensors), components=["unet"]).report
    assert "checkpoint.model.diffusion_model.input_blocks.1.1.extra_adapter.weight" in report.unexpected_keys
    assert "checkpoint.some_other_net.weight" in report.unexpected_keys


def test_a_missing_dependency_is_reported_with_the_install_command(tiny_checkpoints, monkeypatch):
    import sys

    from lib_sdtune.errors import SdtuneError

    monkeypatch.setitem(sys.modules, "accelerate", None)  # makes `import accelerate` raise ImportError
    with pytest.raises(SdtuneError, match="pip install -r requirements.txt"):
        load_checkpoint(tiny_checkpoints["sd1"], components=["vae"])
