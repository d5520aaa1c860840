"""Architecture detection from keys and shapes, and clear refusals for other model families."""

import json
from pathlib import Path

import pytest

from lib_sdtune.errors import SdtuneError, UnsupportedModelError
from lib_sdtune.io.detect import detect_architecture

REF = Path(__file__).resolve().parent / "data" / "reference"


def _ref(name):
    return {k: tuple(v) for k, v in json.loads((REF / f"{name}_keys.json").read_text()).items()}


@pytest.mark.parametrize("name,family,n_components", [("sd15", "sd1", 3), ("sd21", "sd2", 3), ("sdxl_base", "sdxl", 4)])
def test_real_layouts_are_detected(name, family, n_components):
    info = detect_architecture(_ref(name))
    assert info.family == family and len(info.components) == n_components and info.in_channels == 4


def test_sd2_prediction_is_left_to_flag_yaml_or_test():
    assert detect_architecture(_ref("sd21")).prediction_type == "undecided"
    assert detect_architecture(_ref("sd15")).prediction_type == "epsilon"


def test_sdxl_v_pred_marker_key_means_v_prediction():
    shapes = dict(_ref("sdxl_base"), v_pred=())
    info = detect_architecture(shapes)
    assert info.prediction_type == "v_prediction" and info.architecture == "sdxl"


def test_inpainting_unet_is_a_variant_and_sd2_inpainting_is_eps():
    shapes = _ref("sd15")
    shapes["model.diffusion_model.input_blocks.0.0.weight"] = (320, 9, 3, 3)
    assert detect_architecture(shapes).variant == "inpaint"
    shapes = _ref("sd21")
    shapes["model.diffusion_model.input_blocks.0.0.weight"] = (320, 9, 3, 3)
    assert detect_architecture(shapes).prediction_type == "epsilon"


def test_refiner_is_told_apart_by_its_single_openclip_encoder():
    shapes = {k: v for k, v in _ref("sdxl_base").items() if not k.startswith("conditioner.embedders.0.")}
    shapes = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v for k, v in shapes.items()}
    info = detect_architecture(shapes)
    assert info.family == "sdxl-refiner" and set(info.components) == {"unet", "vae", "text_encoder_2"}


def test_unet_only_real_size_file_is_detected_from_context_width():
    unet_only = {k: v for k, v in _ref("sd15").items() if k.startswith("model.diffusion_model.")}
    assert detect_architecture(unet_only).family == "sd1"


@pytest.mark.parametrize("keys,named", [
    (["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"], "Stable Diffusion 3"),
    (["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"], "Flux"),
    (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], "LoRA"),
    (["encoder.conv_in.weight", "decoder.conv_in.weight"], "standalone VAE"),
    (["string_to_param.*"], "textual-inversion embedding"),
    (["conv_in.weight", "down_blocks.0.resnets.0.conv1.weight"], "diffusers-format UNet"),
    (["foo.bar"], "no known model layout"),
])
def test_other_families_are_refused_with_what_was_found(keys, named):
    with pytest.raises(UnsupportedModelError, match=named) as e:
        detect_architecture({k: (1,) for k in keys}, "x.safetensors")
    assert "x.safetensors" in str(e.value) and "SDXL" in str(e.value)


def test_unet_only_tiny_file_asks_for_more_information():
    shapes = {"model.diffusion_model.input_blocks.0.0.weight": (32, 4, 3, 3),
              "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (32, 40)}
    with pytest.raises(SdtuneError, match="cannot tell SD1 from SD2"):
        detect_architecture(shapes)
