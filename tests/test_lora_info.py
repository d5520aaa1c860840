"""`lora info` tells what any LoRA/LyCORIS file is, from its header alone."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lib_sdtune.errors import SdtuneError
from lib_sdtune.io.safetensors_io import save_safetensors
from lib_sdtune.models.loader import load_checkpoint
from lib_sdtune.networks.kohya_file import save_lora
from lib_sdtune.networks.lora_info import format_lora_info, inspect_lora
from lib_sdtune.networks.network import LoraConfig, LoraNetwork

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = json.loads((ROOT / "tests" / "data" / "reference" / "kohya_lora_modules.json").read_text())


def _counts(ref: dict) -> tuple[int, int]:
    return sum(k.startswith("lora_te") for k in ref), sum(k.startswith("lora_unet") for k in ref)


@pytest.mark.parametrize("arch,ref,conv", [("sd1", "sd15", False), ("sd1", "sd15_conv", True),
                                           ("sdxl", "sdxl_base", False)])
def test_our_lora_files_are_described_exactly(tiny_checkpoints, tmp_path, arch, ref, conv):
    model = load_checkpoint(tiny_checkpoints[arch])
    config = LoraConfig(rank=8, alpha=4.0, conv_rank=4 if conv else None, conv_alpha=2.0 if conv else None)
    tags = json.dumps({"10_sdtdemo shape": {"sdtdemo": 12, "red circle": 5}, "1_shape": {"red circle": 2}})
    path = save_lora(LoraNetwork(model.modules, model.arch.family, config), tmp_path / "x.safetensors",
                     {"ss_tag_frequency": tags})
    info = inspect_lora(path)
    assert info.algorithm == ("locon" if conv else "lora")
    assert (info.te_modules, info.unet_modules) == _counts(REFERENCE[ref])
    assert info.base_model_version == ("sdxl_base_v1-0" if arch == "sdxl" else "sd_v1")
    if conv:
        assert set(info.rank.values()) == {8, 4} and set(info.alpha.values()) == {4.0, 2.0}
    else:
        assert info.rank == 8 and info.alpha == 4.0
    assert info.tags == {"sdtdemo": 12, "red circle": 7}
    assert info.hashes["sshs_model_hash"] == info.hashes["stored_sshs_model_hash"]
    assert info.dtype == "float16" and "ss_tag_frequency" not in info.metadata
    assert "algorithm:" in format_lora_info(info)


def test_files_without_metadata_get_their_base_model_from_names_and_widths(tmp_path):
    sd1 = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 768),
           "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(768, 4)}
    sd2 = {k: torch.zeros(4, 1024) if "down" in k else torch.zeros(1024, 4) for k in sd1}
    xl = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 768)}
    for tensors, expected in ((sd1, "sd_v1"), (sd2, "sd_v2"), (xl, "sdxl_base_v1-0")):
        assert inspect_lora(save_safetensors(tensors, tmp_path / f"{expected}.safetensors")).base_model_version \
            == expected


def test_lycoris_loha_and_lokr_files_are_recognised(tmp_path):
    loha = {f"lora_unet_down_blocks_0_attentions_0_proj_in.{k}": torch.zeros(8, 32) for k in
            ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
    loha["lora_unet_down_blocks_0_attentions_0_proj_in.alpha"] = torch.tensor(8.0)
    info = inspect_lora(save_safetensors(loha, tmp_path / "loha.safetensors"))
    assert info.algorithm == "loha" and info.rank == 8 and info.alpha == 8.0 and info.unet_modules == 1
    lokr = {"lora_unet_x.lokr_w1": torch.zeros(4, 4), "lora_unet_x.lokr_w2_a": torch.zeros(8, 2),
            "lora_unet_x.lokr_w2_b": torch.zeros(2, 8)}
    info = inspect_lora(save_safetensors(lokr, tmp_path / "lokr.safetensors"))
    assert info.algorithm == "lokr" and info.rank == 2  # LyCORIS's rank is w2_a's second axis


def test_a_checkpoint_or_a_pickle_is_refused(tiny_checkpoints, tmp_path):
    with pytest.raises(SdtuneError, match="no LoRA or LyCORIS modules"):
        inspect_lora(tiny_checkpoints["sd1"])
    pt = tmp_path / "x.pt"
    torch.save({"a": torch.zeros(1)}, pt)
    with pytest.raises(SdtuneError, match="only as .safetensors"):
        inspect_lora(pt)


def test_cli_lora_info_json_has_the_contract_fields(tiny_checkpoints, tmp_path):
    model = load_checkpoint(tiny_checkpoints["sd1"])
    path = save_lora(LoraNetwork(model.modules, "sd1", LoraConfig(rank=4, alpha=1.0)), tmp_path / "c.safetensors")
    out = subprocess.run([sys.executable, "-m", "lib_sdtune", "lora", "info", str(path), "--json"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    for field in ("algorithm", "rank", "base_model_version", "te_modules", "unet_modules", "tags"):
        assert field in info
    assert info["rank"] == 4 and info["te_modules"] == 72 and info["unet_modules"] == 192


def test_a_lora_for_another_architecture_is_refused_naming_its_own(tmp_path):
    from lib_sdtune.networks.lora_info import check_lora_fits

    sd1 = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 768)}
    info = inspect_lora(save_safetensors(sd1, tmp_path / "sd1_style.safetensors"))
    check_lora_fits(info, "sd1")
    with pytest.raises(SdtuneError, match=r"sd1_style.safetensors: this LoRA was made for SD 1.x .* the model is SDXL"):
        check_lora_fits(info, "sdxl")
    xl = save_safetensors(sd1, tmp_path / "xl.safetensors", {"ss_base_model_version": "sdxl_base_v1-0"})
    with pytest.raises(SdtuneError, match="made for SDXL"):
        check_lora_fits(inspect_lora(xl), "sd2")


def test_loading_an_sd1_lora_into_an_sdxl_network_is_refused(tiny_checkpoints, tmp_path):
    from lib_sdtune.networks.kohya_file import load_lora_into

    sd1 = load_checkpoint(tiny_checkpoints["sd1"])
    path = save_lora(LoraNetwork(sd1.modules, "sd1", LoraConfig(rank=4)), tmp_path / "sd1.safetensors")
    sdxl = load_checkpoint(tiny_checkpoints["sdxl"], components=["text_encoder", "text_encoder_2"])
    with pytest.raises(SdtuneError, match="made for SD 1.x .* the model is SDXL"):
        load_lora_into(LoraNetwork(sdxl.modules, "sdxl", LoraConfig(rank=4)), path)
    fresh = LoraNetwork(sd1.modules, "sd1", LoraConfig(rank=4))
    assert load_lora_into(fresh, path) == []
