"""Tests for lib_sdtune.models.tokenizer: offline CLIP ids equal to clip-vit-large-patch14's."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from lib_sdtune.models import tokenizer as tok

# Verified against openai/clip-vit-large-patch14.
# fmt: off
REFERENCE_IDS = {
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
    "a photo of a dog": [49406, 320, 1125, 539, 320, 1929, 49407],
    "a photo of a tree": [49406, 320, 1125, 539, 320, 2677, 49407],
    "A Photo of a TREE!": [49406, 320, 1125, 539, 320, 2677, 256, 49407],
    "it's a cat's toy, running   fast":
        [49406, 585, 568, 320, 2368, 568, 5988, 267, 2761, 1953, 49407],
    "2 dogs and 3 cats": [49406, 273, 3255, 537, 274, 3989, 49407],
    "man wearing a blue shirt": [49406, 786, 3309, 320, 1746, 2523, 49407],
    "a photo of sand and sea at the shore.":
        [49406, 320, 1125, 539, 5094, 537, 2102, 536, 518, 5928, 269, 49407],
    "person working at a computer": [49406, 2533, 1699, 536, 320, 11639, 652, 49407],
    "code editor with syntax highlighting": [49406, 3217, 7661, 593, 3758, 3879, 17344, 49407],
    "a photo of a waterfall": [49406, 320, 1125, 539, 320, 16403, 49407],
    "a diagram": [49406, 320, 22697, 49407],
}
# fmt: on
BOS, EOS = 49406, 49407


def _no_source(monkeypatch: pytest.MonkeyPatch, *keep: str) -> None:
    """Hide every vocabulary finder except those named in `keep`."""
    for name in ("_open_clip_source", "_comfy_source", "_env_source"):
        if name not in keep:
            monkeypatch.setattr(tok, name, lambda: None)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Cache under tmp_path, no SDTUNE_CLIP_VOCAB, and an empty tokenizer lru_cache."""
    monkeypatch.setenv("SDTUNE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SDTUNE_CLIP_VOCAB", raising=False)
    tok.load_clip_tokenizer.cache_clear()
    yield tmp_path / "cache"
    tok.load_clip_tokenizer.cache_clear()


