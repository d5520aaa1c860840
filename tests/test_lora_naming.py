"""sdtune's LoRA module names equal sd-scripts' exactly, map to original checkpoint keys and back, and
do not depend on the installed transformers' CLIP layout or on the model's width."""

import functools
import json
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from lib_sdtune.errors import SdtuneError
from lib_sdtune.io.checkpoint import open_checkpoint, source_from_shapes
from lib_sdtune.models.hints import ModelHints
from lib_sdtune.models.loader import load_checkpoint
from lib_sdtune.networks.naming import LoraNameMap, LoraTarget, lora_prefix, lora_targets

REF = Path(__file__).resolve().parent / "data" / "reference"
FAMILY = {"sd15": "sd1", "sd21": "sd2", "sdxl_base": "sdxl"}
CASES = [(name, conv) for name in FAMILY for conv in (False, True)]
TRAINED = ["unet", "text_encoder", "text_encoder_2"]


def _case_id(case) -> str:
    return case[0] + ("_conv" if case[1] else "")


@functools.cache
def reference_modules() -> dict:
    """sd-scripts' module names -> {"type", "down", "up"} (rank 4), per model and variant."""
    return json.loads((REF / "kohya_lora_modules.json").read_text())


@functools.cache
def checkpoint_shapes(name: str) -> dict:
    return json.loads((REF / f"{name}_keys.json").read_text())


@functools.cache
def full_size(name: str) -> dict[str, nn.Module]:
    """The real-size UNet and text encoders on the meta device, built as test_loader_fullsize does."""
    torch.set_num_threads(1)
    hints = ModelHints(prediction_type="v_prediction" if name == "sd21" else None)
    return load_checkpoint(source_from_shapes(checkpoint_shapes(name)), hints=hints, components=TRAINED).modules


def targets(name: str, conv: bool) -> list[LoraTarget]:
    return lora_targets(full_size(name), FAMILY[name], conv=conv)


@pytest.mark.compat
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_names_layer_types_and_rank4_shapes_equal_sd_scripts_reference(case):
    name, conv = case
    ref = reference_modules()[_case_id(case)]
    got = {t.name: t for t in targets(name, conv)}
    assert len(got) == len(ref)  # no name produced twice
    assert set(got) == set(ref)
    assert {n: t.layer_type for n, t in got.items()} == {n: r["type"] for n, r in ref.items()}
    assert {n: [list(s) for s in t.lora_shapes(4)] for n, t in got.items()} == {
        n: [r["down"], r["up"]] for n, r in ref.items()}


@pytest.mark.compat
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_every_original_key_is_a_reference_checkpoint_key_of_the_layers_shape(case):
    name, conv = case
    shapes = checkpoint_shapes(name)
    for t in targets(name, conv):
        assert t.original_key.endswith((".weight", ".in_proj_weight")) and t.original_key in shapes, t
        shape = list(shapes[t.original_key])
        if t.original_rows is not None:  # q/k/v rows of OpenCLIP's fused in_proj_weight
            start, stop = t.original_rows
            assert stop - start == t.out_features and shape == [3 * t.out_features, t.in_features], t
            assert t.original_key.endswith(".attn.in_proj_weight")
        elif t.layer_type == "Conv2d":
            assert shape == [t.out_features, t.in_features, *t.kernel_size], t
        else:
            assert shape == [t.out_features, t.in_features], t


@pytest.mark.compat
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kohya_name_to_original_key_and_back_is_the_identity(case):
    name, conv = case
    found = targets(name, conv)
    names = LoraNameMap(found)
    assert len(names) == len(found)
    for t in found:
        key = names.original_key(t.name)
        assert names.kohya_name(key, t.original_rows) == t.name
        assert t in names.targets_for_key(key)
    fused = [t for t in found if t.original_rows is not None]
    # OpenCLIP text encoders (SD2, SDXL TE2) fuse q/k/v: three names per in_proj_weight, one per rows
    assert len(fused) == {"sd15": 0, "sd21": 3 * 23, "sdxl_base": 3 * 32}[name]
    for t in fused:
        assert {u.name.rsplit("_", 2)[-2] for u in names.targets_for_key(t.original_key)} == {"q", "k", "v"}
        with pytest.raises(KeyError):
            names.kohya_name(t.original_key)  # which of q/k/v is ambiguous without rows


class _Nested(nn.Module):
    """The transformers 4.x layout around a flattened CLIP text model (`text_model.encoder...`)."""

    def __init__(self, flat: nn.Module):
        super().__init__()
        self.text_model = flat


class _Flat(nn.Module):
    """The transformers >= 5.6 `CLIPTextModel` layout (`encoder...` at the top)."""

    def __init__(self, nested: nn.Module):
        super().__init__()
        self.embeddings = nested.text_model.embeddings
        self.encoder = nested.text_model.encoder
        self.final_layer_norm = nested.text_model.final_layer_norm


def _other_layout(te: nn.Module) -> nn.Module:
    return _Flat(te) if hasattr(te, "text_model") else _Nested(te)


