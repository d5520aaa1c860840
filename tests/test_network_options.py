"""sd-scripts' network options: per-block ranks and LR weights, dropouts, LoRA+, max-norm and `network_args`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from lib_sdtune.errors import SdtuneError
from lib_sdtune.models.loader import load_checkpoint
from lib_sdtune.networks.blocks import block_count, block_index, block_lr_weights
from lib_sdtune.networks.config import LoraConfig, from_network_args
from lib_sdtune.networks.kohya_file import load_lora, save_lora
from lib_sdtune.networks.lora import LoraModule
from lib_sdtune.networks.max_norm import apply_max_norm
from lib_sdtune.networks.network import LoraNetwork
from lib_sdtune.networks.param_groups import optimizer_param_groups

REF = json.loads((Path(__file__).resolve().parent / "data" / "reference" / "kohya_lora_modules.json").read_text())


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture()
def load(tiny_fp32_checkpoints):
    return lambda arch="sd1": load_checkpoint(tiny_fp32_checkpoints[arch])


# ---- blocks --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, family, index", [
    ("lora_unet_down_blocks_0_attentions_0_proj_in", "sd1", 1),
    ("lora_unet_down_blocks_0_resnets_1_conv1", "sd1", 2),
    ("lora_unet_down_blocks_0_downsamplers_0_conv", "sd1", 3),
    ("lora_unet_down_blocks_3_resnets_1_conv2", "sd1", 11),
    ("lora_unet_mid_block_attentions_0_proj_in", "sd1", 12),
    ("lora_unet_up_blocks_0_resnets_2_conv1", "sd1", 15),
    ("lora_unet_up_blocks_0_upsamplers_0_conv", "sd1", 15),
    ("lora_unet_up_blocks_3_attentions_2_proj_out", "sd2", 24),
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "sdxl", 5),
    ("lora_unet_middle_block_1_proj_in", "sdxl", 11),
    ("lora_unet_output_blocks_8_0_skip_connection", "sdxl", 21),
    ("lora_te1_text_model_encoder_layers_0_mlp_fc1", "sdxl", -1),
])
def test_block_index_is_sd_scripts_get_block_index(name, family, index):
    assert block_index(name, family) == index


@pytest.mark.parametrize("ref, family, unused", [("sd15_conv", "sd1", {0}), ("sd21_conv", "sd2", {0}),
                                                 ("sdxl_base_conv", "sdxl", {0, 1, 22})])
def test_every_reference_unet_module_has_a_block_and_only_sd_scripts_unused_blocks_are_empty(ref, family, unused):
    indices = {block_index(n, family) for n in REF[ref] if n.startswith("lora_unet_")}
    assert indices == set(range(block_count(family))) - unused


def test_block_lr_weight_curves_padding_and_zero_threshold():
    cos = block_lr_weights("sd1", down="cosine+0.5")
    assert len(cos) == 25
    assert cos[:12] == pytest.approx([math.sin(math.pi * (i / 11) / 2) + 0.5 for i in reversed(range(12))])
    assert cos[12:] == [1.0] * 13
    w = block_lr_weights("sdxl", down="0.1,0.5", mid="0,1,1", up="zeros", zero_threshold=0.2)
    assert len(w) == 23 and w[0] == 1.0 and w[-1] == 1.0
    assert w[1:10] == [0.0, 0.5] + [1.0] * 7 and w[10:13] == [0.0, 1.0, 1.0] and w[13:22] == [0.0] * 9
    assert block_lr_weights("sd1") is None
    with pytest.raises(SdtuneError, match="up_lr_weight"):
        block_lr_weights("sd1", up="wavy")


def test_block_dims_give_each_unet_block_its_rank_and_rank_zero_drops_the_block(load):
    dims = [4] * 25
    dims[1], dims[12], dims[24] = 2, 0, 8
    alphas = ",".join(["1"] * 24 + ["3"])
    net = LoraNetwork(load().modules, "sd1", LoraConfig(rank=4, alpha=2.0, block_dims=",".join(map(str, dims)),
                                                        block_alphas=alphas))
    unet = net.names("unet")
    assert all(block_index(n, "sd1") != 12 for n in unet)
    assert {n for n in REF["sd15"] if block_index(n, "sd1") == 12} == set(net.skipped)
    assert set(unet) | set(net.skipped) == {n for n in REF["sd15"] if n.startswith("lora_unet_")}
    for n in unet:
        m = net.lora(n)
        i = block_index(n, "sd1")
        assert (m.rank, m.alpha) == (dims[i], 3.0 if i == 24 else 1.0), n
    assert all(net.lora(n).rank == 4 and net.lora(n).alpha == 2.0 for n in net.names("text_encoder"))
    with pytest.raises(SdtuneError, match="block_dims needs 25 values"):
        LoraNetwork(load().modules, "sd1", LoraConfig(block_dims="4,4"))


def test_conv_block_dims_wrap_3x3_convs_per_block_and_lr_weight_zero_removes_modules(load):
    conv_dims = ",".join(["2"] * 13 + ["0"] * 12)  # convs only in down blocks and mid
    net = LoraNetwork(load().modules, "sd1", LoraConfig(rank=4, conv_block_dims=conv_dims, up_lr_weight="zeros"))
    unet = set(net.names("unet"))
    assert unet and all(block_index(n, "sd1") <= 12 for n in unet)  # up blocks: LR weight 0 -> no module
    extra = {n for n in set(REF["sd15_conv"]) - set(REF["sd15"]) if block_index(n, "sd1") <= 12}
    assert extra <= unet  # ResNet/sampler layers of the down and mid blocks
    assert any(net.targets[n].uses_conv_dim for n in extra)
    for n in extra:  # 3x3 convs: conv_block_dims (alpha 1 by default); time_emb_proj/1x1 shortcuts: network_dim
        assert net.lora(n).rank == (2 if net.targets[n].uses_conv_dim else 4), n


# ---- network_args --------------------------------------------------------------------------------------

def test_network_args_parse_like_sd_scripts_and_round_trip_into_ss_network_args():
    cfg = from_network_args(16, 8, ["conv_dim=4", "conv_alpha=2", "rank_dropout=0.1", "module_dropout=0.05",
                                    "down_lr_weight=cosine", "loraplus_lr_ratio=16"], dropout=0.1)
    assert (cfg.rank, cfg.alpha, cfg.conv_rank, cfg.conv_alpha, cfg.dropout) == (16, 8.0, 4, 2.0, 0.1)
    assert (cfg.rank_dropout, cfg.module_dropout, cfg.loraplus_lr_ratio) == (0.1, 0.05, 16.0)
    assert from_network_args(16, 8, cfg.network_args(), dropout=0.1) == cfg
    lyco = from_network_args(8, 4, {"algo": "loha", "conv_dim": "4", "use_tucker": "True"})
    assert lyco.algorithm == "loha" and lyco.use_tucker and lyco.network_module == "lycoris.kohya"
    assert lyco.network_args() == {"algo": "loha", "conv_alpha": "1.0", "conv_dim": "4", "use_tucker": "True"}
    assert from_network_args(None, None) == LoraConfig(rank=4, alpha=1.0)  # sd-scripts' defaults
    dora = from_network_args(4, 1, ["algo=locon", "dora_wd=true", "wd_on_output=True"])
    assert dora.weight_decompose and dora.algorithm == "lora"
    for bad, match in (("unknown_key=1", "unknown key 'unknown_key'"), ("preset=full", "preset"),
                       ("wd_on_output=False", "wd_on_output"), ("conv_dim=abc", "conv_dim"),
                       ("rank_dropout=1.5", "rank_dropout"), ("algo=glora", "glora"), ("dora_wd", "key=value")):
        with pytest.raises(SdtuneError, match=match):
            from_network_args(4, 1, [bad])


def test_saved_file_records_network_args_and_dropout(load, tmp_path):
    cfg = from_network_args(4, 2, ["conv_dim=2", "rank_dropout=0.25"], dropout=0.1)
    _, meta = load_lora(save_lora(LoraNetwork(load().modules, "sd1", cfg), tmp_path / "d.safetensors"))
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0", "rank_dropout": "0.25"}
    assert meta["ss_network_dropout"] == "0.1" and meta["ss_network_module"] == "networks.lora"


# ---- dropouts ------------------------------------------------------------------------------------------

def _sd_scripts_forward(m: LoraModule, x: torch.Tensor, p: float, rank_p: float, module_p: float) -> torch.Tensor:
    """sd-scripts' `LoRAModule.forward` in training mode, written out."""
    org = nn.functional.linear(x, m.org_module.weight, m.org_module.bias)
    if torch.rand(1) < module_p:
        return org
    lx = nn.functional.dropout(m.lora_down(x), p=p)
    mask = torch.rand((lx.size(0), m.rank)) > rank_p
    lx = lx * (mask.unsqueeze(1) if lx.dim() == 3 else mask)
    return org + m.lora_up(lx) * m.multiplier * m.scale / (1.0 - rank_p)


