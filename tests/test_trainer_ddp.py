"""Data-parallel training: two CPU processes (gloo) started by torchrun end with identical adapters."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from test_trainer import _dataset  # a sibling test module: pytest puts tests/ on sys.path

from lib_sdtune.networks.kohya_file import load_lora


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_identical_adapters_and_only_the_first_writes(tiny_checkpoints, tmp_path):
    data = _dataset(tmp_path / "ds", n=4)  # 8 samples, batch 2: 4 batches, 2 per process
    cfg = tmp_path / "ddp.toml"
    cfg.write_text(f'pretrained_model_name_or_path = "{tiny_checkpoints["sd1"]}"\ntrain_data_dir = "{data}"\n'
                   f'output_dir = "{tmp_path / "out"}"\noutput_name = "ddp"\nresolution = 64\n'
                   'train_batch_size = 2\nmax_train_epochs = 2\nmax_data_loader_n_workers = 0\nseed = 5\n'
                   'network_dim = 4\nnetwork_dropout = 0.1\n')
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(_free_port()), "-m", "lib_sdtune", "train", str(cfg), "--json"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["steps"] == 4 and result["epochs"] == 2  # 2 batches per process per epoch
    assert any("2 data-parallel processes ended with identical adapter weights" in n for n in result["notes"])
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["ddp-config.json", "ddp-log.json", "ddp-loss.png", "ddp.safetensors"]  # no rank-1 files
    sd, meta = load_lora(tmp_path / "out" / "ddp.safetensors")
    assert meta["ss_steps"] == "4" and sd
