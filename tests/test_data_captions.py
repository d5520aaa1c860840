"""Captions per step: sd-scripts' order of operations, held to sd-scripts' own function as the oracle."""

from __future__ import annotations

import itertools
import random
import sys
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from lib_sdtune.data.captions import CaptionStep, captions_are_fixed, process_caption
from lib_sdtune.data.config import SubsetConfig

sys.path.insert(0, str(Path(__file__).parent / "data" / "reference"))
import sd_scripts_process_caption as oracle  # noqa: E402

CAPTION = "sks, 1girl, red hair;;;long hair, smile, outdoors, blue sky, tree"


def _ref(caption: str, sub: SubsetConfig, at: CaptionStep, replacements=None) -> str:
    """sd-scripts' process_caption on a fresh copy of the subset (it rewrites token_warmup_step)."""
    state = SimpleNamespace(current_epoch=at.epoch, current_step=at.step, max_train_steps=at.max_train_steps,
                            replacements=dict(replacements or {}))
    return oracle.process_caption(state, SimpleNamespace(**asdict(sub)), caption)


SETTINGS = [
    {},
    {"shuffle_caption": True},
    {"shuffle_caption": True, "keep_tokens": 2},
    {"shuffle_caption": True, "keep_tokens_separator": "|||"},
    {"caption_prefix": "masterpiece,", "caption_suffix": "best quality", "shuffle_caption": True, "keep_tokens": 1},
    {"caption_dropout_rate": 0.3, "shuffle_caption": True},
    {"caption_dropout_every_n_epochs": 2},
    {"caption_tag_dropout_rate": 0.4, "keep_tokens": 1},
    {"token_warmup_step": 10, "token_warmup_min": 2},
    {"token_warmup_step": 0.5, "shuffle_caption": True},
    {"secondary_separator": ";;;", "shuffle_caption": True},
    {"enable_wildcard": True, "shuffle_caption": True},
    {"caption_separator": ";", "shuffle_caption": True, "keep_tokens": 1},
]
CAPTIONS = [CAPTION, "a ||| b, c, d ||| e, f", "{red|blue} shirt, {{literal}}, hat\nsecond line, x", "solo", ""]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(s) or "plain")
def test_same_output_as_sd_scripts_for_the_same_random_stream(settings):
    sub = replace(SubsetConfig(), **settings)
    for caption, seed, (epoch, step) in itertools.product(CAPTIONS, range(6), [(1, 0), (2, 3), (3, 8), (4, 20)]):
        at = CaptionStep(epoch=epoch, step=step, max_train_steps=20)
        random.seed(seed)
        want = _ref(caption, sub, at)
        random.seed(seed)
        got = process_caption(caption, sub, random, at)  # the module has the same methods as a Random
        assert got == want, (caption, seed, epoch, step)


def test_replacements_match_sd_scripts():
    sub = SubsetConfig(shuffle_caption=True)
    for repl in ({"sks": "<tok1> <tok2>"}, {"": ["a photo", "a picture"]}):
        random.seed(3)
        want = _ref(CAPTION, sub, CaptionStep(), repl)
        random.seed(3)
        assert process_caption(CAPTION, sub, random, CaptionStep(), repl) == want


def test_order_prefix_first_then_dropout_then_fixed_tags_then_secondary_separator():
    sub = SubsetConfig(caption_prefix="trigger,", shuffle_caption=True, keep_tokens=1, secondary_separator=";;;")
    out = process_caption("a;;;b, c, d", sub, random.Random(0))
    assert out.startswith("trigger, ")  # the prefix ends with the separator, so it is the kept tag
    assert "a,b" in out  # the group stayed together through the shuffle, then became one ","
    sub = SubsetConfig(caption_prefix="trigger", caption_suffix="end")
    assert process_caption("a, b", sub, random.Random(0)) == "trigger a, b end"  # joined with a space
    sub = SubsetConfig(caption_prefix="trigger", caption_dropout_rate=1.0)
    assert process_caption("a, b", sub, random.Random(0)) == ""


def test_keep_tokens_separator_fixes_head_and_tail():
    sub = SubsetConfig(shuffle_caption=True, keep_tokens_separator="|||")
    outs = {process_caption("sks, girl ||| a, b, c, d ||| tail", sub, random.Random(s)) for s in range(20)}
    assert len(outs) > 1
    for out in outs:
        tags = out.split(", ")
        assert tags[:2] == ["sks", "girl"] and tags[-1] == "tail" and sorted(tags[2:-1]) == ["a", "b", "c", "d"]


def test_dropout_every_n_epochs_and_token_warmup():
    sub = SubsetConfig(caption_dropout_every_n_epochs=3)
    assert [process_caption("a, b", sub, random.Random(0), CaptionStep(epoch=e)) for e in (1, 2, 3, 6)] == \
        ["a, b", "a, b", "", ""]
    sub = SubsetConfig(token_warmup_step=10, token_warmup_min=1, keep_tokens=1)
    tags = "k, a, b, c, d, e"
    counts = [len(process_caption(tags, sub, random.Random(0), CaptionStep(step=s)).split(", ")) for s in (0, 5, 10)]
    assert counts == [2, 4, 6]  # kept tag + floor(step * (5 - 1) / 10) + 1 flexible tags


def test_seeded_and_tags_only_reordered():
    sub = SubsetConfig(shuffle_caption=True, keep_tokens=1)
    a = [process_caption(CAPTION, sub, random.Random(7)) for _ in range(2)]
    assert a[0] == a[1]
    assert sorted(a[0].split(", ")) == sorted(t.strip() for t in CAPTION.split(","))


def test_fixed_caption_detection_for_te_caching():
    assert captions_are_fixed([SubsetConfig(), SubsetConfig(caption_prefix="x")])
    for kw in ({"shuffle_caption": True}, {"caption_dropout_rate": 0.1}, {"token_warmup_step": 5},
               {"caption_tag_dropout_rate": 0.1}, {"enable_wildcard": True}, {"caption_dropout_every_n_epochs": 2}):
        assert not captions_are_fixed([SubsetConfig(), SubsetConfig(**kw)])
