"""`lora resize`, `lora merge` and `lora extract` against their formulas computed with torch on the same tensors:
full-rank resize and concatenation are exact, truncations equal torch's SVD truncation, sd-scripts' dynamic rank
rules pick the ranks it picks, and extraction recovers a known low-rank ΔW (text encoders only when changed)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from lib_sdtune.errors import SdtuneError
from lib_sdtune.io.safetensors_io import SafetensorsFile, save_safetensors
from lib_sdtune.merge.lora_common import target_shape
from lib_sdtune.merge.lora_delta import group_modules
from lib_sdtune.merge.lora_extract import ExtractConfig, extract_lora
from lib_sdtune.merge.lora_merge import LoraMergeConfig, merge_loras
from lib_sdtune.merge.lora_resize import ResizeConfig, resize_lora
from lib_sdtune.merge.lora_svd import choose_rank, quantile, svd_dense, svd_of_factors
from lib_sdtune.models.loader import load_checkpoint
from lib_sdtune.networks.kohya_file import load_lora, save_lora
from lib_sdtune.networks.lora_info import inspect_lora
from lib_sdtune.networks.network import LoraConfig, LoraNetwork

LOCON = LoraConfig(rank=4, alpha=2.0, conv_rank=2, conv_alpha=3.0)
PLAIN8 = LoraConfig(rank=8, alpha=1.0)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def models(tiny_fp32_models):
    """arch -> the fp32 tiny checkpoint loaded once (networks wrap it without changing its weights)."""
    return tiny_fp32_models


def _network(model, config: LoraConfig, seed: int) -> LoraNetwork:
    net = LoraNetwork(model.modules, model.arch.family, dataclasses.replace(config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net:
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * 0.1)
    return net


def _file(net: LoraNetwork, path: Path) -> Path:
    save_lora(net, path, dtype=torch.float32)
    net.load_kohya_state_dict(load_lora(path)[0])
    return path


def _deltas(path: Path, net: LoraNetwork) -> dict[str, torch.Tensor]:
    """ΔW (scale included) of every module of a file, in the shapes of `net`'s layers."""
    modules = group_modules(str(path), load_lora(path)[0])
    return {n: m.raw_delta(target_shape(net.targets[n])) for n, m in modules.items()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-12))


def _truncated(delta: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta.reshape(delta.shape[0], -1).double(), full_matrices=False)
    return ((u[:, :k] * s[:k]) @ vh[:k]).reshape(delta.shape).float()


# ---- the pieces

def test_sd_scripts_dynamic_rank_rules_on_crafted_singular_values():
    s = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5, 0.1])
    # sv_ratio 4: 2 values above 10/4, sd-scripts keeps index + 1 = 3
    assert choose_rank(s, 16, "sv_ratio", 4) == 3
    assert choose_rank(s, 16, "sv_ratio", 1000) == 6  # index clamped to len - 1, then + 1
    # sv_cumulative 0.8: shares .538 .806 ... -> first index reaching 0.8 is 1, +1 = 2, +1 = 3
    assert choose_rank(s, 16, "sv_cumulative", 0.8) == 3
    assert choose_rank(s, 16, "sv_cumulative", 0.5) == 2  # share .538 at index 0 -> 1 -> clamped min 1 -> 2
    # sv_fro 0.9 compares squares with 0.81: .768 .960 -> index 1 -> 3
    assert choose_rank(s, 16, "sv_fro", 0.9) == 3
    assert choose_rank(s, 2, "sv_fro", 0.9) == 2  # capped by the asked rank
    assert choose_rank(torch.zeros(6), 8, "sv_ratio", 2) == 1  # an all-zero ΔW gets rank 1
    assert choose_rank(s, 4) == 4  # fixed
    # zeros padded to the full spectrum change what the clamp allows, as sd-scripts' full SVD sees it
    assert choose_rank(s[:2], 16, "sv_ratio", 1000) == 2
    assert choose_rank(s[:2], 16, "sv_ratio", 1000, full_length=6) == 3


