"""sdtune's LoRA/LoCon core matches kohya sd-scripts (names, shapes, math, file, metadata) and diffusers'
`load_lora_weights` applies exactly the ΔW sdtune computes, on fp32 tiny checkpoints."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from lib_sdtune.errors import SdtuneError, UnsafeFileError
from lib_sdtune.io.hashes import legacy_hash, precalculate_hashes, safetensors_data_hash
from lib_sdtune.io.safetensors_io import save_safetensors
from lib_sdtune.models.loader import LoadedModel, load_checkpoint
from lib_sdtune.networks.kohya_file import load_lora, save_lora
from lib_sdtune.networks.lora import LoraModule
from lib_sdtune.networks.network import LoraConfig, LoraNetwork

REF = Path(__file__).resolve().parent / "data" / "reference" / "kohya_lora_modules.json"
PLAIN = LoraConfig(rank=4, alpha=2.0)
LOCON = LoraConfig(rank=4, alpha=2.0, conv_rank=2, conv_alpha=3.0)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture()
def load(tiny_fp32_checkpoints):
    """Load a fresh copy of the session's fp32 tiny checkpoint of `arch` (default sd1)."""
    return lambda arch="sd1": load_checkpoint(tiny_fp32_checkpoints[arch])


def _randomise(net: LoraNetwork, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net:
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * 0.1)


def _unet_inputs(model: LoadedModel, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    unet = model.modules["unet"]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, unet.config.in_channels, 16, 16, generator=g)
    ctx = torch.randn(1, 7, unet.config.cross_attention_dim, generator=g)
    return x, torch.tensor([10]), ctx


def _unet_out(model: LoadedModel) -> torch.Tensor:
    with torch.no_grad():
        return model.modules["unet"](*_unet_inputs(model)).sample


def _te_out(model: LoadedModel) -> torch.Tensor:
    ids = torch.tensor([[49406, 320, 1125, 539, 49407]])
    with torch.no_grad():
        return model.modules["text_encoder"](ids).last_hidden_state


@pytest.mark.parametrize("conv", [False, True], ids=["lora", "locon"])
def test_tiny_sd1_network_has_sd_scripts_sd15_name_set_and_lora_shapes(load, conv):
    model = load("sd1")
    config = LOCON if conv else PLAIN
    net = LoraNetwork(model.modules, "sd1", config)
    ref = json.loads(REF.read_text())["sd15_conv" if conv else "sd15"]
    assert set(net.names()) == set(ref)
    assert {n: t.layer_type for n, t in net.targets.items()} == {n: r["type"] for n, r in ref.items()}
    sd = net.state_dict_kohya()
    assert len(sd) == 3 * len(ref)
    for name, t in net.targets.items():
        rank = config.conv_rank if t.uses_conv_dim else config.rank
        down, up = t.lora_shapes(rank)
        assert tuple(sd[f"{name}.lora_down.weight"].shape) == down
        assert tuple(sd[f"{name}.lora_up.weight"].shape) == up
        assert sd[f"{name}.alpha"].shape == () and sd[f"{name}.alpha"].dtype == torch.float32
        assert float(sd[f"{name}.alpha"]) == (config.effective_conv_alpha if t.uses_conv_dim else config.alpha)
    assert any(t.uses_conv_dim for t in net.targets.values()) == conv


def test_zero_up_is_noop_random_up_changes_output_and_remove_restores_bit_identical(load):
    model = load("sd1")
    base_unet, base_te = _unet_out(model), _te_out(model)
    net = LoraNetwork(model.modules, "sd1", LOCON)
    net.apply_to()
    assert torch.equal(_unet_out(model), base_unet) and torch.equal(_te_out(model), base_te)
    _randomise(net)
    assert (_unet_out(model) - base_unet).abs().max() > 1e-3
    assert (_te_out(model) - base_te).abs().max() > 1e-3
    net.remove()
    assert torch.equal(_unet_out(model), base_unet) and torch.equal(_te_out(model), base_te)
    assert all("forward" not in net.lora(n).org_module.__dict__ for n in net.names())
    assert not any(k.startswith("lora") for k in model.modules["unet"].state_dict())


