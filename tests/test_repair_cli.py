"""`repair` on the command line: te-override / te-blend / lora-te write their file and print the contract's
`output`; diagnose and pick-epoch are not built yet (exit 2); the help explains merge-back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from lib_sdtune.demo.tiny_models import write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def run(*args: object) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(ROOT / ".pytest_cache" / "home"), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "lib_sdtune", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env=env)


def test_te_override_and_blend_and_lora_te_cli(tmp_path: Path) -> None:
    model = write_tiny_checkpoint("sd1", tmp_path / "m", seed=0, dtype=torch.float32)
    donor = write_tiny_checkpoint("sd1", tmp_path / "d", seed=1, dtype=torch.float32)
    out = run("repair", "te-override", "--model", model, "--donor", donor, "-o", tmp_path / "o.safetensors", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["output"] == str(tmp_path / "o.safetensors") and data["architecture"] == "sd1"
    out = run("repair", "te-blend", "--model", model, "--donor", donor, "--alpha", "0.25", "-o",
              tmp_path / "b.safetensors")
    assert out.returncode == 0 and "alpha 0.25" in out.stdout, out.stderr
    out = run("repair", "te-override", "--model", model, "--donor", donor, "-o", model)
    assert out.returncode == 1 and "also an input" in out.stderr


def test_lora_te_cli_strip_and_refusal(tmp_path: Path) -> None:
    from lib_sdtune.io.safetensors_io import save_safetensors

    lora = save_safetensors({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(2, 8),
                             "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.ones(8, 2),
                             "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(1.0),
                             "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.ones(2, 8),
                             "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.ones(8, 2)},
                            tmp_path / "l.safetensors", {"ss_base_model_version": "sd_v1"})
    out = run("repair", "lora-te", "--lora", lora, "--strip", "-o", tmp_path / "s.safetensors", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["stripped"] == 1
    out = run("repair", "lora-te", "--lora", lora, "--strip", "--scale", "0.5", "-o", tmp_path / "x.safetensors")
    assert out.returncode == 2 and "not allowed with" in out.stderr


def test_missing_arguments_and_help() -> None:
    for sub, missing in (("diagnose", "--base"), ("pick-epoch", "RUN_DIR")):
        out = run("repair", sub)
        assert out.returncode == 2 and "required" in out.stderr and missing in out.stderr
    out = run("repair", "--help")
    assert out.returncode == 0 and "merge" in out.stdout and "weighted_sum" in out.stdout