def test_factored_svd_equals_dense_svd_and_kthvalue_quantile_equals_torch():
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(40, 6, generator=g), torch.randn(6, 90, generator=g)
    u, s, vh = svd_of_factors(up, down)
    assert torch.allclose(s, torch.linalg.svdvals(up @ down)[:6], rtol=1e-4)
    assert torch.allclose((u * s) @ vh, up @ down, atol=1e-4)
    x = torch.randn(1001, generator=g)
    assert abs(quantile(x, 0.99) - float(torch.quantile(x, 0.99))) < 1e-6
    u, s, vh = svd_dense(up @ down, "randomized", 6)
    assert _rel((u[:, :6] * s[:6]) @ vh[:6], up @ down) < 1e-4


# ---- resize

def test_resize_to_full_rank_reproduces_delta_and_keeps_scale(models, tmp_path):
    net = _network(models("sd1"), LOCON, seed=1)
    src = _file(net, tmp_path / "a.safetensors")
    out = tmp_path / "r.safetensors"
    result = resize_lora(ResizeConfig(str(src), str(out), rank=4, conv_rank=2, dtype="fp32"))
    want, got = _deltas(src, net), _deltas(out, net)
    assert set(got) == set(want)
    assert max(_rel(got[n], want[n]) for n in want) < 1e-5
    assert all(r.fro_retained > 0.99999 and r.new_rank == r.old_rank for r in result.modules)
    state, meta = load_lora(out)
    assert float(state[f"{net.names('unet')[0]}.alpha"]) == 2.0  # (2 / 4) * 4
    assert meta["ss_network_dim"] == "4" and "resized from 2/4 to 4" in meta["ss_training_comment"]
    assert inspect_lora(out).algorithm == "locon"


def test_resize_to_lower_rank_equals_torch_svd_truncation(models, tmp_path):
    net = _network(models("sd1"), LOCON, seed=2)
    src = _file(net, tmp_path / "a.safetensors")
    out = tmp_path / "r.safetensors"
    result = resize_lora(ResizeConfig(str(src), str(out), rank=2, conv_rank=1, dtype="fp32"))
    want, got = _deltas(src, net), _deltas(out, net)
    for n in want:
        k = 1 if net.targets[n].uses_conv_dim else 2
        assert _rel(got[n], _truncated(want[n], k)) < 1e-4, n
    by_name = {r.name: r for r in result.modules}
    n = net.names("unet")[0]
    s = torch.linalg.svdvals(want[n].reshape(want[n].shape[0], -1).double())
    assert abs(by_name[n].fro_retained - float(s[:2].norm() / s.norm())) < 1e-5
    assert float(load_lora(out)[0][f"{n}.alpha"]) == 1.0  # (2 / 4) * 2: the scale is kept


def test_dynamic_resize_picks_per_module_ranks_and_marks_metadata_dynamic(models, tmp_path):
    net = _network(models("sd1"), LOCON, seed=3)
    src = _file(net, tmp_path / "a.safetensors")
    out = tmp_path / "r.safetensors"
    result = resize_lora(ResizeConfig(str(src), str(out), rank=3, dynamic="sv_fro", param=0.5, dtype="fp32"))
    modules = group_modules(str(src), load_lora(src)[0])
    for r in result.modules:
        m = modules[r.name]
        lr = m.low_rank()
        s = torch.linalg.svdvals(lr.up @ lr.down)
        full = min(lr.up.shape[0], lr.down.shape[1])
        assert r.new_rank == min(choose_rank(s, 3, "sv_fro", 0.5, full_length=full), m.rank)
        assert r.new_alpha == pytest.approx(m.scale * r.new_rank)
    assert load_lora(out)[1]["ss_network_dim"] == "Dynamic"


def test_resize_refuses_lycoris_and_existing_output(models, tmp_path):
    net = LoraNetwork(models("sd1").modules, "sd1", LoraConfig(rank=4, algorithm="loha"))
    src = tmp_path / "loha.safetensors"
    save_lora(net, src)
    with pytest.raises(SdtuneError, match="is loha; resize and merge work on LoRA/LoCon"):
        resize_lora(ResizeConfig(str(src), str(tmp_path / "o.safetensors"), rank=2))
    (tmp_path / "o.safetensors").write_bytes(b"")
    with pytest.raises(SdtuneError, match="--overwrite"):
        resize_lora(ResizeConfig(str(src), str(tmp_path / "o.safetensors"), rank=2))


# ---- merge