@pytest.mark.parametrize("shape", [(3, 8), (3, 5, 8)], ids=["unet", "text_encoder"])
def test_dropouts_follow_sd_scripts_in_training_and_vanish_in_eval(shape):
    layer = nn.Linear(8, 6)
    m = LoraModule("x", layer, rank=4, alpha=2.0, dropout=0.3, rank_dropout=0.5, module_dropout=0.2)
    nn.init.normal_(m.lora_up.weight)
    m.apply()
    x = torch.randn(shape)
    with torch.no_grad():
        for seed in range(8):  # some seeds drop the whole module, others not
            torch.manual_seed(seed)
            ours = layer(x)
            torch.manual_seed(seed)
            assert torch.allclose(ours, _sd_scripts_forward(m, x, 0.3, 0.5, 0.2), atol=1e-6)
        m.eval()
        plain = nn.functional.linear(x, layer.weight, layer.bias)
        assert torch.allclose(layer(x), plain + m.lora_forward(x), atol=1e-6)
        assert torch.allclose(m.lora_forward(x), nn.functional.linear(x, m.delta_weight()), atol=1e-6)


# ---- LoRA+ and block learning rates --------------------------------------------------------------------

def test_param_groups_separate_te_unet_loraplus_and_skip_lr_zero(load):
    net = LoraNetwork(load().modules, "sd1", LoraConfig(rank=2, loraplus_unet_lr_ratio=16))
    pg = optimizer_param_groups(net, text_encoder_lr=5e-5, unet_lr=1e-4, default_lr=1e-3)
    assert pg.descriptions == ["textencoder", "unet", "unet plus"]
    assert [g["lr"] for g in pg.groups] == [5e-5, 1e-4, 1e-4 * 16]
    ups = {id(net.lora(n).lora_up.weight) for n in net.names("unet")}
    assert {id(p) for p in pg.groups[2]["params"]} == ups
    assert len(pg.groups[1]["params"]) == len(ups)  # the lora_down weights
    no_te = optimizer_param_groups(net, text_encoder_lr=0, unet_lr=None, default_lr=1e-3)
    assert no_te.descriptions == ["unet", "unet plus"] and no_te.groups[0]["lr"] == 1e-3
    with pytest.raises(SdtuneError, match="every learning rate is 0"):
        optimizer_param_groups(net, text_encoder_lr=0, unet_lr=0, default_lr=1e-3)


