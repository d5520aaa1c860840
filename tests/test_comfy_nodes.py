"""The ComfyUI nodes run on the tiny models inside the stand-in host, under torch.inference_mode() as ComfyUI
runs them: dataset tools, plan, training (Cancel leaves a resumable state and raises ComfyUI's interrupt; resume
finishes the run), merges with A1111 ratios, TE repair and the LoRA tools; files get new names, never overwrite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from comfy_standin import comfy_host
from PIL import Image
from safetensors import safe_open


@pytest.fixture(scope="module")
def host(tmp_path_factory, tiny_fp32_checkpoints):
    """The pack in the stand-in host: tiny SD1 A and a perturbed copy B in checkpoints, a dataset in input/ds."""
    from safetensors.torch import save_file

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the box is shared: one thread is several times faster than two fighting
    base = tmp_path_factory.mktemp("comfy_base")
    with comfy_host(base) as h:
        ckpts = base / "models" / "checkpoints"
        os.symlink(tiny_fp32_checkpoints["sd1"], ckpts / "tiny-a.safetensors")
        gen = torch.Generator().manual_seed(1)
        save_file({k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
                   for k, v in tensors(ckpts / "tiny-a.safetensors").items()}, ckpts / "tiny-b.safetensors")
        folder = base / "input" / "ds" / "2_sdtdemo"
        folder.mkdir(parents=True)
        for i in range(4):
            im = Image.new("RGB", (64, 64), (200, 30, 30))
            im.paste((255, 255, 255), (8 * i, 8, 8 * i + 16, 24))
            im.save(folder / f"{i:03d}.png")
            (folder / f"{i:03d}.txt").write_text("red square, solid, red square", encoding="utf-8")
        yield h
    torch.set_num_threads(before)


def tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


class Patcher:
    """A MODEL/CLIP as the stand-in LoRA loader sees it: clone() and add_patches() as ComfyUI's ModelPatcher."""

    def __init__(self, patches=None):
        self.patches = patches or []

    def clone(self):
        return Patcher(list(self.patches))

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        self.patches.append((set(patches), strength_patch))
        return list(patches)


def test_dataset_edit_plan_and_train_with_cancel_and_resume(host):
    import comfy.model_management as mm
    import server

    out = host.run("SdtuneDataset", folder="ds", caption_extension=".txt", resolution=64, lint=True)
    dataset, report = out.args
    assert dataset.path == host.base / "input" / "ds" and "4 images, 4 captioned" in report
    assert "red square" in report and out.ui.as_dict()["text"] == (report,)
    out = host.run("SdtuneEditTags", dataset=dataset, trigger_word="sdtdemo", remove="solid",
                   replace="red square=crimson square", where="", dedupe=True)
    caption = (dataset.path / "2_sdtdemo" / "000.txt").read_text(encoding="utf-8")
    assert caption == "sdtdemo, crimson square" and "4 captions changed" in out.args[1]
    assert list((dataset.path / ".sdtune_backups").iterdir())

    plan, text = host.run("SdtunePlan", dataset=dataset, ckpt_name="tiny-a.safetensors", method="lora",
                          optimizer="auto").args
    assert "Plan for" in text and plan.config["output_name"] == "sdtdemo"

    fields = dict(plan=plan, lora_name="", rank=4, alpha=2.0, unet_lr=0.0, text_encoder_lr=0.0,
                  text_encoder="on", epochs=1, resolution=64, resume=False, strength_model=1.0, strength_clip=1.0)
    mm.calls.clear()
    host.on_progress = lambda done, total: mm.interrupt_current_processing(True) if done == 2 else None
    with pytest.raises(mm.InterruptProcessingException):
        host.run("SdtuneTrainLora", unique_id="7", **fields)
    host.on_progress = None
    run = host.base / "models" / "loras" / "sdtune" / "sdtdemo"
    assert (run / "sdtdemo-state" / "train_state.json").is_file()
    assert (run / "sdtdemo-step00000002.safetensors").is_file() and not (run / "sdtdemo.safetensors").exists()
    assert not mm.processing_interrupted()  # ComfyUI's flag is cleared by the raise, as its own nodes do
    assert mm.calls[:2] == ["unload_all_models", "soft_empty_cache"] and mm.calls[-1] == "soft_empty_cache"

    model, clip = Patcher(), Patcher()
    out = host.run("SdtuneTrainLora", unique_id="7", **dict(fields, resume=True, strength_model=0.8, strength_clip=0.5),
                   model=model, clip=clip)
    name, curve, model2, clip2, report = out.args
    assert name == "sdtune/sdtdemo/sdtdemo.safetensors" and (run / "sdtdemo.safetensors").is_file()
    assert curve.dtype == torch.float32 and curve.shape[0] == 1 and curve.shape[-1] == 3 and 0 <= curve.min()
    assert curve.max() <= 1 and curve.std() > 0
    (keys, strength), = model2.patches
    assert strength == 0.8 and clip2.patches[0][1] == 0.5 and model.patches == []
    assert any(k.startswith("lora_unet_") for k in keys) and any(k.startswith("lora_te_") for k in keys)
    meta_steps = safe_open(str(run / "sdtdemo.safetensors"), "pt").metadata()["ss_steps"]
    assert int(meta_steps) == plan.steps.batches_per_epoch and "wrote sdtune/sdtdemo/sdtdemo.safetensors" in report
    assert {n for n, _, _ in host.progress} == {"7"}
    losses = [d for e, d, _ in server.PromptServer.instance.messages if e == "sdtune.train"]
    assert losses and losses[-1]["node"] == "7" and "loss" in losses[-1]


