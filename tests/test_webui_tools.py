"""The Merge and LoRA tools panels: they build in gradio 3.41/4.40/6, the block-weight editor keeps sliders, presets
and the comma list in sync, and the handlers (called as gradio calls them) write the same files as the core,
refuse paths outside the folders and existing names without Overwrite, and stop on Stop."""

from __future__ import annotations

import dataclasses
import shutil
import threading
from pathlib import Path

import pytest
import torch
from webui_helpers import folders_under, last, quick_polls, tensors  # noqa: F401 (an autouse fixture)

from lib_sdtune.merge.blocks import PRESETS, SD_SLOTS, SDXL_SLOTS_VAE
from lib_sdtune.merge.pipeline import MergeCancelled
from lib_sdtune.webui import lora_panel, merge_panel
from lib_sdtune.webui.context import UiContext, UiSettings
from lib_sdtune.webui.merge_panel import SLIDER_SLOTS, MergeForm
from lib_sdtune.webui.tools_common import output_path, run_job, stop


@pytest.fixture(scope="module")
def ctx(tiny_checkpoints, tmp_path_factory) -> UiContext:
    """Host folders holding the tiny SD1 checkpoint (a) and a seeded variant of it (b)."""
    ctx = folders_under(tmp_path_factory.mktemp("webui_tools"))
    ckpt = ctx.folders.checkpoints[0]
    a = Path(shutil.copy(tiny_checkpoints["sd1"], ckpt / "a.safetensors"))
    gen = torch.Generator().manual_seed(1)
    from lib_sdtune.io.safetensors_io import save_safetensors

    save_safetensors({k: (t.float() + 0.05 * torch.randn(t.shape, generator=gen)).to(t.dtype)
                      if t.is_floating_point() and "model" in k else t for k, t in tensors(a).items()},
                     ckpt / "b.safetensors")
    return ctx


def form(**kw) -> list:
    """The Merge panel's component values in handler order."""
    return [getattr(MergeForm(**kw), name) for name in merge_panel.FIELDS]


@pytest.mark.compat
@pytest.mark.parametrize("build", [merge_panel.build_merge_panel, lora_panel.build_lora_panel])
def test_panels_build_inside_blocks(tmp_path, build):
    import gradio as gr

    with gr.Blocks():
        build(gr, folders_under(tmp_path))


@pytest.mark.compat
def test_block_editor_keeps_presets_sliders_and_the_comma_list_in_sync():
    text, *sliders = merge_panel.on_preset("GRAD_V", "SD1/SD2")
    assert [float(v) for v in text.split(",")] == pytest.approx(PRESETS["GRAD_V"], abs=1e-6)
    assert dict(zip(SLIDER_SLOTS, sliders))["OUT11"] == 1.0
    assert merge_panel.on_sliders("SD1/SD2", *sliders) == (text, "GRAD_V")
    sliders[SLIDER_SLOTS.index("MID")] = 0.3  # a slider moved by hand: the list follows, the preset is custom
    moved, preset = merge_panel.on_sliders("SD1/SD2", *sliders)
    assert moved.split(",")[SD_SLOTS.index("MID")] == "0.3" and preset == merge_panel.CUSTOM
    back = merge_panel.on_blocks_text(moved, "SD1/SD2")
    assert back[:len(SLIDER_SLOTS)] == pytest.approx(sliders, abs=1e-6) and back[-2:] == [merge_panel.CUSTOM, ""]
    # SDXL: 20 slots + VAE; IN09-IN11 / OUT09-OUT11 hidden, a 26-value list converted as supermerger does
    xl_text, *shown = merge_panel.on_layout("SDXL", *sliders)
    assert len(xl_text.split(",")) == len(SDXL_SLOTS_VAE) == 21
    assert dict(zip(SLIDER_SLOTS, shown)) == {s: s in SDXL_SLOTS_VAE for s in SLIDER_SLOTS}
    assert merge_panel.on_blocks_text(text, "SDXL")[-2] == "GRAD_V"
    error = merge_panel.on_blocks_text("1,2,x", "SD1/SD2")[-1]
    assert error.startswith("Error: blocks: expected numbers")
    assert "26" in merge_panel.on_blocks_text("0.5,0.5", "SD1/SD2")[-1]