def test_delta_weight_is_multiplier_scale_up_down_and_module_forward_matches_it():
    lin, conv = torch.nn.Linear(8, 6), torch.nn.Conv2d(5, 7, 3, padding=1)
    for layer, x in ((lin, torch.randn(2, 8)), (conv, torch.randn(2, 5, 9, 9))):
        m = LoraModule("t", layer, rank=3, alpha=1.5, multiplier=0.7)
        torch.nn.init.normal_(m.lora_up.weight)
        up, down = m.lora_up.weight.detach(), m.lora_down.weight.detach()
        expected = 0.7 * 0.5 * (up.flatten(1) @ down.flatten(1)).reshape(layer.weight.shape)
        assert torch.allclose(m.delta_weight(), expected)
        base = layer(x).detach()
        m.apply()
        fn = torch.nn.functional.linear if layer is lin else functools.partial(torch.nn.functional.conv2d, padding=1)
        assert torch.allclose(layer(x) - base, fn(x, m.delta_weight()), atol=1e-5)
        m.remove()
        assert torch.equal(layer(x), base)


def test_merge_into_weights_equals_hooked_forward_linear_and_3x3_conv(load):
    model = load("sd1")
    net = LoraNetwork(model.modules, "sd1", LOCON)
    _randomise(net)
    assert any(t.uses_conv_dim for t in net.targets.values())
    net.apply_to()
    hooked_unet, hooked_te = _unet_out(model), _te_out(model)
    net.remove()
    net.merge_into_weights()
    assert (_unet_out(model) - hooked_unet).abs().max() < 1e-5
    assert (_te_out(model) - hooked_te).abs().max() < 1e-5
    net.unmerge_from_weights()


def _diffusers_fused_deltas(load, arch: str, config: LoraConfig, tmp_path: Path,
                            dtype: torch.dtype = torch.float32) -> tuple[LoraNetwork, dict, dict]:
    """Save our LoRA (in `dtype`), load it with diffusers' load_lora_weights into a pipeline of fresh modules, fuse.

    The returned network holds the saved (rounded) weights, so its deltas are what the file means."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    from lib_sdtune.models.tokenizer import load_clip_tokenizer

    ours = load(arch)
    net = LoraNetwork(ours.modules, ours.arch.family, config)
    _randomise(net)
    path = save_lora(net, tmp_path / "ours.safetensors", dtype=dtype)
    net.load_kohya_state_dict(load_lora(path)[0])
    fresh = load(arch)
    mods = fresh.modules
    layers = {n: mods[t.component].get_submodule(t.module_path) for n, t in net.targets.items()}
    before = {n: layer.weight.detach().clone() for n, layer in layers.items()}
    common = dict(vae=mods["vae"], text_encoder=mods["text_encoder"], tokenizer=load_clip_tokenizer("clip_l"),
                  unet=mods["unet"], scheduler=DDPMScheduler(**fresh.scheduler_config))
    if arch == "sdxl":
        pipe = StableDiffusionXLPipeline(text_encoder_2=mods["text_encoder_2"],
                                         tokenizer_2=load_clip_tokenizer("open_clip"), **common)
    else:
        pipe = StableDiffusionPipeline(safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                                       **common)
    pipe.load_lora_weights(str(path), adapter_name="sdtune")
    # peft replaces each targeted layer by a wrapper holding it as `base_layer`: look the layers up again
    layers = {n: mods[t.component].get_submodule(t.module_path) for n, t in net.targets.items()}
    injected = {n for n, layer in layers.items() if hasattr(layer, "lora_A")}
    assert injected == set(layers), f"diffusers dropped {sorted(set(layers) - injected)[:5]}"
    pipe.fuse_lora(components=[c for c in ("unet", "text_encoder", "text_encoder_2") if c in mods], lora_scale=1.0)
    fused = {n: getattr(layer, "base_layer", layer).weight.detach() - before[n] for n, layer in layers.items()}
    return net, fused, {n: t.component for n, t in net.targets.items()}


@pytest.mark.parametrize("config", [PLAIN, LOCON], ids=["lora", "locon"])
def test_diffusers_load_lora_weights_applies_exactly_our_delta_weight_sd1(load, config, tmp_path):
    net, fused, components = _diffusers_fused_deltas(load, "sd1", config, tmp_path)
    assert set(components.values()) == {"unet", "text_encoder"}
    for name, delta in fused.items():
        assert (delta - net.lora(name).delta_weight()).abs().max() < 1e-5, name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_diffusers_applies_our_fp16_bf16_files_with_per_block_ranks_exactly(load, dtype, tmp_path):
    """Half-precision files (alpha exact) and sd-scripts' block_dims (a different rank per block) load as saved."""
    dims = ",".join(["2"] * 6 + ["8"] * 6 + ["0"] + ["4"] * 12)
    config = LoraConfig(rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0, block_dims=dims)
    net, fused, _ = _diffusers_fused_deltas(load, "sd1", config, tmp_path, dtype=dtype)
    assert {net.lora(n).rank for n in net.names("unet")} == {2, 4, 8}
    assert net.skipped and not set(net.skipped) & set(fused)
    for name, delta in fused.items():
        assert (delta - net.lora(name).delta_weight()).abs().max() < 1e-5, name


