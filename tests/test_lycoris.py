"""LoHa, LoKr and DoRA networks: sd-scripts' names, exact removal, merge == forward, LyCORIS's keys, and
lycoris-lora's own loader (`create_lycoris_from_weights`) applying exactly the ΔW sdtune computes."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

from lib_sdtune.errors import SdtuneError
from lib_sdtune.models.loader import LoadedModel, load_checkpoint
from lib_sdtune.networks.kohya_file import load_lora, save_lora
from lib_sdtune.networks.lora_info import inspect_lora
from lib_sdtune.networks.lycoris import LycorisModule
from lib_sdtune.networks.network import LoraConfig, LoraNetwork

REF = Path(__file__).resolve().parent / "data" / "reference" / "kohya_lora_modules.json"
# alpha != rank everywhere, so a double-applied scale would show; lokr rank 4 mixes full and low-rank w2
CONFIGS = {
    "loha": LoraConfig(rank=4, alpha=2.0, algorithm="loha"),
    "lokr": LoraConfig(rank=4, alpha=8.0, algorithm="lokr"),
    "dora": LoraConfig(rank=4, alpha=2.0, algorithm="dora"),
    "loha_conv": LoraConfig(rank=4, alpha=2.0, conv_rank=2, conv_alpha=3.0, algorithm="loha"),
    "lokr_conv": LoraConfig(rank=4, alpha=8.0, conv_rank=2, conv_alpha=3.0, algorithm="lokr", factor=4),
}
# Tucker-decomposed 3x3 convs (lora_mid / hada_t1,t2 / lokr_t2) and full diffs (diff, diff_b)
EXTRA = {
    "locon_tucker": LoraConfig(rank=4, alpha=2.0, conv_rank=3, conv_alpha=1.0, use_tucker=True),
    "loha_tucker": LoraConfig(rank=4, alpha=2.0, conv_rank=3, conv_alpha=5.0, algorithm="loha", use_tucker=True),
    "lokr_tucker": LoraConfig(rank=2, alpha=3.0, conv_rank=2, conv_alpha=3.0, algorithm="lokr", factor=4,
                              use_tucker=True),
    "full": LoraConfig(algorithm="full", conv_rank=1),
}
TUCKER_PARTS = {"locon_tucker": "lora_mid.weight", "loha_tucker": "hada_t1", "lokr_tucker": "lokr_t2"}
SUFFIXES = {"loha": {"alpha", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},
            "lokr": {"alpha", "lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b"},
            "dora": {"alpha", "lora_down.weight", "lora_up.weight", "dora_scale"}}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture()
def load(tiny_fp32_checkpoints):
    """Load a fresh copy of the session's fp32 tiny checkpoint of `arch` (default sd1)."""
    return lambda arch="sd1": load_checkpoint(tiny_fp32_checkpoints[arch])


def _config(key: str) -> LoraConfig:
    return dataclasses.replace({**CONFIGS, **EXTRA}[key])  # a copy: set_multiplier writes into the config


def _network(model: LoadedModel, key: str, seed: int = 0) -> LoraNetwork:
    """A network with every factor random (a fresh one is a no-op: one factor starts at zero)."""
    net = LoraNetwork(model.modules, "sd1", _config(key))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net:
            for name, p in (m.lyco if hasattr(m, "lyco") else m).named_parameters():
                noise = torch.randn(p.shape, generator=g)
                p.copy_(p * (1 + 0.1 * noise) if name == "dora_scale" else noise * 0.2)
    return net


def _unet_out(model: LoadedModel) -> torch.Tensor:
    unet = model.modules["unet"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, unet.config.in_channels, 16, 16, generator=g)
    ctx = torch.randn(1, 7, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10]), ctx).sample


def _te_out(model: LoadedModel) -> torch.Tensor:
    with torch.no_grad():
        return model.modules["text_encoder"](torch.tensor([[49406, 320, 1125, 539, 49407]])).last_hidden_state


def _outputs(model: LoadedModel) -> tuple[torch.Tensor, torch.Tensor]:
    return _unet_out(model), _te_out(model)


@pytest.mark.parametrize("key", list(CONFIGS))
def test_names_are_sd_scripts_sd15_set_and_keys_are_lycoris(load, key):
    net = _network(load(), key)
    ref = json.loads(REF.read_text())["sd15_conv" if "conv" in key else "sd15"]
    assert set(net.names()) == set(ref)
    sd = net.state_dict_kohya(torch.float16)
    algo = key.split("_")[0]
    assert {k.partition(".")[2] for k in sd} <= SUFFIXES[algo]
    per_module = Counter(k.partition(".")[0] for k in sd)
    assert set(per_module) == set(ref)
    assert set(per_module.values()) == ({3, 4} if algo == "lokr" else {len(SUFFIXES[algo])})
    assert all(sd[f"{n}.alpha"].dim() == 0 for n in ref)
    if algo == "lokr":  # both halves full -> alpha is rank (scale 1), as LyCORIS saves it
        full = [n for n in ref if f"{n}.lokr_w2" in sd]
        assert full and all(float(sd[f"{n}.alpha"]) == 4.0 for n in full)