def test_a_new_run_never_reuses_a_folder_and_resume_needs_a_stopped_run(host):
    run_folder = host.pack_module("train")._run_folder
    loras = host.base / "models" / "loras" / "sdtune"
    (loras / "taken").mkdir(parents=True)
    assert run_folder("taken", False) == loras / "taken_00001"
    with pytest.raises(Exception, match="no stopped run of taken"):
        run_folder("taken", True)
    with pytest.raises(Exception, match="lora_name"):
        run_folder("../up", False)


def test_merge_uses_a1111_ratios_and_never_overwrites(host):
    ckpts = host.base / "models" / "checkpoints"
    a, b = tensors(ckpts / "tiny-a.safetensors"), tensors(ckpts / "tiny-b.safetensors")
    fields = dict(model_a="tiny-a.safetensors", model_b="tiny-b.safetensors", model_c="none", method="weighted_sum",
                  alpha=0.3, beta=0.0, text_encoder="keep A", vae="merge", blocks="", blocks_beta="", seed=0,
                  dtype="fp32", prune=False, output_name="sdtune/merged")
    name, report = host.run("SdtuneMergeCheckpoints", **fields).args
    assert name == "sdtune/merged.safetensors" and report.startswith("wrote sdtune/merged.safetensors")
    merged = tensors(ckpts / name)
    unet = next(k for k in merged if k.startswith("model.diffusion_model.") and k.endswith("proj_in.weight"))
    te = next(k for k in merged if k.startswith("cond_stage_model.") and k.endswith("q_proj.weight"))
    torch.testing.assert_close(merged[unet], 0.7 * a[unet] + 0.3 * b[unet])  # alpha = the weight of B
    assert torch.equal(merged[te], a[te])
    again, _ = host.run("SdtuneMergeCheckpoints", **dict(fields, method="add_difference", model_c="tiny-a.safetensors",
                                                         blocks="GRAD_V")).args
    assert again == "sdtune/merged_00001.safetensors" and (ckpts / again).is_file()
    with pytest.raises(ValueError, match="blocks: 3 values given; sd1 needs 26"):  # the core's words, as a ValueError
        host.run("SdtuneMergeCheckpoints", **dict(fields, blocks="0.1, 0.2, 0.3"))
    assert not (ckpts / "sdtune" / "merged_00002.safetensors").exists()


def test_te_override_and_blend(host):
    ckpts = host.base / "models" / "checkpoints"
    a, b = tensors(ckpts / "tiny-a.safetensors"), tensors(ckpts / "tiny-b.safetensors")
    name, _ = host.run("SdtuneTeOverride", model="tiny-a.safetensors", donor="tiny-b.safetensors", te="both",
                       position_ids="reset", output_name="fixed").args
    over = tensors(ckpts / name)
    te = next(k for k in over if k.startswith("cond_stage_model.") and k.endswith("fc1.weight"))
    unet = next(k for k in over if k.startswith("model.diffusion_model."))
    assert torch.equal(over[te], b[te]) and torch.equal(over[unet], a[unet])
    name, report = host.run("SdtuneTeBlend", model="tiny-a.safetensors", donor="tiny-b.safetensors", alpha=0.25,
                            layers="", te="both", output_name="blend").args
    torch.testing.assert_close(tensors(ckpts / name)[te], 0.75 * a[te] + 0.25 * b[te])
    assert name == "blend.safetensors" and "blended at alpha 0.25" in report