def test_diffusers_applies_exactly_our_delta_on_sd2_whose_openclip_text_encoder_is_fused_in_the_file(load, tmp_path):
    """SD2's text encoder is OpenCLIP (fused q/k/v in the checkpoint); LoRA names target the split layers."""
    net, fused, components = _diffusers_fused_deltas(load, "sd2-v", PLAIN, tmp_path)
    assert set(components.values()) == {"unet", "text_encoder"}
    for name, delta in fused.items():
        assert (delta - net.lora(name).delta_weight()).abs().max() < 1e-5, name


@pytest.mark.slow
def test_diffusers_sdxl_pipeline_loads_our_sgm_named_lora_with_exact_deltas(load, tmp_path):
    net, fused, components = _diffusers_fused_deltas(load, "sdxl", LOCON, tmp_path)
    assert set(components.values()) == {"unet", "text_encoder", "text_encoder_2"}
    for name, delta in fused.items():
        assert (delta - net.lora(name).delta_weight()).abs().max() < 1e-5, name


def test_sdxl_names_use_te1_te2_and_sgm_unet_blocks(load):
    model = load("sdxl")
    net = LoraNetwork(model.modules, "sdxl", LOCON)
    names = net.names()
    assert all(n.startswith(("lora_te1_text_model_", "lora_te2_text_model_", "lora_unet_")) for n in names)
    assert any(n.startswith("lora_te1_") for n in names) and any(n.startswith("lora_te2_") for n in names)
    assert any(n.startswith("lora_unet_input_blocks_") for n in names)
    assert not any("down_blocks" in n for n in names)
    ref = set(json.loads(REF.read_text())["sdxl_base_conv"])
    assert set(names) <= ref


def test_metadata_ss_keys_alpha_and_hashes_as_sd_scripts_writes_them(load, tmp_path):
    model = load("sd1")
    net = LoraNetwork(model.modules, "sd1", LOCON)
    _randomise(net)
    path = save_lora(net, tmp_path / "meta.safetensors", {"ss_training_comment": "hi"}, dtype=torch.float16)
    sd, meta = load_lora(path)
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4" and float(meta["ss_network_alpha"]) == 2.0
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "3.0"}
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["ss_output_name"] == "meta" and meta["ss_training_comment"] == "hi"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.implementation"] == "diffusers" and meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["sshs_model_hash"] == safetensors_data_hash(path)
    # fp16 file: tensors and (exactly representable) alpha in fp16, like sd-scripts' save_weights
    assert {t.dtype for t in sd.values()} == {torch.float16}
    only_ss = tmp_path / "only_ss.safetensors"
    save_safetensors(sd, only_ss, {k: v for k, v in meta.items() if k.startswith("ss_")})
    assert meta["sshs_legacy_hash"] == legacy_hash(only_ss)