@pytest.mark.compat
def test_outputs_are_confined_and_never_silently_overwritten(tmp_path):
    ctx = folders_under(tmp_path)
    roots = list(ctx.folders.loras)
    assert output_path("x", roots, False) == (roots[0] / "x.safetensors").resolve()
    for bad in ("../escape", str(tmp_path / "ckpt" / "y.safetensors"), "/etc/z"):
        with pytest.raises(Exception, match="outside the allowed output folders"):
            output_path(bad, roots, False)
    (roots[0] / "taken.safetensors").write_bytes(b"x")
    with pytest.raises(Exception, match="already exists; choose another name, or tick 'Overwrite'"):
        output_path("taken", roots, False)
    assert output_path("taken.safetensors", roots, True).name == "taken.safetensors"
    with pytest.raises(Exception, match=r"\.safetensors only"):
        output_path("model.ckpt", roots, False)
    # the same refusals reach the UI as one readable line, and nothing starts
    status, result, job = last(lora_panel.run_resize(ctx, None, 4, 0, "fixed rank", "", "keep", "r", False))
    assert status == "Error: LoRA: choose a file first" and job is None
    assert last(merge_panel.run_merge(ctx, *form(model_a="../a.safetensors")))[0].startswith("Error: ")
    status = last(lora_panel.run_bake(ctx, None, "keep", "x", False, "l.safetensors", "strong", ""))[0]
    assert status.startswith("Error: ") and "Traceback" not in status  # not a core error: still one line


@pytest.mark.compat
def test_stop_ends_a_running_job_as_stopped(tmp_path):
    ctx = folders_under(tmp_path)
    started = threading.Event()

    def work(jc):
        started.set()
        while not jc.cancelled():
            threading.Event().wait(0.01)
        raise MergeCancelled("merge cancelled; nothing was written")

    updates = run_job(ctx, "merge", work, str)
    status, _, job_id = next(updates)
    assert status.startswith("Running: merge") and started.wait(5)
    assert stop(ctx, job_id) == "Stopping…"
    assert last(updates)[0].startswith("Stopped: merge")
    assert stop(ctx, job_id) == "The job has already ended." and stop(ctx, None) == "Nothing is running."


def test_merge_with_block_weights_writes_what_the_core_writes(ctx, tmp_path):
    from lib_sdtune.merge import MergeConfig, merge_checkpoints

    blocks = ",".join(f"{i / 25:g}" for i in range(26))
    values = form(model_a="a.safetensors", model_b="b.safetensors", method="weighted_sum", alpha=0.3,
                  te_alpha="0.8", use_blocks=True, blocks=blocks, dtype="fp32", output="mbw")
    status, preview = merge_panel.preview_recipe(ctx, *values)
    assert status.startswith("Preview: mbw.safetensors"), status
    assert '"te_alpha": 0.8' in preview and '"OUT11": 1.0' in preview and '"architecture": "sd1"' in preview
    out = ctx.folders.checkpoints[0] / "mbw.safetensors"
    assert not out.exists()  # a preview writes nothing
    status, result, _ = last(merge_panel.run_merge(ctx, *values))
    assert status.startswith("Done: merge -> mbw.safetensors") and result.startswith(f"Wrote {out}")
    assert ctx.refreshed[-1] == "checkpoint"  # the host is asked to list the new model
    ckpt = ctx.folders.checkpoints[0]
    ref = merge_checkpoints(MergeConfig((str(ckpt / "a.safetensors"), str(ckpt / "b.safetensors")),
                                        str(tmp_path / "ref.safetensors"), alpha=0.3, te_alpha=0.8, dtype="fp32",
                                        blocks=tuple(i / 25 for i in range(26))))
    got, want = tensors(out), tensors(ref.output)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    status, _, job = last(merge_panel.run_merge(ctx, *values))  # the same name again, without Overwrite
    assert status == f"Error: output: {out} already exists; choose another name, or tick 'Overwrite' to replace it"
    # a preset is recorded by name
    values = form(model_a="a.safetensors", model_b="b.safetensors", use_blocks=True, preset="GRAD_V",
                  blocks=merge_panel.on_preset("GRAD_V", "SD1/SD2")[0], output="mbw", overwrite=True)
    assert '"blocks": "GRAD_V"' in merge_panel.preview_recipe(ctx, *values)[1]