@pytest.mark.parametrize("key", ["loha", "lokr_conv", "dora"])
def test_apply_remove_is_bit_identical_and_merge_equals_forward(load, key):
    model = load()
    base = _outputs(model)
    weights = {k: v.clone() for c in ("unet", "text_encoder") for k, v in model.modules[c].state_dict().items()}
    net = _network(model, key)
    net.apply_to()
    hooked = _outputs(model)
    assert (hooked[0] - base[0]).abs().max() > 1e-3  # the adapters do something
    net.remove()
    assert all(torch.equal(a, b) for a, b in zip(_outputs(model), base))
    layers = [m.org_module for m in net]
    assert not any("forward" in layer.__dict__ for layer in layers)
    net.merge_into_weights()  # merged, unhooked == hooked
    merged = _outputs(model)
    for a, b in zip(merged, hooked):
        assert (a - b).abs().max() < 1e-5
    net.apply_to()  # merged + hooked: the hook passes through
    assert all((a - b).abs().max() < 1e-5 for a, b in zip(_outputs(model), hooked))
    net.remove()
    net.unmerge_from_weights()
    after = {k: v for c in ("unet", "text_encoder") for k, v in model.modules[c].state_dict().items()}
    assert max((after[k] - w).abs().max().item() for k, w in weights.items()) < 1e-5


