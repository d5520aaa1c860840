"""The real-size SD1.5 / SD2.1 / SDXL layouts load with no missing or unexpected key (meta device, no weights)."""

import json
from pathlib import Path

import pytest

from lib_sdtune.io.checkpoint import source_from_shapes
from lib_sdtune.models.hints import ModelHints
from lib_sdtune.models.loader import load_checkpoint

REF = Path(__file__).resolve().parent / "data" / "reference"

# parameter counts of the published models' diffusers components
EXPECTED = {
    "sd15": ("sd1", {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}),
    "sd21": ("sd2-v", {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840}),
    "sdxl_base": ("sdxl", {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                           "text_encoder_2": 694_659_840}),
}


@pytest.mark.compat
@pytest.mark.parametrize("name", list(EXPECTED))
def test_full_size_reference_layout_loads_cleanly_on_meta(name):
    shapes = json.loads((REF / f"{name}_keys.json").read_text())
    hints = ModelHints(prediction_type="v_prediction" if name == "sd21" else None)
    model = load_checkpoint(source_from_shapes(shapes), hints=hints)
    arch, params = EXPECTED[name]
    assert model.arch.architecture == arch
    assert model.report.missing_keys == []
    assert model.report.unexpected_keys == []
    assert {k: sum(p.numel() for p in m.parameters()) for k, m in model.modules.items()} == params
    # every other checkpoint key is a documented extra: OpenCLIP's logit_scale, and for SD2 the
    # last OpenCLIP layer and projection, which SD2's penultimate-layer text encoder never uses
    ignored = set(model.report.ignored_keys)
    if name == "sd15":
        assert ignored == set()
    elif name == "sdxl_base":
        assert ignored == {"conditioner.embedders.1.model.logit_scale"}
    else:
        assert ignored == {k for k in shapes if k.endswith(("logit_scale", "text_projection"))
                           or ".resblocks.23." in k}