def test_lora_tools_extract_info_resize_merge_and_bake_through_the_handlers(ctx):
    from lib_sdtune.merge.lora_bake import BakeConfig, LoraInput, bake_loras

    lora_dir, ckpt_dir = ctx.folders.loras[0], ctx.folders.checkpoints[0]
    status, result, _ = last(lora_panel.run_extract(ctx, "a.safetensors", "b.safetensors", 4, 0, "0.99", "0.01",
                                                    "exact", "cpu", "ex", False))
    assert status.startswith("Done: extract"), status
    assert (lora_dir / "ex.safetensors").is_file() and "text-encoder and" in result
    text, info = lora_panel.lora_info(ctx, "ex.safetensors")
    assert info["rank"] == 4 and info["base_model_version"] == "sd_v1" and "algorithm:" in text
    assert lora_panel.lora_info(ctx, "nope.safetensors")[0].startswith("Error: nope.safetensors: no such LoRA")

    status, result, _ = last(lora_panel.run_resize(ctx, "ex.safetensors", 2, 0, "fixed rank", "", "keep", "ex2",
                                                   False))
    assert status.startswith("Done: resize") and "mean Frobenius norm" in result
    assert lora_panel.lora_info(ctx, "ex2.safetensors")[1]["rank"] == 2 and ctx.refreshed[-1] == "lora"
    status, _, _ = last(lora_panel.run_resize(ctx, "ex.safetensors", 2, 0, "fixed rank", "", "keep", "ex2", False))
    assert "already exists" in status and "Overwrite" in status

    status, result, _ = last(lora_panel.run_lora_merge(ctx, 0, 0, "fixed rank", "", "", "keep", "both", False,
                                                       "ex.safetensors", 0.5, "ex2.safetensors", 1.0,
                                                       None, 1.0, None, 1.0))
    assert status.startswith("Done: LoRA merge") and "concat" in result
    assert lora_panel.lora_info(ctx, "both.safetensors")[1]["rank"] == 6

    slots = ["ex.safetensors", 0.7, "", None, 1.0, "", None, 1.0, "", None, 1.0, ""]
    status, result, _ = last(lora_panel.run_bake(ctx, "a.safetensors", "keep", "baked", False, *slots))
    assert status.startswith("Done: bake") and "ex.safetensors: " in result
    ref = bake_loras(BakeConfig(str(ckpt_dir / "a.safetensors"), (LoraInput(str(lora_dir / "ex.safetensors"), 0.7),),
                                str(ckpt_dir / "ref_baked.safetensors")))
    got, want = tensors(ckpt_dir / "baked.safetensors"), tensors(ref.output)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert ref.changed > 0
    assert last(lora_panel.run_bake(ctx, "a.safetensors", "keep", "b2", False, *[None, 1.0, ""] * 4))[0] == \
        "Error: LoRA: choose at least one LoRA to bake"


def test_a_checkpoint_output_folder_setting_is_used(ctx, tmp_path):
    out_dir = tmp_path / "merged"
    out_dir.mkdir()
    custom = dataclasses.replace(ctx, settings=UiSettings(output_dir=out_dir))
    values = form(model_a="a.safetensors", model_b="b.safetensors", output="sub/x")
    assert '"output": "' + str(out_dir.resolve() / "sub" / "x.safetensors") in \
        merge_panel.preview_recipe(custom, *values)[1]
