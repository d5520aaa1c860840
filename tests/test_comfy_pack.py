"""The node pack as ComfyUI loads it (package import of the repo root, comfy_entrypoint, V3 schemas): ids, categories,
tooltips, execute signatures, the example workflows, and the shared helpers (names, Cancel bridge, IMAGE)."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from comfy_standin import PACK_ROOT, comfy_host

WORKFLOWS = sorted((PACK_ROOT / "comfy_nodes" / "workflows").glob("*.json"))
# the files the example workflows name, which a user substitutes (comfy_nodes/workflows/README.md)
PLACEHOLDERS = {"checkpoints": ("sd15_base.safetensors", "sd15_finetune.safetensors"),
                "loras": ("my_lora.safetensors",)}
# output types of the ComfyUI built-in nodes the workflows use (ComfyUI v0.8.0 nodes.py)
BUILTIN_OUTPUTS = {"CheckpointLoaderSimple": ("MODEL", "CLIP", "VAE"), "LoraLoader": ("MODEL", "CLIP"),
                   "CLIPTextEncode": ("CONDITIONING",), "EmptyLatentImage": ("LATENT",), "KSampler": ("LATENT",),
                   "VAEDecode": ("IMAGE",), "SaveImage": (), "PreviewImage": ()}


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_pack")
    for kind, names in PLACEHOLDERS.items():
        for name in names:
            (base / "models" / kind).mkdir(parents=True, exist_ok=True)
            (base / "models" / kind / name).write_bytes(b"")
    tagger = base / "models" / "wd14_tagger" / "wd-swinv2-tagger-v3"
    tagger.mkdir(parents=True)
    (tagger / "model.onnx").write_bytes(b"")
    (tagger / "selected_tags.csv").write_text("tag_id,name,category,count\n", encoding="utf-8")
    with comfy_host(base) as h:
        yield h


def test_the_pack_registers_every_node_with_prefixed_ids_categories_and_tooltips(host):
    assert len(host.nodes) >= 16
    for node_id, cls in host.nodes.items():
        schema = host.schema(node_id)
        assert node_id.startswith("Sdtune") and cls.__name__ == node_id
        assert schema.category.startswith("sdtune/") and schema.display_name.endswith("(sdtune)")
        assert len(schema.description) > 40, node_id
        for spec in schema.inputs:
            assert spec.tooltip and len(spec.tooltip) > 8, f"{node_id}.{spec.id} has no tooltip"
        # ComfyUI calls execute with the inputs as keywords; optional ones may be left out
        params = inspect.signature(cls.execute).parameters
        assert list(params) == [i.id for i in schema.inputs], node_id
        for spec in schema.inputs:
            assert (params[spec.id].default is not inspect.Parameter.empty) == bool(spec.optional), spec.id
        assert schema.is_output_node, f"{node_id} shows a report: it must run without a node after it"


def test_ratio_tooltips_state_the_a1111_semantics(host):
    for node_id, field in (("SdtuneMergeCheckpoints", "alpha"), ("SdtuneTeBlend", "alpha")):
        spec = next(i for i in host.schema(node_id).inputs if i.id == field)
        assert "A1111" in spec.tooltip and "0 keeps" in spec.tooltip
    alpha = next(i for i in host.schema("SdtuneMergeCheckpoints").inputs if i.id == "alpha")
    assert "ModelMergeSimple" in alpha.tooltip and "opposite" in alpha.tooltip


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_example_workflows_match_the_schemas(host, path):
    prompt = json.loads(path.read_text(encoding="utf-8"))
    ours = 0
    for key, node in prompt.items():
        kind = node["class_type"]
        inputs = node["inputs"]
        literal = {k: v for k, v in inputs.items() if not isinstance(v, list)}
        for name, link in ((k, v) for k, v in inputs.items() if isinstance(v, list)):
            source = prompt[link[0]]["class_type"]
            outputs = ([o.io_type for o in host.schema(source).outputs] if source in host.nodes
                       else BUILTIN_OUTPUTS[source])
            assert link[1] < len(outputs), f"{key}.{name}: {source} has no output {link[1]}"
            if kind in host.nodes:
                want = next(i for i in host.schema(kind).inputs if i.id == name).io_type
                assert outputs[link[1]] == want, f"{key}.{name}: {outputs[link[1]]} into {want}"
        if kind in host.nodes:
            ours += 1
            host.check_inputs(kind, {**literal, **{k: None for k in inputs if k not in literal}})
        else:
            assert kind in BUILTIN_OUTPUTS, f"{kind}: the workflows use only sdtune and built-in nodes"
    assert ours >= 2


def test_every_area_has_an_example_workflow():
    assert {p.stem for p in WORKFLOWS} >= {"dataset", "train", "merge", "repair", "lora_tools"}
    used = set()
    for path in WORKFLOWS:
        used |= {n["class_type"] for n in json.loads(path.read_text(encoding="utf-8")).values()}
    assert used >= {"SdtuneDataset", "SdtuneWd14Tag", "SdtuneEditTags", "SdtunePlan", "SdtuneTrainLora",
                    "SdtuneMergeCheckpoints", "SdtuneTeOverride", "SdtuneTeBlend", "SdtuneLoraBake",
                    "SdtuneLoraMerge", "SdtuneLoraResize", "SdtuneLoraExtract", "SdtuneLoraTe", "SdtuneLoraInfo",
                    "SdtuneDiagnose"}


def test_cancel_pressed_inside_the_progress_hook_stops_the_core_and_raises_comfys_interrupt(host):
    import comfy.model_management as mm

    shared = host.pack_module("shared")
    progress = shared.HostProgress("9")
    progress.progress(1, 10, {"loss": 0.5})
    assert host.progress[-1] == ("9", 1, 10) and not progress.cancelled()
    # Cancel lands between the bridge's own check and the hook's: the hook raises, the bridge swallows it
    host.on_progress = lambda done, total: None
    mm.interrupt_current_processing(True)
    progress.interrupted = False
    hook_raised = []
    try:
        mm_check = mm.processing_interrupted
        mm.processing_interrupted = lambda: False  # the check ran just before the click
        progress.progress(2, 10)
        hook_raised.append(progress.interrupted)
    finally:
        mm.processing_interrupted = mm_check
    assert hook_raised == [True] and progress.cancelled() and not mm.processing_interrupted()
    with pytest.raises(mm.InterruptProcessingException):
        progress.raise_if_interrupted()
    with pytest.raises(mm.InterruptProcessingException):  # a core that stops on cancel with an error
        with shared.core_errors(progress):
            raise shared.SdtuneError("merge cancelled; nothing was written")
    with pytest.raises(ValueError, match="^bad input, named$"):
        with shared.core_errors(shared.HostProgress()):
            raise shared.SdtuneError("bad input, named")


def test_output_names_are_new_confined_and_listed_as_comfy_lists_them(host):
    shared = host.pack_module("shared")
    path, name = shared.new_output("loras", "sdtune/x.safetensors")
    assert name == "sdtune/x.safetensors" and path.parent.is_dir() and not path.exists()
    path.write_bytes(b"")
    assert shared.new_output("loras", "sdtune/x")[1] == "sdtune/x_00001.safetensors"
    for bad in ("../escape", "", "a/../../b", "semi;colon"):
        with pytest.raises(shared.SdtuneError):
            shared.new_output("loras", bad)
    assert shared.listed_name("loras", path) == "sdtune/x.safetensors"


def test_png_becomes_a_comfy_image(host):
    from PIL import Image

    shared = host.pack_module("shared")
    buf = __import__("io").BytesIO()
    Image.new("RGB", (5, 3), (255, 0, 0)).save(buf, "PNG")
    image = shared.png_to_image(buf.getvalue())
    assert image.shape == (1, 3, 5, 3) and image.dtype == torch.float32
    assert torch.equal(image[0, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