def _lycoris_load(path: Path, model: LoadedModel):
    """lycoris-lora's own loader on the U-Net (prefix lora_unet) and the text encoder (lora_te, text_model.)."""
    from lycoris import LycorisNetwork, create_lycoris_from_weights

    te = model.modules["text_encoder"]
    holder = te
    if not hasattr(te, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel: put text_model back
        holder = nn.Module()
        holder.text_model = te
    prefix = LycorisNetwork.LORA_PREFIX  # class-level, process-global: set per call, put back after
    nets = []
    try:
        for lora_prefix, module in (("lora_unet", model.modules["unet"]), ("lora_te", holder)):
            LycorisNetwork.apply_preset({"lora_prefix": lora_prefix})
            nets.append(create_lycoris_from_weights(1.0, str(path), module)[0])
    finally:
        LycorisNetwork.apply_preset({"lora_prefix": prefix})
    return nets


@pytest.mark.parametrize("key", [*CONFIGS, *EXTRA])
def test_lycoris_loader_applies_the_delta_sdtune_computes(load, key, tmp_path):
    ours_model = load()
    net = _network(ours_model, key, seed=1)
    path = save_lora(net, tmp_path / f"{key}.safetensors", dtype=torch.float32)
    if key == "lokr_tucker":
        # lycoris-lora 4.1.3's loader cannot read Tucker LoKr files (make_module_from_state_dict takes the rank
        # from lokr_w2_a.size(1), the output size under Tucker); check against its module math instead
        net.eval()
        for m in net:
            with torch.no_grad():
                theirs = m.lyco.get_weight(tuple(m.org_module.weight.shape))
            assert (theirs - m.raw_delta()).abs().max() < 1e-5, m.lora_name
        assert any(k.endswith("lokr_t2") for k in load_lora(path)[0])
        return
    net.apply_to()
    ours = _outputs(ours_model)

    theirs_model = load()
    nets = _lycoris_load(path, theirs_model)
    loaded = {m.lora_name: m for n in nets for m in n.loras}
    assert set(loaded) == set(net.names())
    # per layer: lycoris' forward delta on a random input == op(x, sdtune's delta_weight())
    g = torch.Generator().manual_seed(2)
    for name, lm in loaded.items():
        layer = lm.org_module[0]
        shape = (2, layer.in_features) if isinstance(layer, nn.Linear) else (1, layer.in_channels, 8, 8)
        x = torch.randn(shape, generator=g)
        ours_m = net.lora(name)
        bias = ours_m.delta_bias() if hasattr(ours_m, "delta_bias") else None
        with torch.no_grad():
            theirs_delta = lm(x) - layer(x)
            ours_delta = lm.op(x, ours_m.delta_weight(), bias, **lm.kw_dict)
        assert (theirs_delta - ours_delta).abs().max() < 1e-5, name
    for n in nets:
        n.apply_to()
    for a, b in zip(_outputs(theirs_model), ours):
        assert (a - b).abs().max() < 1e-5
    sd, meta = load_lora(path)
    if key in TUCKER_PARTS:  # the decomposition really is in the file, and lora info sees through it
        assert any(k.endswith(TUCKER_PARTS[key]) for k in sd)
        assert json.loads(meta["ss_network_args"])["use_tucker"] == "True"
    if key == "full":
        assert {k.partition(".")[2] for k in sd} == {"diff", "diff_b"} and "alpha" not in str(sd.keys())
    info = inspect_lora(path)
    assert info.algorithm == {"locon_tucker": "locon", "dora": "lora"}.get(key, key.split("_")[0])


@pytest.mark.parametrize("key", ["locon_tucker", "full"])
def test_tucker_and_full_merge_equals_forward_and_remove_is_exact(load, key):
    model = load()
    base = _outputs(model)
    net = _network(model, key)
    net.apply_to()
    hooked = _outputs(model)
    assert (hooked[0] - base[0]).abs().max() > 1e-3
    net.remove()
    assert all(torch.equal(a, b) for a, b in zip(_outputs(model), base))
    net.merge_into_weights()
    assert all((a - b).abs().max() < 1e-5 for a, b in zip(_outputs(model), hooked))
    fresh = LoraNetwork(load().modules, "sd1", _config(key))
    assert fresh.load_kohya_state_dict(net.state_dict_kohya(torch.float32)) == []


@pytest.mark.parametrize("key", ["loha", "lokr_conv", "dora"])
def test_file_metadata_reload_and_lora_info(load, key, tmp_path):
    model = load()
    net = _network(model, key)
    cfg = net.config
    path = save_lora(net, tmp_path / f"{key}.safetensors", dtype=torch.float32)
    sd, meta = load_lora(path)
    assert meta["ss_network_module"] == "lycoris.kohya"
    args = json.loads(meta["ss_network_args"])
    assert args["algo"] == cfg.algorithm and args.get("dora_wd") == ("True" if cfg.weight_decompose else None)
    if cfg.conv_rank:
        assert args["conv_dim"] == "2" and args["conv_alpha"] == "3.0" and args["factor"] == "4"
    fresh = LoraNetwork(load().modules, "sd1", _config(key))
    assert fresh.load_kohya_state_dict(sd) == []
    again = fresh.state_dict_kohya(torch.float32)
    assert set(again) == set(sd) and all(torch.equal(again[k], sd[k]) for k in sd)
    info = inspect_lora(path)
    assert info.algorithm == key.split("_")[0].replace("dora", "lora")
    assert info.dora == cfg.weight_decompose and info.unet_modules + info.te_modules == len(net.names())
    if cfg.algorithm != "lokr":  # lokr: see test_lora_info_lokr_rank
        assert info.rank == cfg.rank and info.alpha == cfg.alpha


def test_lora_info_lokr_rank(load, tmp_path):
    net = _network(load(), "lokr")
    info = inspect_lora(save_lora(net, tmp_path / "lokr.safetensors"))
    assert info.algorithm == "lokr" and info.rank == 4


def test_loading_refuses_other_algorithms_and_bad_configs(load):
    model = load()
    loha = _network(model, "loha").state_dict_kohya()
    lokr = LoraNetwork(load().modules, "sd1", _config("lokr"))
    with pytest.raises(SdtuneError, match="algorithm"):
        lokr.load_kohya_state_dict(loha)
    with pytest.raises(SdtuneError, match="unknown network algorithm"):
        LoraConfig(algorithm="glora")
    with pytest.raises(SdtuneError, match="DoRA or Tucker only"):
        LycorisModule("x", nn.Linear(4, 4), "lora", 2)
    assert LoraConfig(algorithm="dora").weight_decompose and not LoraConfig().is_lycoris


@pytest.mark.parametrize("algorithm", ["loha", "lokr", "dora"])
def test_fp16_model_trains(algorithm, tiny_checkpoints):
    model = load_checkpoint(tiny_checkpoints["sd1"])
    unet = model.modules["unet"]
    net = LoraNetwork(model.modules, "sd1", LoraConfig(rank=4, alpha=2.0, conv_rank=2, algorithm=algorithm))
    net.apply_to()
    x = torch.randn(1, unet.config.in_channels, 16, 16, dtype=torch.float16)
    ctx = torch.randn(1, 7, unet.config.cross_attention_dim, dtype=torch.float16)
    out = unet(x, torch.tensor([10]), ctx).sample
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    out.float().pow(2).mean().backward()
    unet_modules = [net.lora(n) for n in net.names("unet")]
    assert all(any(p.grad is not None for p in m.parameters()) for m in unet_modules)
    net.remove()