def test_lora_tools_extract_info_resize_merge_strip_and_bake(host):
    from lib_sdtune.networks.lora_info import inspect_lora

    loras = host.base / "models" / "loras"
    name, report = host.run("SdtuneLoraExtract", base="tiny-a.safetensors", tuned="tiny-b.safetensors", rank=4,
                            conv_rank=0, svd="exact", min_diff=0.01, output_name="x/extracted").args
    assert name == "x/extracted.safetensors" and "text encoder kept" in report
    info = inspect_lora(loras / name)
    assert info.rank == 4 and info.te_modules > 0 and info.base_model_version == "sd_v1"
    (report_json,) = host.run("SdtuneLoraInfo", lora_name=name).args
    assert '"rank": 4' in report_json
    resized, report = host.run("SdtuneLoraResize", lora_name=name, rank=2, dynamic="none", param=0.0,
                               output_name="x/small").args
    assert inspect_lora(loras / resized).rank == 2 and "mean share" in report
    merged, _ = host.run("SdtuneLoraMerge", lora_1=name, ratio_1=1.0, lora_2=resized, ratio_2=0.5, lora_3="none",
                         ratio_3=1.0, rank=0, dynamic="none", param=0.0, output_name="x/both").args
    assert inspect_lora(loras / merged).rank == 6  # exact concatenation of rank 4 and rank 2
    stripped, _ = host.run("SdtuneLoraTe", lora_name=name, text_encoder="strip", scale=0.5, unet_blocks="",
                           te="both", output_name="x/unet_only").args
    assert inspect_lora(loras / stripped).te_modules == 0
    pytest.importorskip("lib_sdtune.repair.diagnose")
    text, chart, report_json = host.run("SdtuneDiagnose", base="tiny-a.safetensors", model="none", lora=name,
                                        lora_strength=1.0, max_tags=4).args
    assert chart.shape[0] == 1 and chart.shape[-1] == 3 and '"kind": "lora"' in report_json and text
    baked, report = host.run("SdtuneLoraBake", ckpt_name="tiny-a.safetensors", lora_1=stripped, strength_1=1.0,
                             blocks_1="", lora_2="none", strength_2=1.0, lora_3="none", strength_3=1.0, dtype="keep",
                             output_name="baked").args
    assert baked == "baked.safetensors" and "modules baked" in report
    ckpts = host.base / "models" / "checkpoints"
    a, out = tensors(ckpts / "tiny-a.safetensors"), tensors(ckpts / baked)
    changed = {k for k in a if a[k].is_floating_point() and not torch.equal(a[k], out[k])}
    assert changed and all(k.startswith("model.diffusion_model.") for k in changed)  # U-Net only: TE was stripped


def test_wd14_node_tags_the_dataset(host):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from test_tags_wd14 import write_model

    write_model(host.base / "models" / "wd14_tagger" / "tiny")
    ds = host.base / "input" / "wd"
    (ds / "1_x").mkdir(parents=True)
    Image.new("RGB", (32, 32), (230, 20, 20)).save(ds / "1_x" / "red.png")
    dataset, _ = host.run("SdtuneDataset", folder=str(ds), caption_extension=".txt", resolution=512, lint=False).args
    out = host.run("SdtuneWd14Tag", dataset=dataset, tagger="tiny", threshold=0.35, character_threshold=0.85,
                   mode="append", exclude="watermark", max_tags=0)
    assert out.args[0] is dataset and "1 captions written" in out.args[1]
    tags = (ds / "1_x" / "red.txt").read_text(encoding="utf-8").split(", ")
    assert "red theme" in tags and "watermark" not in tags


def test_dataset_paths_are_confined_to_the_input_folder_and_configured_roots(host, tmp_path):
    import folder_paths

    with pytest.raises(ValueError, match="outside the allowed dataset folders"):
        host.run("SdtuneDataset", folder="../models", caption_extension=".txt", resolution=512, lint=False)
    with pytest.raises(ValueError, match="outside the allowed dataset folders"):
        host.run("SdtuneDataset", folder=str(tmp_path), caption_extension=".txt", resolution=512, lint=False)
    Image.new("RGB", (16, 16)).save(tmp_path / "img.png")
    folder_paths.add_model_folder_path("sdtune_datasets", str(tmp_path))  # extra_model_paths.yaml does this
    try:
        dataset, report = host.run("SdtuneDataset", folder=str(tmp_path), caption_extension=".txt", resolution=512,
                                   lint=False).args
        assert dataset.path == tmp_path.resolve() and "1 images" in report
    finally:
        del folder_paths.folder_names_and_paths["sdtune_datasets"]
