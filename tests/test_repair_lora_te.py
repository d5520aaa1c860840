"""`repair lora-te`: TE modules stripped or their ΔW scaled by X (LoRA, LoCon, LoHa, LoKr, full), U-Net blocks
scaled by LBW values, into a new file with fresh sshs_* hashes; the input is never touched."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch

from lib_sdtune.errors import SdtuneError
from lib_sdtune.io.hashes import precalculate_hashes
from lib_sdtune.merge.lora_common import block_weights, target_shape, target_slot
from lib_sdtune.merge.lora_delta import group_modules
from lib_sdtune.models.loader import load_checkpoint
from lib_sdtune.networks.kohya_file import load_lora, save_lora
from lib_sdtune.networks.network import LoraConfig, LoraNetwork
from lib_sdtune.repair import LoraTeConfig, repair_lora_te
from lib_sdtune.repair.lora_te import lbw_slot, te_of

CONFIGS = {
    "lora": LoraConfig(rank=4, alpha=2.0, conv_rank=2, conv_alpha=3.0),
    "loha": LoraConfig(rank=4, alpha=2.0, algorithm="loha"),
    "lokr": LoraConfig(rank=4, alpha=8.0, algorithm="lokr", factor=4),
    "full": LoraConfig(algorithm="full"),
}


@pytest.fixture(scope="module")
def loras(tiny_fp32_checkpoints, tmp_path_factory):
    """(arch, kind) -> (LoRA file, its network): random factors, every module trained (TE included)."""
    root = tmp_path_factory.mktemp("repair_lora")
    models: dict = {}
    cache: dict = {}

    def get(arch: str, kind: str = "lora"):
        if (arch, kind) not in cache:
            if arch not in models:
                models[arch] = load_checkpoint(tiny_fp32_checkpoints[arch])
            model = models[arch]
            net = LoraNetwork(model.modules, model.arch.family, dataclasses.replace(CONFIGS[kind]))
            g = torch.Generator().manual_seed(len(cache) + 1)
            with torch.no_grad():
                for m in net:
                    for _, p in (m.lyco if hasattr(m, "lyco") else m).named_parameters():
                        p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            path = root / f"{arch}-{kind}.safetensors"
            save_lora(net, path, metadata={"ss_network_train_unet_only": "False"}, dtype=torch.float32)
            cache[arch, kind] = (path, net)
        return cache[arch, kind]

    return get


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _deltas(path: Path, net: LoraNetwork) -> dict[str, torch.Tensor]:
    modules = group_modules(str(path), load_lora(path)[0])
    return {n: m.raw_delta(target_shape(net.targets[n])) for n, m in modules.items()}


def _bytes(state: dict, prefix: str) -> dict:
    return {k: v.reshape(-1).view(torch.uint8) for k, v in state.items() if k.startswith(prefix)}


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_strip_removes_te_modules_and_keeps_unet_bytes(loras, tmp_path: Path, arch: str) -> None:
    path, _ = loras(arch)
    before = _sha(path)
    out = tmp_path / "strip.safetensors"
    result = repair_lora_te(LoraTeConfig(str(path), str(out), strip=True))
    assert _sha(path) == before
    state, meta = load_lora(out)
    src, src_meta = load_lora(path)
    assert not any(k.startswith("lora_te") for k in state)
    assert result.stripped == result.te_modules > 0
    got, want = _bytes(state, "lora_unet_"), _bytes(src, "lora_unet_")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == precalculate_hashes(state, meta)
    assert meta["sshs_model_hash"] != src_meta.get("sshs_model_hash")
    assert json.loads(meta["sdtune_repair_recipe"])["lora"]["sha256"] == before
    assert src_meta["ss_network_train_unet_only"] == "False" and meta["ss_network_train_unet_only"] == "True"


def test_strip_one_sdxl_encoder(loras, tmp_path: Path) -> None:
    path, _ = loras("sdxl")
    out = tmp_path / "o.safetensors"
    repair_lora_te(LoraTeConfig(str(path), str(out), strip=True, te="2"))
    state, meta = load_lora(out)
    assert any(k.startswith("lora_te1_") for k in state) and not any(k.startswith("lora_te2_") for k in state)
    assert meta["ss_network_train_unet_only"] == "False"  # TE1 is still trained


@pytest.mark.parametrize(("arch", "kind"), [("sd1", "lora"), ("sd1", "loha"), ("sd1", "lokr"), ("sd1", "full"),
                                            ("sdxl", "lora")])
def test_scale_multiplies_te_delta_and_keeps_alpha(loras, tmp_path: Path, arch: str, kind: str) -> None:
    path, net = loras(arch, kind)
    out = tmp_path / "scaled.safetensors"
    x = 0.35
    repair_lora_te(LoraTeConfig(str(path), str(out), scale=x))
    before, after = _deltas(path, net), _deltas(out, net)
    assert before.keys() == after.keys()
    for name in before:
        factor = x if te_of(name) else 1.0
        assert torch.allclose(after[name], before[name] * factor, atol=1e-6, rtol=1e-5), name
    src, state = load_lora(path)[0], load_lora(out)[0]
    for k, v in src.items():
        if k.endswith(".alpha") or k.startswith("lora_unet_"):
            assert torch.equal(state[k], v), k


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_lbw_slot_of_a_module_name_matches_the_checkpoint_key_slot(loras, arch: str) -> None:
    _, net = loras(arch)
    for name in net.names("unet"):
        assert lbw_slot(name, arch) == target_slot(net.targets[name], arch), name


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_unet_blocks_scale_each_block(loras, tmp_path: Path, arch: str) -> None:
    path, net = loras(arch)
    n = 17 if arch == "sd1" else 12
    values = tuple(round(0.1 * i, 2) for i in range(n))  # BASE 0: the TE part goes to zero
    out = tmp_path / "lbw.safetensors"
    result = repair_lora_te(LoraTeConfig(str(path), str(out), unet_blocks=values))
    weights = block_weights(values, arch, "unet_blocks")
    before, after = _deltas(path, net), _deltas(out, net)
    assert result.unplaced == []
    for name in before:
        w = weights["BASE"] if te_of(name) else weights[target_slot(net.targets[name], arch)]
        assert torch.allclose(after[name], before[name] * w, atol=1e-6, rtol=1e-5), name


def test_refusals(loras, tmp_path: Path) -> None:
    path, _ = loras("sd1")
    with pytest.raises(SdtuneError, match="also an input"):
        repair_lora_te(LoraTeConfig(str(path), str(path), strip=True))
    with pytest.raises(SdtuneError, match="give one"):
        repair_lora_te(LoraTeConfig(str(path), str(tmp_path / "o.safetensors"), strip=True, scale=0.5))
    with pytest.raises(SdtuneError, match="nothing to do"):
        repair_lora_te(LoraTeConfig(str(path), str(tmp_path / "o.safetensors")))
    with pytest.raises(SdtuneError, match="te"):
        repair_lora_te(LoraTeConfig(str(path), str(tmp_path / "o.safetensors"), strip=True, te="2"))
    unet_only = tmp_path / "unet.safetensors"
    stripped = repair_lora_te(LoraTeConfig(str(path), str(unet_only), strip=True)).output
    with pytest.raises(SdtuneError, match="no text-encoder modules"):
        repair_lora_te(LoraTeConfig(str(stripped), str(tmp_path / "again.safetensors"), strip=True))
    assert not (tmp_path / "o.safetensors").exists()
