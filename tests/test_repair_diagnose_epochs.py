"""`repair pick-epoch` on a synthetic run folder (epoch files as the trainer names them, the final file with its
ss_epoch, the trainer's own RunLog JSON): validation loss ranks, the diagnosis vetoes drifted epochs, ties go to
the earliest epoch, and without validation loss or base it says so instead of guessing."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from lib_sdtune.cli import main
from lib_sdtune.errors import SdtuneError
from lib_sdtune.io.safetensors_io import save_safetensors
from lib_sdtune.repair.epochs import _pick, earlier_epochs, pick_epoch
from lib_sdtune.train.run_log import RunLog

# the tiny CLIP-L's layers: 12 x (q, k, v, out 64->64; fc1 64->256; fc2 256->64)
_PARTS = {"self_attn_q_proj": (64, 64), "self_attn_k_proj": (64, 64), "self_attn_v_proj": (64, 64),
          "self_attn_out_proj": (64, 64), "mlp_fc1": (64, 256), "mlp_fc2": (256, 64)}
MULTIPLIERS = (0.5, 1.0, 3.0, 4.0)  # epoch k's ΔW = MULTIPLIERS[k-1] x one random TE LoRA: drift grows with k
VALIDATION = (0.30, 0.26, 0.24, 0.22)


def _te_lora(multiplier: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for layer in range(12):
        for part, (n_in, n_out) in _PARTS.items():
            name = f"lora_te_text_model_encoder_layers_{layer}_{part}"
            out[f"{name}.lora_down.weight"] = torch.randn(4, n_in, generator=g) * 0.05
            out[f"{name}.lora_up.weight"] = torch.randn(n_out, 4, generator=g) * 0.05 * multiplier
            out[f"{name}.alpha"] = torch.tensor(4.0)
    return out


def _log(folder: Path, validation) -> None:
    """The trainer's log, written by the trainer's own RunLog: two steps per epoch."""
    log = RunLog(folder, "run")
    for epoch, val in enumerate(validation, 1):
        for step in (2 * epoch - 1, 2 * epoch):
            log.add_step(step, 0.5 / step, 1e-4, 0.1)
        log.end_epoch(epoch, val)


@pytest.fixture(scope="module")
def run_files(tmp_path_factory) -> Path:
    """run-000001..3.safetensors and run.safetensors (ss_epoch 4), TE-only LoRAs whose drift grows per epoch."""
    folder = tmp_path_factory.mktemp("run_files")
    for epoch, k in enumerate(MULTIPLIERS, 1):
        name = "run.safetensors" if epoch == len(MULTIPLIERS) else f"run-{epoch:06d}.safetensors"
        save_safetensors(_te_lora(k), folder / name, {"ss_base_model_version": "sd_v1", "ss_epoch": str(epoch),
                                                      "ss_output_name": "run"})
    return folder


def _run_dir(run_files: Path, folder: Path, validation) -> Path:
    folder.mkdir()
    for p in run_files.iterdir():
        os.link(p, folder / p.name)
    _log(folder, validation)
    return folder


def test_validation_loss_alone_ranks_and_says_drift_was_not_measured(run_files, tmp_path: Path) -> None:
    folder = _run_dir(run_files, tmp_path / "run", VALIDATION)
    ranking = pick_epoch(str(folder))
    assert ranking.best == folder / "run.safetensors" and ranking.best_epoch == 4  # the final file, by ss_epoch
    assert ranking.method == "validation loss" and "--base" in ranking.reason and ranking.name == "run"
    assert [e.epoch for e in ranking.entries] == [4, 3, 2, 1]
    assert [e.validation_loss for e in ranking.entries] == [0.22, 0.24, 0.26, 0.30]
    assert ranking.entries[0].train_loss == pytest.approx((0.5 / 7 + 0.5 / 8) / 2)
    assert all(e.passes is None for e in ranking.entries)


def test_a_tie_in_validation_loss_goes_to_the_earlier_epoch(run_files, tmp_path: Path) -> None:
    folder = _run_dir(run_files, tmp_path / "run", (0.30, 0.2510, 0.2500, 0.27))  # epoch 2 within 1% of epoch 3
    ranking = pick_epoch(str(folder))
    assert ranking.best_epoch == 2 and "within 1%" in ranking.reason and ranking.entries[0].epoch == 3


def test_no_validation_and_no_base_picks_nothing_and_says_why(run_files, tmp_path: Path) -> None:
    folder = _run_dir(run_files, tmp_path / "run", (None,) * 4)
    (folder / "run-000001.safetensors").unlink()  # pruned by save_last_n_epochs
    ranking = pick_epoch(str(folder))
    assert ranking.best is None and ranking.method == "none"
    assert "no validation loss" in ranking.reason and "no base" in ranking.reason
    assert [e.epoch for e in ranking.entries] == [4, 3, 2, 1] and ranking.entries[-1].file is None
    assert "file gone (pruned)" in ranking.format_text() and "no epoch picked" in ranking.format_text()


def test_with_a_base_drifted_epochs_are_vetoed(run_files, tiny_fp32_checkpoints, tmp_path: Path) -> None:
    base = tiny_fp32_checkpoints["sd1"]
    folder = _run_dir(run_files, tmp_path / "run", VALIDATION)
    ranking = pick_epoch(str(folder), str(base))
    by = {e.epoch: e for e in ranking.entries}
    cosines = [by[k].control_cosine for k in (1, 2, 3, 4)]
    assert cosines == sorted(cosines, reverse=True) and cosines[1] >= 0.95 > cosines[2]
    assert [by[k].passes for k in (1, 2, 3, 4)] == [True, True, False, False]
    assert by[3].failed == ["language drift in TE (CLIP-L)"] and by[1].unet_delta is None
    # validation loss + diagnosis: the lowest validation loss among the epochs that pass
    assert ranking.method == "validation loss + diagnosis" and ranking.best_epoch == 2
    assert ranking.best == folder / "run-000002.safetensors" and [e.epoch for e in ranking.entries] == [2, 1, 4, 3]
    # the same epochs without validation loss: the last one that still passes, and where failing starts
    bare = [dataclasses.replace(e, validation_loss=None) for e in ranking.entries]
    keeper, method, reason, ranked = _pick(bare, True, ranking.thresholds)
    assert keeper.epoch == 2 and method == "diagnosis" and "epoch 3 is the first that fails" in reason
    assert [e.epoch for e in ranked] == [2, 1, 3, 4]
    # every epoch failing: the least drifted one, with the advice to repair it
    failing = [dataclasses.replace(e, failed=["x"]) for e in bare]
    keeper, _, reason, _ = _pick(failing, True, ranking.thresholds)
    assert keeper.epoch == 1 and "every epoch fails" in reason


def test_diagnosing_an_epoch_file_points_to_pick_epoch(run_files, tiny_fp32_checkpoints) -> None:
    from lib_sdtune.repair.diagnose import DiagnoseConfig, diagnose

    epoch3 = run_files / "run-000003.safetensors"
    assert earlier_epochs(epoch3) == run_files and earlier_epochs(run_files / "run.safetensors") == run_files
    report = diagnose(DiagnoseConfig(str(tiny_fp32_checkpoints["sd1"]), lora=str(epoch3)))
    (drift,) = [v for v in report.verdicts if v.triggered]
    assert f"repair pick-epoch {run_files}" in drift.advice and "repair lora-te" in drift.command


def test_pick_epoch_cli(run_files, tmp_path: Path, capsys) -> None:
    folder = _run_dir(run_files, tmp_path / "run", VALIDATION)
    assert main(["repair", "pick-epoch", str(folder), "--json", "--no-progress"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["best"] == str(folder / "run.safetensors") and data["best_epoch"] == 4
    assert [r["epoch"] for r in data["ranking"]] == [4, 3, 2, 1]
    assert main(["repair", "pick-epoch", str(folder), "--no-progress"]) == 0
    assert "keep epoch 4" in capsys.readouterr().out
    save_safetensors(_te_lora(1.0), folder / "other-000001.safetensors")
    assert main(["repair", "pick-epoch", str(folder), "--no-progress"]) == 1
    assert "several runs (other, run)" in capsys.readouterr().err
    assert main(["repair", "pick-epoch", str(folder), "--name", "run", "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["best_epoch"] == 4
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["repair", "pick-epoch", str(empty), "--no-progress"]) == 1
    assert "holds no epoch files" in capsys.readouterr().err
    with pytest.raises(SdtuneError, match="not a folder"):
        pick_epoch(str(tmp_path / "missing"))