def test_concat_merge_is_exact_sum_across_ranks_alphas_and_negative_ratios(models, tmp_path):
    a, b = _network(models("sd1"), LOCON, seed=4), _network(models("sd1"), PLAIN8, seed=5)
    pa, pb = _file(a, tmp_path / "a.safetensors"), _file(b, tmp_path / "b.safetensors")
    out = tmp_path / "m.safetensors"
    result = merge_loras(LoraMergeConfig(((str(pa), 0.7), (str(pb), -0.4)), str(out), dtype="fp32"))
    da, db, got = _deltas(pa, a), _deltas(pb, a), _deltas(out, a)
    assert set(got) == set(da) | set(db) and result.mode == "concat"
    for n in got:
        want = 0.7 * da.get(n, 0) - 0.4 * db.get(n, 0)
        assert _rel(got[n], want) < 1e-5, n
    assert result.ranks[b.names("unet")[0]] == 12 and result.to_dict()["rank"] != 12  # 3x3 convs: only a's 2


def test_svd_merge_full_rank_is_exact_and_lower_rank_is_the_truncated_sum(models, tmp_path):
    a, b = _network(models("sd1"), LOCON, seed=6), _network(models("sd1"), PLAIN8, seed=7)
    pa, pb = _file(a, tmp_path / "a.safetensors"), _file(b, tmp_path / "b.safetensors")
    da, db = _deltas(pa, a), _deltas(pb, a)
    want = {n: 0.5 * da.get(n, 0) + 1.2 * db.get(n, 0) for n in set(da) | set(db)}
    full = tmp_path / "full.safetensors"
    merge_loras(LoraMergeConfig(((str(pa), 0.5), (str(pb), 1.2)), str(full), rank=12, dtype="fp32"))
    got = _deltas(full, a)
    assert max(_rel(got[n], want[n]) for n in want) < 1e-4
    low = tmp_path / "low.safetensors"
    result = merge_loras(LoraMergeConfig(((str(pa), 0.5), (str(pb), 1.2)), str(low), rank=3, conv_rank=1,
                                         dtype="fp32"))
    got = _deltas(low, a)
    for n in want:
        k = 1 if a.targets[n].uses_conv_dim else 3
        assert _rel(got[n], _truncated(want[n], k)) < 1e-4, n
    assert result.mode == "svd" and load_lora(low)[1]["ss_network_args"] == '{"conv_dim": "1", "conv_alpha": "1"}'


def test_merge_refuses_loras_of_different_architectures(models, tmp_path):
    a = _file(_network(models("sd1"), LOCON, seed=8), tmp_path / "a.safetensors")
    x = _file(_network(models("sdxl"), LoraConfig(rank=2), seed=9), tmp_path / "x.safetensors")
    with pytest.raises(SdtuneError, match="same architecture"):
        merge_loras(LoraMergeConfig(((str(a), 1.0), (str(x), 1.0)), str(tmp_path / "m.safetensors")))


# ---- extract

def _tuned(ckpt: Path, nets: list[LoraNetwork], out: Path) -> Path:
    """A checkpoint = `ckpt` + every network's ΔW at its original keys (fused q/k/v by rows)."""
    f = SafetensorsFile(ckpt)
    sd = {k: f.get_tensor(k).clone() for k in f.keys()}
    for net in nets:
        for n, t in net.targets.items():
            w = sd[t.original_key]
            part = w if t.original_rows is None else w[t.original_rows[0]:t.original_rows[1]]
            part += net.lora(n).delta_weight().reshape(part.shape)
    save_safetensors(sd, out, f.metadata)
    return out


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_extract_recovers_a_known_low_rank_delta_and_skips_an_unchanged_text_encoder(
        tiny_fp32_checkpoints, models, tmp_path, svd):
    ckpt = tiny_fp32_checkpoints["sd1"]
    net = _network(models("sd1"), dataclasses.replace(LOCON, train_text_encoder=False), seed=10)
    tuned = _tuned(ckpt, [net], tmp_path / "tuned.safetensors")
    out = tmp_path / "x.safetensors"
    result = extract_lora(ExtractConfig(str(ckpt), str(tuned), str(out), rank=4, conv_rank=2, clamp_quantile=None,
                                        svd=svd, dtype="fp32"))
    assert not result.te_kept and result.te_modules == 0 and result.unet_modules == len(net.names())
    got = _deltas(out, net)
    assert set(got) == set(net.names())
    assert max(_rel(got[n], net.lora(n).delta_weight()) for n in got) < 1e-4
    info = inspect_lora(out)
    assert info.base_model_version == "sd_v1" and info.algorithm == "locon" and info.te_modules == 0
    meta = load_lora(out)[1]
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    check = LoraNetwork(models("sd1").modules, "sd1", dataclasses.replace(LOCON, train_text_encoder=False))
    assert check.load_kohya_state_dict(load_lora(out)[0], strict=True) == []