def test_precalculated_hashes_equal_safetensors_serialisation_over_one_mib():
    from safetensors.torch import save

    g = torch.Generator().manual_seed(1)
    tensors = {"b.alpha": torch.tensor(3.0), "a.lora_down.weight": torch.randn(300, 600, generator=g).half(),
               "c.lora_up.weight": torch.randn(700, 300, generator=g)}
    meta = {"ss_network_dim": "4", "modelspec.title": "x"}
    raw = save(tensors, {"ss_network_dim": "4"})
    import hashlib

    n = int.from_bytes(raw[:8], "little")
    expected = (hashlib.sha256(raw[8 + n:]).hexdigest(), hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8])
    assert precalculate_hashes(tensors, meta) == expected


def test_alpha_other_than_rank_gives_alpha_over_rank_scale_after_reload(load, tmp_path):
    model = load("sd1")
    config = LoraConfig(rank=4, alpha=1.0, conv_rank=2, conv_alpha=0.5)
    net = LoraNetwork(model.modules, "sd1", config)
    _randomise(net)
    path = save_lora(net, tmp_path / "a.safetensors", dtype=torch.float32)
    sd, _ = load_lora(path)
    again = LoraNetwork(load("sd1").modules, "sd1", LoraConfig(rank=4, alpha=4.0, conv_rank=2, conv_alpha=2.0))
    assert again.load_kohya_state_dict(sd) == []
    for name in net.names():
        a, b = net.lora(name), again.lora(name)
        assert b.scale == a.scale == 0.25  # 1/4 (linear, 1x1) and 0.5/2 (3x3)
        assert torch.equal(b.delta_weight(), a.delta_weight())


def test_alpha_not_exact_in_fp16_is_kept_fp32_and_missing_alpha_means_rank(load):
    model = load("sd1")
    net = LoraNetwork(model.modules, "sd1", LoraConfig(rank=4, alpha=0.3, train_unet=False))
    sd = net.state_dict_kohya(torch.float16)
    alphas = {v.dtype for k, v in sd.items() if k.endswith(".alpha")}
    assert alphas == {torch.float32}
    assert all(torch.equal(v, torch.tensor(0.3)) for k, v in sd.items() if k.endswith(".alpha"))
    no_alpha = {k: v for k, v in sd.items() if not k.endswith(".alpha")}
    net.load_kohya_state_dict(no_alpha)
    assert all(m.alpha == 4.0 and m.scale == 1.0 for m in net)
    with pytest.raises(SdtuneError):
        net.load_kohya_state_dict({**no_alpha, "lora_unet_nope.lora_down.weight": torch.zeros(1)})


def test_load_lora_refuses_pickled_files(tmp_path):
    pt = tmp_path / "x.pt"
    torch.save({"a": torch.zeros(1)}, pt)
    with pytest.raises(UnsafeFileError):
        load_lora(pt)
    disguised = tmp_path / "y.safetensors"
    disguised.write_bytes(pt.read_bytes())
    with pytest.raises(UnsafeFileError):
        load_lora(disguised)


@pytest.mark.parametrize("family, v_pred, version, v2, arch, impl, reso", [
    ("sd1", False, "sd_v1", "False", "stable-diffusion-v1/lora", "diffusers", "512x512"),
    ("sd2", False, "sd_v2", "True", "stable-diffusion-v2-512/lora", "diffusers", "512x512"),
    ("sd2", True, "sd_v2_v", "True", "stable-diffusion-v2-768-v/lora", "diffusers", "768x768"),
    ("sdxl", False, "sdxl_base_v1-0", "False", "stable-diffusion-xl-v1-base/lora",
     "https://github.com/Stability-AI/generative-models", "1024x1024"),
])
def test_base_model_version_and_modelspec_per_family_as_sd_scripts(family, v_pred, version, v2, arch, impl, reso):
    from types import SimpleNamespace

    from lib_sdtune.networks.kohya_file import lora_metadata

    fake = SimpleNamespace(family=family, config=PLAIN)
    meta = lora_metadata(fake, "out", v_pred=v_pred, timestamp=0)  # type: ignore[arg-type]
    assert (meta["ss_base_model_version"], meta["ss_v2"]) == (version, v2)
    assert (meta["modelspec.architecture"], meta["modelspec.implementation"]) == (arch, impl)
    assert meta["modelspec.resolution"] == reso
    assert meta["modelspec.prediction_type"] == ("v" if v_pred else "epsilon")
    assert "ss_network_args" not in meta  # sd-scripts writes it only when network args were given