def test_param_groups_per_block_lr_weight_and_per_text_encoder_lr(load):
    config = LoraConfig(rank=2, conv_rank=2, mid_lr_weight="0.5,0,0.25")  # middle_block_0/2 are ResNets
    net = LoraNetwork(load("sdxl").modules, "sdxl", config)
    pg = optimizer_param_groups(net, text_encoder_lr=[1e-5, 2e-5], unet_lr=1e-4, default_lr=1e-3)
    lrs = dict(zip(pg.descriptions, [g["lr"] for g in pg.groups]))
    assert lrs["textencoder1"] == 1e-5 and lrs["textencoder2"] == 2e-5
    assert lrs["unet_block10"] == pytest.approx(0.5e-4) and lrs["unet_block12"] == pytest.approx(0.25e-4)
    assert "unet_block11" not in lrs and not any(block_index(n, "sdxl") == 11 for n in net.names("unet"))
    assert lrs["unet_block5"] == 1e-4


# ---- max-norm ------------------------------------------------------------------------------------------

def _randomise(net: LoraNetwork, scale: float, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net:
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def test_max_norm_matches_sd_scripts_on_lora_and_clamps_every_algorithm(load):
    model = load()
    net = LoraNetwork(model.modules, "sd1", LoraConfig(rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0))
    _randomise(net, 0.5)
    before = {n: net.lora(n).raw_delta().norm().item() for n in net.names()}
    limit = sorted(before.values())[len(before) // 2]  # half the modules exceed it
    # sd-scripts' apply_max_norm_regularization on a copy of the tensors
    expected = {}
    for n in net.names():
        m = net.lora(n)
        up, down = m.lora_up.weight.detach().clone(), m.lora_down.weight.detach().clone()
        norm = (m.raw_delta()).norm().clamp(min=limit / 2)
        ratio = torch.clamp(norm, max=limit) / norm
        expected[n] = (up * ratio ** 0.5, down * ratio ** 0.5)
    result = apply_max_norm(net, limit)
    assert result.keys_scaled == sum(v > limit for v in before.values())
    assert result.max_norm == pytest.approx(limit, rel=1e-5)
    for n, (up, down) in expected.items():
        m = net.lora(n)
        assert torch.allclose(m.lora_up.weight, up, atol=1e-7) and torch.allclose(m.lora_down.weight, down, atol=1e-7)
        assert m.raw_delta().norm().item() <= limit * (1 + 1e-5)
    for algorithm in ("loha", "lokr", "full", "dora"):
        lyco = LoraNetwork(load().modules, "sd1", LoraConfig(rank=4, alpha=2.0, algorithm=algorithm))
        _randomise(lyco, 0.5, seed=1)
        res = apply_max_norm(lyco, 0.05)
        assert res.keys_scaled > 0 and all(m.raw_delta().norm().item() <= 0.05 * (1 + 1e-4) for m in lyco), algorithm
