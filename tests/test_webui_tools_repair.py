"""The Repair panel: it builds in gradio 3.41/4.40/6; the diagnosis handler returns the report, its chart and one
prefilled fix per recommended repair; a prefilled fix runs as is and writes what the core writes; refusals are
readable; epochs of a run are ranked."""

from __future__ import annotations

import shutil

import pytest
import torch
from webui_helpers import folders_under, last, quick_polls, tensors  # noqa: F401 (an autouse fixture)

from lib_sdtune.webui import repair_panel
from lib_sdtune.webui.context import UiContext
from lib_sdtune.webui.repair_panel import FIX_FIELDS, DiagnoseForm, DiagnosisView, FixForm


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fix(**kw) -> list:
    return [getattr(FixForm(**kw), name) for name in FIX_FIELDS]


def diagnose_form(**kw) -> list:
    return [getattr(DiagnoseForm(**kw), name) for name in repair_panel.DIAGNOSE_FIELDS]


@pytest.fixture(scope="module")
def ctx(tiny_checkpoints, tmp_path_factory) -> UiContext:
    """Folders with the tiny SD1 base (a), an unrelated tuned model (b: seed 1, so everything drifted) and, in a
    run folder, two epochs of a LoRA extracted from b - a."""
    from lib_sdtune.demo.tiny_models import write_tiny_checkpoint
    from lib_sdtune.merge.lora_extract import ExtractConfig, extract_lora

    root = tmp_path_factory.mktemp("webui_repair")
    ctx = folders_under(root)
    ckpt, lora = ctx.folders.checkpoints[0], ctx.folders.loras[0]
    a = shutil.copy(tiny_checkpoints["sd1"], ckpt / "a.safetensors")
    shutil.move(write_tiny_checkpoint("sd1", root / "seed1", seed=1), ckpt / "b.safetensors")
    (lora / "run").mkdir()
    extract_lora(ExtractConfig(str(a), str(ckpt / "b.safetensors"), str(lora / "run" / "style-000002.safetensors"),
                               rank=4))
    shutil.copy(lora / "run" / "style-000002.safetensors", lora / "run" / "style-000001.safetensors")
    return ctx


@pytest.mark.compat
def test_panel_builds_inside_blocks(tmp_path):
    import gradio as gr

    with gr.Blocks():
        repair_panel.build_repair_panel(gr, folders_under(tmp_path))


@pytest.mark.compat
def test_verdict_commands_become_the_repair_form(tmp_path):
    ctx = folders_under(tmp_path)
    ckpt, lora = ctx.folders.checkpoints[0], ctx.folders.loras[0]
    cmd = f"python -m lib_sdtune repair lora-te --lora {lora}/sub/x.safetensors --scale 0.5 --te 1 " \
          f"-o {lora}/y.safetensors"
    assert repair_panel.fix_from_command(ctx, cmd) == {
        "tool": "LoRA TE scale", "lora": "sub/x.safetensors", "te": "1", "unet_blocks": "", "output": "y.safetensors",
        "scale": 0.5}
    cmd = f"python -m lib_sdtune merge {ckpt}/m.safetensors {ckpt}/base.safetensors --unet-alpha 0.8 --te-alpha 0 " \
          f"--vae-alpha 0 -o /elsewhere/m-unet0.8-base.safetensors"
    values = repair_panel.fix_values(repair_panel.fix_from_command(ctx, cmd))
    assert dict(zip(FIX_FIELDS, values)) == {**{n: None for n in FIX_FIELDS}, "tool": "Merge U-Net back",
                                             "model": "m.safetensors", "donor": "base.safetensors", "alpha": 0.8,
                                             "dtype": "fp16", "output": "m-unet0.8-base.safetensors",
                                             "overwrite": False}
    with pytest.raises(Exception, match="not one the Repair panel can fill in"):
        repair_panel.fix_from_command(ctx, "python -m lib_sdtune tag stats x")
    shown, ids = repair_panel.on_tool("TE blend")
    assert shown["alpha"] and shown["layers"] and not shown["lora"] and ids == "keep"


