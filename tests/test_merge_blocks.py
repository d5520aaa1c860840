"""The block-weight table holds against the real SD1.5, SD2.1 and SDXL key lists, and presets/lists resolve."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from lib_sdtune.errors import SdtuneError
from lib_sdtune.merge.blocks import (
    PRESETS,
    SD_SLOTS,
    SDXL_SLOTS,
    UNET_SLOT_RULES,
    layout_for,
    parse_blocks,
    resolve_blocks,
    unet_slot,
)
from lib_sdtune.merge.plan import Ratios, component_of

REF = Path(__file__).resolve().parent / "data" / "reference"
CASES = {"sd15_keys.json": "sd1", "sd21_keys.json": "sd2", "sdxl_base_keys.json": "sdxl"}


def reference_keys(name: str) -> list[str]:
    return list(json.loads((REF / name).read_text()))


@pytest.mark.parametrize("name", list(CASES))
def test_every_unet_key_matches_exactly_one_rule_and_every_slot_is_used(name):
    family = CASES[name]
    layout = layout_for(family)
    unet = [k for k in reference_keys(name) if k.startswith("model.diffusion_model.")]
    assert unet
    for key in unet:
        assert sum(1 for pattern, _ in UNET_SLOT_RULES if pattern.match(key)) == 1, key
    counts = Counter(unet_slot(k, layout) for k in unet)
    slots = SDXL_SLOTS if layout == "sdxl" else SD_SLOTS
    assert set(counts) == set(slots[1:])  # every U-Net slot has keys; BASE has none of the U-Net
    assert sum(counts.values()) == len(unet)


@pytest.mark.parametrize("name", list(CASES))
def test_slot_contents_are_the_expected_layers(name):
    family = CASES[name]
    layout = layout_for(family)
    unet = [k for k in reference_keys(name) if k.startswith("model.diffusion_model.")]
    by_slot: dict[str, list[str]] = {}
    for k in unet:
        by_slot.setdefault(unet_slot(k, layout), []).append(k)
    last = "OUT08" if layout == "sdxl" else "OUT11"
    assert "model.diffusion_model.time_embed.0.weight" in by_slot["IN00"]
    assert "model.diffusion_model.input_blocks.0.0.weight" in by_slot["IN00"]
    assert "model.diffusion_model.out.2.weight" in by_slot[last]
    assert all(".middle_block." in k for k in by_slot["MID"])
    if family == "sdxl":
        assert "model.diffusion_model.label_emb.0.0.weight" in by_slot["IN00"]
        # levels 1 and 2 hold transformers of depth 2 and 10: IN07 (depth 10) is the biggest input slot
        assert max((s for s in by_slot if s.startswith("IN")), key=lambda s: len(by_slot[s])) in ("IN07", "IN08")
        assert len(by_slot["IN03"]) == 2 and len(by_slot["IN06"]) == 2  # the downsample convs
    else:
        assert len(by_slot["IN03"]) == 2 and len(by_slot["IN06"]) == 2 and len(by_slot["IN09"]) == 2
        assert len(by_slot["IN10"]) == len(by_slot["IN11"])  # plain res blocks at the lowest level
        assert len(by_slot["OUT00"]) == len(by_slot["OUT01"])


@pytest.mark.parametrize("name", list(CASES))
def test_keys_outside_the_unet_are_text_encoder_or_vae_and_follow_base(name):
    family = CASES[name]
    blocks = resolve_blocks([0.25] + [1.0] * 25, family)
    ratios = Ratios(0.5, blocks=blocks)
    for key in reference_keys(name):
        comp = component_of(key, family)
        if key.startswith("model.diffusion_model."):
            assert comp == "unet"
            continue
        assert comp in ("te", "vae"), key
        assert unet_slot(key, layout_for(family)) is None
        assert ratios.for_key(comp, None) == 0.25  # BASE covers text encoders and VAE


def test_component_ratios_override_blocks_and_base():
    blocks = resolve_blocks("GRAD_V", "sd1")
    r = Ratios(0.5, unet=0.9, te=0.1, vae=0.0, blocks=blocks)
    assert r.for_key("unet", "IN00") == 1.0 and r.for_key("unet", "MID") == 0.0  # blocks beat the U-Net ratio
    assert r.for_key("te", None) == 0.1 and r.for_key("vae", None) == 0.0
    assert Ratios(0.5, unet=0.9).for_key("unet", "IN05") == 0.9
    assert Ratios(0.5).for_key("other", None) == 0.5


def test_sdxl_accepts_20_21_or_26_values_and_names_the_field_otherwise():
    assert list(resolve_blocks([0.0] * 20, "sdxl")) == list(SDXL_SLOTS)
    with_vae = resolve_blocks([0.0] * 20 + [0.7], "sdxl")
    assert with_vae["VAE"] == 0.7 and Ratios(0.5, blocks=with_vae).for_key("vae", None) == 0.7
    converted = resolve_blocks([i / 100 for i in range(26)], "sdxl")  # supermerger: IN09-11, OUT09-11 dropped
    assert converted["IN08"] == 0.09 and converted["MID"] == 0.13 and converted["OUT08"] == 0.22
    with pytest.raises(SdtuneError, match=r"^blocks: 25 values given; SDXL needs 20"):
        resolve_blocks([0.0] * 25, "sdxl")
    with pytest.raises(SdtuneError, match=r"^blocks_beta: 20 values given; sd1 needs 26"):
        resolve_blocks([0.0] * 20, "sd1", "blocks_beta")
    with pytest.raises(SdtuneError, match=r"^blocks: unknown preset 'NOPE'"):
        resolve_blocks("NOPE", "sd1")
    with pytest.raises(SdtuneError, match=r"^blocks: value 3 \(5.0\) is outside"):
        resolve_blocks([0.0, 0.0, 5.0] + [0.0] * 23, "sd1")


def test_presets_match_the_published_values():
    assert all(len(v) == 26 and all(0.0 <= x <= 1.0 for x in v) for v in PRESETS.values())
    # first values of supermerger's mbwpresets (scripts/mbwpresets.txt)
    assert PRESETS["GRAD_V"][:4] == pytest.approx([0, 1, 0.9166666667, 0.8333333333])
    assert PRESETS["SMOOTHSTEP"][:4] == pytest.approx([0, 0, 0.00506365740740741, 0.0196759259259259])
    assert PRESETS["COSINE"][:3] == pytest.approx([0, 1, 0.995722430686905])
    assert PRESETS["RING08_SOFT"] == tuple([0.0] * 6 + [0.5, 1, 1, 1, 0.5] + [0.0] * 5 + [0.5, 1, 1, 1, 0.5]
                                           + [0.0] * 5)
    assert PRESETS["MID12_50"].count(0.5) == 14
    assert resolve_blocks("grad_v", "sd2")["OUT11"] == 1.0


def test_sdxl_plan_on_the_real_layout_gives_each_key_its_block_te_and_vae_ratio():
    import torch

    from lib_sdtune.merge.plan import InputLayout, build_plan

    shapes = {k: tuple(v) for k, v in json.loads((REF / "sdxl_base_keys.json").read_text()).items()}
    layout = InputLayout("A", {k: (torch.float16, s) for k, s in shapes.items()})
    values = [0.05] + [i / 100 + 0.1 for i in range(19)] + [0.9]  # BASE, 19 U-Net slots, VAE
    blocks = resolve_blocks(values, "sdxl")
    plans, report = build_plan([layout, layout], "sdxl", Ratios(0.5, blocks=blocks), None, torch.float16)
    assert len(plans) == len(shapes) and not report.kept_from_a
    for p in plans:
        comp = component_of(p.name, "sdxl")
        expected = {"te": 0.05, "vae": 0.9}.get(comp) if comp != "unet" else blocks[unet_slot(p.name, "sdxl")]
        assert p.action == "merge" and p.alpha == expected, p.name


def test_block_weights_as_typed_by_a_user_in_any_face():
    """One parser for the CLI (--blocks, --unet-blocks), the WebUI and the ComfyUI nodes."""
    assert parse_blocks("") is None and parse_blocks(None) is None and parse_blocks(" none ") is None
    assert parse_blocks("-") is None and parse_blocks("GRAD_V") == "GRAD_V"
    assert parse_blocks("0, 0.5,1") == (0.0, 0.5, 1.0) and parse_blocks("0.5") == (0.5,)
    with pytest.raises(SdtuneError, match="--blocks: expected comma-separated numbers or a preset name"):
        parse_blocks("1,x", "--blocks")