@pytest.fixture(scope="module")
def clip_l(tmp_path_factory):
    """One clip_l tokenizer for the reference-id tests, built in its own temporary cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SDTUNE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        mp.delenv("SDTUNE_CLIP_VOCAB", raising=False)
        tok.load_clip_tokenizer.cache_clear()
        yield tok.load_clip_tokenizer("clip_l")


@pytest.mark.compat
@pytest.mark.parametrize("prompt", list(REFERENCE_IDS))
def test_clip_l_ids_match_openai_reference(clip_l, prompt):
    assert clip_l(prompt)["input_ids"] == REFERENCE_IDS[prompt]


def test_generated_vocab_has_49408_entries_with_special_tokens_last(isolated_cache):
    folder = tok.materialize_tokenizer_dir(tok.find_vocab_source())
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408
    assert vocab["!"] == 0 and vocab["!</w>"] == 256
    assert vocab["<|startoftext|>"] == BOS and vocab["<|endoftext|>"] == EOS
    merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version") and len(merges) == 1 + tok.NUM_MERGES
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["model_max_length"] == 77 and config["do_lower_case"] is True


def test_clip_l_encode_prompts_pads_with_eos_49407():
    ids = tok.encode_prompts(tok.load_clip_tokenizer("clip_l"), ["a photo of a cat", "a diagram"])
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    assert ids[0, :7].tolist() == REFERENCE_IDS["a photo of a cat"]
    assert ids[0, 7:].eq(EOS).all() and ids[1, 4:].eq(EOS).all()


@pytest.mark.compat
def test_open_clip_encode_prompts_pads_with_zero():
    tokenizer = tok.load_clip_tokenizer("open_clip")
    assert tokenizer.pad_token_id == 0
    ids = tok.encode_prompts(tokenizer, ["a photo of a cat"])
    assert ids[0, :7].tolist() == REFERENCE_IDS["a photo of a cat"]
    assert ids[0, 7:].eq(0).all()


@pytest.mark.compat
def test_open_clip_flavour_still_encodes_exclamation_as_256_like_openclip():
    clip_l, open_clip = (
        tok.load_clip_tokenizer("clip_l"),
        tok.load_clip_tokenizer("open_clip"),
    )
    for prompt in ("A Photo of a TREE!", "wow!! great!"):
        assert open_clip(prompt)["input_ids"] == clip_l(prompt)["input_ids"]
    assert 0 not in open_clip("A Photo of a TREE!")["input_ids"]


def test_long_prompt_is_truncated_to_77_with_eos_last():
    prompt = " ".join(["cat"] * 200)
    for flavour in ("clip_l", "open_clip"):
        ids = tok.encode_prompts(tok.load_clip_tokenizer(flavour), [prompt, "a dog"])
        assert ids.shape == (2, 77)
        assert ids[0, 0] == BOS and ids[0, 76] == EOS
        assert ids[0, 1:76].eq(2368).all()


def test_load_clip_tokenizer_is_cached_per_flavour():
    assert tok.load_clip_tokenizer("clip_l") is tok.load_clip_tokenizer("clip_l")
    assert tok.load_clip_tokenizer("clip_l") is not tok.load_clip_tokenizer("open_clip")


def test_unknown_flavour_is_rejected():
    with pytest.raises(ValueError, match="flavour"):
        tok.load_clip_tokenizer("t5")


def test_cache_files_are_reused_not_rewritten(isolated_cache, monkeypatch):
    source = tok.find_vocab_source()
    folder = tok.materialize_tokenizer_dir(source)
    assert folder.parent == isolated_cache / "tokenizers"
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert set(before) == {
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
    }  # no temp leftovers

    def refuse(*_args):
        raise AssertionError("cache was rewritten")

    monkeypatch.setattr(tok, "_atomic_write", refuse)
    assert tok.materialize_tokenizer_dir(source) == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_comfy_style_folder_via_env_gives_same_ids(isolated_cache, monkeypatch, tmp_path):
    made = tok.materialize_tokenizer_dir(tok.find_vocab_source())
    comfy_dir = tmp_path / "sd1_tokenizer"
    comfy_dir.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (comfy_dir / name).write_bytes((made / name).read_bytes())
    monkeypatch.setenv("SDTUNE_CLIP_VOCAB", str(comfy_dir))
    _no_source(monkeypatch, "_env_source")
    assert tok.find_vocab_source() == comfy_dir
    ids = tok.encode_prompts(tok.load_clip_tokenizer("clip_l"), list(REFERENCE_IDS))
    for row, expected in zip(ids.tolist(), REFERENCE_IDS.values()):
        assert row[: len(expected)] == expected


def test_comfy_package_is_found_by_spec_without_importing_it(monkeypatch, tmp_path):
    package = tmp_path / "site" / "comfy"
    (package / "sd1_tokenizer").mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('comfy must not be imported')\n")
    for name in ("vocab.json", "merges.txt"):
        (package / "sd1_tokenizer" / name).write_text("{}")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "comfy", raising=False)
    _no_source(monkeypatch, "_comfy_source", "_env_source")
    assert tok.find_vocab_source() == package / "sd1_tokenizer"
    assert "comfy" not in sys.modules


def test_invalid_env_path_raises_tokenizer_unavailable(monkeypatch, tmp_path):
    monkeypatch.setenv("SDTUNE_CLIP_VOCAB", str(tmp_path / "missing"))
    _no_source(monkeypatch, "_env_source")
    with pytest.raises(tok.TokenizerUnavailable, match="SDTUNE_CLIP_VOCAB"):
        tok.find_vocab_source()


def test_no_source_raises_tokenizer_unavailable_with_pip_hint(monkeypatch):
    _no_source(monkeypatch)
    with pytest.raises(tok.TokenizerUnavailable, match="pip install --no-deps open-clip-torch"):
        tok.load_clip_tokenizer("clip_l")


def test_loading_never_imports_open_clip_torchvision_or_timm():
    tok.load_clip_tokenizer("open_clip")
    assert not {"open_clip", "torchvision", "timm"} & set(sys.modules)