def test_extract_keeps_a_changed_sd2_text_encoder_with_fused_qkv_rows_and_clamps(tiny_fp32_checkpoints, models,
                                                                                  tmp_path):
    ckpt = tiny_fp32_checkpoints["sd2"]
    net = _network(models("sd2"), LoraConfig(rank=4, alpha=4.0), seed=11)
    tuned = _tuned(ckpt, [net], tmp_path / "tuned.safetensors")
    out = tmp_path / "x.safetensors"
    result = extract_lora(ExtractConfig(str(ckpt), str(tuned), str(out), rank=4, clamp_quantile=None, dtype="fp32"))
    assert result.te_kept and result.te_modules == len(net.names("text_encoder"))
    got = _deltas(out, net)
    assert max(_rel(got[n], net.lora(n).delta_weight()) for n in got) < 1e-4
    clamped = tmp_path / "c.safetensors"
    extract_lora(ExtractConfig(str(ckpt), str(tuned), str(clamped), rank=4, clamp_quantile=0.9, min_diff=1e9,
                               dtype="fp32"))
    state = load_lora(clamped)[0]
    assert not any(k.startswith("lora_te") for k in state)  # min_diff above every change: U-Net only
    free = load_lora(out)[0]
    for n in net.names("unet")[:3]:  # sd-scripts' clamp: both factors to ±(0.9-quantile of their values)
        up, down = free[f"{n}.lora_up.weight"], free[f"{n}.lora_down.weight"]
        hi = quantile(torch.cat([up.flatten(), down.flatten()]), 0.9)
        assert torch.equal(state[f"{n}.lora_up.weight"], up.clamp(-hi, hi))
        assert torch.equal(state[f"{n}.lora_down.weight"], down.clamp(-hi, hi))


def test_extract_refuses_checkpoints_of_different_architectures(tiny_fp32_checkpoints, tmp_path):
    with pytest.raises(SdtuneError, match="same architecture"):
        extract_lora(ExtractConfig(str(tiny_fp32_checkpoints["sd1"]), str(tiny_fp32_checkpoints["sdxl"]),
                                   str(tmp_path / "x.safetensors")))


def test_diffusers_loads_an_extracted_lora_with_its_exact_deltas(tiny_fp32_checkpoints, models, tmp_path):
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from lib_sdtune.models.tokenizer import load_clip_tokenizer

    ckpt = tiny_fp32_checkpoints["sd1"]
    net = _network(models("sd1"), LOCON, seed=12)
    tuned = _tuned(ckpt, [net], tmp_path / "tuned.safetensors")
    out = tmp_path / "x.safetensors"
    extract_lora(ExtractConfig(str(ckpt), str(tuned), str(out), rank=4, conv_rank=2, dtype="fp32"))
    fresh = load_checkpoint(ckpt)
    mods = fresh.modules
    layers = {n: mods[t.component].get_submodule(t.module_path) for n, t in net.targets.items()}
    before = {n: layer.weight.detach().clone() for n, layer in layers.items()}
    pipe = StableDiffusionPipeline(vae=mods["vae"], text_encoder=mods["text_encoder"],
                                   tokenizer=load_clip_tokenizer("clip_l"), unet=mods["unet"],
                                   scheduler=DDPMScheduler(**fresh.scheduler_config), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(out), adapter_name="x")
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=1.0)
    file_deltas = _deltas(out, net)
    for n, t in net.targets.items():
        layer = mods[t.component].get_submodule(t.module_path)
        fused = getattr(layer, "base_layer", layer).weight.detach() - before[n]
        assert (fused - file_deltas[n]).abs().max() < 1e-5, n