@pytest.mark.compat
@pytest.mark.parametrize("name", ["sd15", "sd21", "sdxl_base"])
def test_text_encoder_names_are_the_same_with_or_without_the_text_model_level(name):
    modules = {k: m for k, m in full_size(name).items() if k.startswith("text_encoder")}
    other = {k: _other_layout(m) for k, m in modules.items()}
    here, there = lora_targets(modules, FAMILY[name]), lora_targets(other, FAMILY[name])
    strip = [(t.name, t.original_key, t.original_rows, t.layer_type, t.in_features, t.out_features)
             for t in here]
    assert strip == [(t.name, t.original_key, t.original_rows, t.layer_type, t.in_features, t.out_features)
                     for t in there]
    assert all("_text_model_encoder_layers_" in t.name for t in here)
    for targets_, mods in ((here, modules), (there, other)):
        for t in targets_:  # module_path names the layer as each layout holds it
            assert isinstance(mods[t.component].get_submodule(t.module_path), nn.Linear)
    for a, b in zip(here, there):  # the live paths do differ by the `text_model.` level
        assert a.module_path != b.module_path
        assert a.module_path.removeprefix("text_model.") == b.module_path.removeprefix("text_model.")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_module_path_fetches_the_wrapped_layer_with_the_target_sizes(case):
    name, conv = case
    modules = full_size(name)
    for t in targets(name, conv):
        layer = modules[t.component].get_submodule(t.module_path)
        assert type(layer).__name__ == t.layer_type
        if isinstance(layer, nn.Conv2d):
            assert (layer.in_channels, layer.out_channels, tuple(layer.kernel_size)) == (
                t.in_features, t.out_features, t.kernel_size)
        else:
            assert (layer.in_features, layer.out_features, t.kernel_size) == (t.in_features, t.out_features, None)


def test_only_convs_larger_than_1x1_use_conv_dim():
    found = targets("sdxl_base", True)
    assert {t.name.rsplit("_", 2)[-1] for t in found if t.uses_conv_dim} == {"2", "3", "op", "conv"}
    assert not any(t.uses_conv_dim for t in found if "skip_connection" in t.name or "emb_layers" in t.name)


def test_sdxl_full_size_name_map_takes_under_two_seconds():
    modules = full_size("sdxl_base")
    start = time.perf_counter()
    LoraNameMap(lora_targets(modules, "sdxl", conv=True))
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("arch, name", [("sd1", "sd15"), ("sd2", "sd21"), ("sdxl", "sdxl_base")])
def test_tiny_checkpoints_give_the_full_size_name_sets_and_layer_types(tiny_checkpoints, arch, name):
    torch.set_num_threads(1)
    path = tiny_checkpoints[arch]
    model = load_checkpoint(path, components=TRAINED)
    keys = set(open_checkpoint(path).shapes())
    for conv in (False, True):
        ref = reference_modules()[name + ("_conv" if conv else "")]
        found = lora_targets(model.modules, model.arch.family, conv=conv)
        assert {t.name: t.layer_type for t in found} == {n: r["type"] for n, r in ref.items()}
        assert {t.original_key for t in found} <= keys


def test_refiner_names_its_only_text_encoder_lora_te_and_its_unet_in_the_sgm_tree(tiny_checkpoints):
    torch.set_num_threads(1)
    path = tiny_checkpoints["sdxl-refiner"]
    model = load_checkpoint(path, components=TRAINED)
    keys = set(open_checkpoint(path).shapes())
    found = lora_targets(model.modules, "sdxl-refiner", conv=True)
    te = [t for t in found if t.component == "text_encoder_2"]
    assert len(te) == 32 * 6 and all(t.name.startswith("lora_te_text_model_encoder_layers_") for t in te)
    assert all(t.original_key.startswith("conditioner.embedders.0.model.transformer.resblocks.") for t in te)
    unet = [t.name for t in found if t.component == "unet"]
    assert unet and all(n.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_",
                                      "lora_unet_output_blocks_")) for n in unet)
    assert {t.original_key for t in found} <= keys
    names = LoraNameMap(found)
    assert all(names.kohya_name(t.original_key, t.original_rows) == t.name for t in found)


def test_text_encoder_prefix_follows_the_family_not_the_loaded_components():
    te2 = {"text_encoder_2": full_size("sdxl_base")["text_encoder_2"]}
    assert {t.name[:9] for t in lora_targets(te2, "sdxl")} == {"lora_te2_"}
    assert [lora_prefix(f, c) for f, c in [("sd1", "text_encoder"), ("sd2", "text_encoder"),
                                           ("sdxl", "text_encoder"), ("sdxl", "text_encoder_2"),
                                           ("sdxl-refiner", "text_encoder_2"), ("sdxl", "unet")]] == [
        "lora_te", "lora_te", "lora_te1", "lora_te2", "lora_te", "lora_unet"]


def test_unknown_family_missing_component_and_duplicate_names_are_refused():
    with pytest.raises(SdtuneError, match="unknown model family"):
        lora_targets({}, "sd3")
    with pytest.raises(SdtuneError, match="no 'text_encoder_2'"):
        lora_prefix("sd1", "text_encoder_2")
    t = LoraTarget("lora_te_x", "text_encoder", "x", "k.weight", "Linear", 4, 4)
    with pytest.raises(SdtuneError, match="share the LoRA name"):
        LoraNameMap([t, t])
