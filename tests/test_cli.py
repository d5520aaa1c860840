"""The command line keeps its contract (CLI.md): exit codes, --json fields, one-paragraph errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd=ROOT, timeout=300):
    """Run the CLI in a clean environment (no HF_HUB_OFFLINE given: the CLI must set it itself)."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(ROOT / ".pytest_cache" / "home"), "PYTHONPATH": str(ROOT),
           "SDTUNE_CACHE_DIR": str(ROOT / ".pytest_cache" / "sdtune")}
    return subprocess.run([sys.executable, "-m", "lib_sdtune", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=env)


def test_help_lists_every_contract_command():
    out = run("--help")
    assert out.returncode == 0
    for cmd in ("model", "plan", "train", "merge", "lora", "repair", "tag", "ui", "demo"):
        assert cmd in out.stdout


@pytest.mark.compat
def test_model_info_json_has_the_contract_fields(tiny_checkpoints):
    out = run("model", "info", tiny_checkpoints["sdxl"], "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["architecture"] == "sdxl"
    assert set(info["components"]) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    assert all(isinstance(v, int) and v > 0 for v in info["components"].values())
    assert info["dtype"] == "float16"
    assert len(info["hashes"]["autov2"]) == 10 and len(info["hashes"]["sha256"]) == 64
    assert "missing_keys" not in info


@pytest.mark.compat
def test_model_info_load_reports_no_missing_or_unexpected_keys(tiny_checkpoints):
    out = run("model", "info", tiny_checkpoints["sd1"], "--load", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    assert "cond_stage_model.transformer.text_model.embeddings.position_ids" in info["ignored_keys"]


def test_model_info_human_output_names_architecture_and_hash(tiny_checkpoints):
    out = run("model", "info", tiny_checkpoints["sd2-v"])
    assert out.returncode == 0, out.stderr
    assert "architecture:  sd2-v" in out.stdout and "AutoV2" in out.stdout


def test_errors_are_one_paragraph_naming_the_file_and_exit_1(tmp_path):
    bad = tmp_path / "flux.safetensors"
    import torch

    from lib_sdtune.io.safetensors_io import save_safetensors

    save_safetensors({"double_blocks.0.img_attn.qkv.weight": torch.zeros(1),
                      "single_blocks.0.linear1.weight": torch.zeros(1)}, bad)
    out = run("model", "info", bad)
    assert out.returncode == 1 and out.stdout == ""
    assert "flux.safetensors" in out.stderr and "Flux" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_demo_builds_loads_plans_and_trains_the_tiny_model(tmp_path):
    out = run("demo", "--out", tmp_path / "demo", "--json", timeout=900)  # it trains: minutes on a busy CPU
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["clean_load"] is True
    (model,) = result["models"]
    assert model["architecture"] == "sd1" and model["missing_keys"] == [] and model["unexpected_keys"] == []
    assert (tmp_path / "demo" / "dataset" / "train").is_dir()
    assert (tmp_path / "demo" / "plan.toml").is_file()
    trained = result["train"]
    assert trained["steps"] == 60 and len(trained["losses"]) == 60  # 12 images x 10 repeats / batch 8 x 4 epochs
    assert [Path(p).name for p in trained["outputs"]] == ["sdtdemo-000002.safetensors", "sdtdemo.safetensors"]
    report = json.loads((tmp_path / "demo" / "diagnosis" / "report.json").read_text())
    assert [Path(p).name for p in result["diagnosis"]] == ["report.json", "report.txt", "report.png"]
    assert report["verdicts"] and all("triggered" in v for v in report["verdicts"])
    assert "kept in float32" not in out.stderr
