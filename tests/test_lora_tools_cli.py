"""`lora bake|merge|resize|extract` keep the CLI contract: `-o OUT` written, `--json` with `output` and figures,
no overwrite without `--overwrite`, errors as one paragraph with exit 1."""

from __future__ import annotations

import json

import pytest
import torch

from lib_sdtune.cli import main
from lib_sdtune.models.loader import load_checkpoint
from lib_sdtune.networks.kohya_file import save_lora
from lib_sdtune.networks.lora_info import inspect_lora
from lib_sdtune.networks.network import LoraConfig, LoraNetwork


@pytest.fixture(scope="module")
def files(tiny_fp32_checkpoints, tmp_path_factory):
    """A tiny SD1 checkpoint and two LoRAs for it (a LoCon rank 4 and a LoRA rank 2), random."""
    torch.set_num_threads(1)
    ckpt = tiny_fp32_checkpoints["sd1"]
    model = load_checkpoint(ckpt)
    root = tmp_path_factory.mktemp("lora_cli")
    out = {"ckpt": ckpt}
    for i, (name, cfg) in enumerate({"a": LoraConfig(rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0),
                                     "b": LoraConfig(rank=2, alpha=1.0)}.items()):
        net = LoraNetwork(model.modules, "sd1", cfg)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for m in net:
                m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * 0.1)
        out[name] = save_lora(net, root / f"{name}.safetensors")
    return out


def _json(capsys, argv: list) -> dict:
    assert main([str(a) for a in argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_bake_writes_output_and_json_with_strengths_and_blocks(files, tmp_path, capsys):
    out = tmp_path / "baked.safetensors"
    data = _json(capsys, ["lora", "bake", files["ckpt"], f"{files['a']}:0.8", files["b"], "--blocks", "-",
                          "--blocks", "FLAT_25", "-o", out, "--json"])
    assert data["output"] == str(out) and out.is_file() and data["architecture"] == "sd1"
    assert data["applied"][str(files["a"])] > 0 and data["unmatched"] == {}


def test_existing_output_is_refused_without_overwrite_as_one_paragraph(files, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    out.write_bytes(b"keep")
    assert main(["lora", "resize", str(files["a"]), "--rank", "2", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err and err.count("\n") == 1
    assert out.read_bytes() == b"keep"
    data = _json(capsys, ["lora", "resize", files["a"], "--rank", "2", "-o", out, "--overwrite", "--json"])
    assert data["output"] == str(out) and inspect_lora(out).rank == 2


def test_resize_prints_energy_kept_per_module(files, tmp_path, capsys):
    out = tmp_path / "r.safetensors"
    assert main(["lora", "resize", str(files["a"]), "--rank", "4", "--dynamic", "sv_fro", "--param", "0.9",
                 "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "fro kept" in text and "lora_unet_down_blocks_0_attentions_0_proj_in" in text
    assert "mean Frobenius norm kept" in text


def test_merge_concat_and_svd_json(files, tmp_path, capsys):
    cat = _json(capsys, ["lora", "merge", f"{files['a']}:0.5", f"{files['b']}:-1", "-o", tmp_path / "c.safetensors",
                         "--json"])
    assert cat["mode"] == "concat" and cat["output"] == str(tmp_path / "c.safetensors")
    svd = _json(capsys, ["lora", "merge", files["a"], files["b"], "--rank", "3", "-o", tmp_path / "s.safetensors",
                         "--json"])
    assert svd["mode"] == "svd" and 0 < svd["mean_fro_retained"] <= 1
    assert inspect_lora(tmp_path / "s.safetensors").base_model_version == "sd_v1"


def test_extract_json_reports_text_encoder_and_modules(files, tmp_path, capsys):
    data = _json(capsys, ["lora", "extract", "--base", files["ckpt"], "--tuned", files["ckpt"], "--rank", "2",
                          "--svd", "randomized", "--threads", "1", "-o", tmp_path / "x.safetensors", "--json"])
    assert data["output"] == str(tmp_path / "x.safetensors") and data["te_kept"] is False
    assert data["te_modules"] == 0 and data["unet_modules"] > 0
    assert inspect_lora(tmp_path / "x.safetensors").algorithm == "lora"