def test_te_override_writes_what_the_core_writes_and_refuses_to_overwrite(ctx, tmp_path):
    from lib_sdtune.repair import TeOverrideConfig, override_te

    ckpt = ctx.folders.checkpoints[0]
    values = fix(tool="TE override", model="b.safetensors", donor="a.safetensors", output="b-te")
    status, result, _ = last(repair_panel.run_fix(ctx, *values))
    assert status.startswith("Done: TE override -> b-te.safetensors"), status
    assert "copied bit for bit" in result
    ref = override_te(TeOverrideConfig(str(ckpt / "b.safetensors"), str(ckpt / "a.safetensors"),
                                       str(tmp_path / "ref.safetensors")))
    got, want = tensors(ckpt / "b-te.safetensors"), tensors(ref.output)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    status, _, job = last(repair_panel.run_fix(ctx, *values))
    assert "b-te.safetensors already exists; choose another name, or tick 'Overwrite'" in status and job is None
    status, _, _ = last(repair_panel.run_fix(ctx, *fix(tool="TE override", model="b.safetensors",
                                                       donor="../lora/run/style-000001.safetensors",
                                                       output="x")))
    assert status.startswith("Error: ") and "outside the allowed donor folders" in status
    assert last(repair_panel.run_fix(ctx, *fix(tool="LoRA TE strip", output="x")))[0] == \
        "Error: LoRA: choose a file first"


def test_checkpoint_diagnosis_gives_report_chart_and_prefilled_fixes_that_run(ctx):
    status, view, _ = last(repair_panel.run_diagnose(ctx, *diagnose_form(kind="Checkpoint", model="b.safetensors",
                                                                         base="a.safetensors")))
    assert status.startswith("Done: diagnose b.safetensors"), status
    assert isinstance(view, DiagnosisView) and "[!!] language drift" in view.text
    assert view.chart.size[0] > 100 and view.chart.mode in ("RGB", "RGBA")
    assert view.data["triggered"] == 2
    te, unet = view.fixes
    assert te["label"].startswith("Fix: language drift") and te["tool"] == "TE override"
    assert (te["model"], te["donor"], te["output"]) == ("b.safetensors", "a.safetensors", "b-te-base.safetensors")
    assert unet["tool"] == "Merge U-Net back" and 0 < unet["alpha"] <= 1 and unet["model"] == "b.safetensors"
    # one click fills the form; Run writes the repaired model
    values = [v if v is not None else d for v, d in zip(repair_panel.fix_values(te), fix())]
    status, result, _ = last(repair_panel.run_fix(ctx, *values))
    assert status.startswith("Done: TE override") and (ctx.folders.checkpoints[0] / "b-te-base.safetensors").is_file()


def test_lora_diagnosis_prefills_a_lora_te_fix_and_the_epoch_ranking(ctx):
    status, view, _ = last(repair_panel.run_diagnose(ctx, *diagnose_form(lora="run/style-000002.safetensors",
                                                                         base="a.safetensors")))
    assert status.startswith("Done: diagnose style-000002"), status
    assert view.run_dir == "run"
    (lora_fix,) = view.fixes
    assert lora_fix["tool"] in ("LoRA TE strip", "LoRA TE scale") and lora_fix["lora"] == "run/style-000002.safetensors"
    values = [v if v is not None else d for v, d in zip(repair_panel.fix_values(lora_fix), fix())]
    status, result, _ = last(repair_panel.run_fix(ctx, *values))
    assert status.startswith("Done: LoRA TE"), status
    written = ctx.folders.loras[0] / lora_fix["output"]
    from lib_sdtune.networks.lora_info import inspect_lora

    info = inspect_lora(written)
    assert info.te_modules == (0 if lora_fix["tool"] == "LoRA TE strip" else inspect_lora(
        ctx.folders.loras[0] / "run" / "style-000002.safetensors").te_modules)

    status, ranking, _ = last(repair_panel.run_pick_epoch(ctx, view.run_dir, "a.safetensors", "cpu"))
    assert status.startswith("Done: rank epochs of run") and "style in" in ranking and "2 epochs" in ranking
    assert last(repair_panel.run_pick_epoch(ctx, "../..", None, "cpu"))[0].startswith("Error: ")
