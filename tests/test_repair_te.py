"""TE override and blend on tiny real-layout checkpoints: TE from the donor, everything else bit for bit."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from lib_sdtune.demo.tiny_models import write_tiny_checkpoint
from lib_sdtune.errors import SdtuneError
from lib_sdtune.io.safetensors_io import SafetensorsFile, read_header
from lib_sdtune.repair import TeBlendConfig, TeOverrideConfig, blend_te, override_te
from lib_sdtune.repair.te import RECIPE_KEY

TE_PREFIXES = {
    "sd1": ("cond_stage_model.transformer.",),
    "sd2": ("cond_stage_model.model.",),
    "sdxl": ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."),
}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoints, tiny_fp32_checkpoints):
    """(arch, dtype) -> (the session's tiny model, seed 0; a donor, seed 1, written once per module)."""
    root = tmp_path_factory.mktemp("repair_te")
    cache: dict[tuple[str, torch.dtype], tuple[Path, Path]] = {}

    def get(arch: str, dtype: torch.dtype = torch.float16) -> tuple[Path, Path]:
        if (arch, dtype) not in cache:
            model = (tiny_checkpoints if dtype == torch.float16 else tiny_fp32_checkpoints)[arch]
            cache[arch, dtype] = (model, write_tiny_checkpoint(arch, root / f"{arch}-{str(dtype)[6:]}", seed=1,
                                                               dtype=dtype))
        return cache[arch, dtype]

    return get


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with SafetensorsFile(path) as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _bytes_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.reshape(-1).view(torch.uint8).equal(
        b.reshape(-1).view(torch.uint8))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_override_takes_donor_te_and_keeps_the_rest_bit_exact(tmp_path: Path, pairs, arch: str) -> None:
    model, donor = pairs(arch)
    before = (_sha(model), _sha(donor))
    result = override_te(TeOverrideConfig(str(model), str(donor), str(tmp_path / "out.safetensors")))
    assert (_sha(model), _sha(donor)) == before
    m, d, o = _tensors(model), _tensors(donor), _tensors(result.output)
    assert list(o) == list(m) or set(o) == set(m)
    prefixes = TE_PREFIXES[arch]
    te_keys = [k for k in m if k.startswith(prefixes)]
    assert te_keys and result.te_tensors == len(te_keys)
    for key, t in o.items():
        if key.endswith(".position_ids"):
            assert t.dtype == torch.int64 and torch.equal(t, torch.arange(77)[None])
        elif key.startswith(prefixes):
            assert _bytes_equal(t, d[key]), key
        else:
            assert _bytes_equal(t, m[key]), key
    assert any(not torch.equal(m[k], d[k]) for k in te_keys if m[k].is_floating_point())
    recipe = json.loads(read_header(result.output)[1][RECIPE_KEY])
    assert recipe["tool"] == "te-override" and recipe["model"]["sha256"] == before[0]
    assert recipe["donor"]["sha256"] == before[1]


@pytest.mark.parametrize("te", ["1", "2"])
def test_override_sdxl_one_encoder(tmp_path: Path, pairs, te: str) -> None:
    model, donor = pairs("sdxl")
    result = override_te(TeOverrideConfig(str(model), str(donor), str(tmp_path / "out.safetensors"), te=te))
    m, d, o = _tensors(model), _tensors(donor), _tensors(result.output)
    te1, te2 = TE_PREFIXES["sdxl"]
    taken, kept = (te1, te2) if te == "1" else (te2, te1)
    for key, t in o.items():
        if key.endswith(".position_ids"):
            continue
        assert _bytes_equal(t, (d if key.startswith(taken) else m)[key]), key
    assert any(k.startswith(kept) and not torch.equal(m[k], d[k]) for k in m if m[k].is_floating_point())


def test_override_keeps_donor_dtype_bit_exact(tmp_path: Path, pairs) -> None:
    model, donor = pairs("sd1")[0], pairs("sd1", torch.float32)[1]
    out = override_te(TeOverrideConfig(str(model), str(donor), str(tmp_path / "o.safetensors"))).output
    m, d, o = _tensors(model), _tensors(donor), _tensors(out)
    for key, t in o.items():
        if key.startswith("cond_stage_model.") and not key.endswith(".position_ids"):
            assert _bytes_equal(t, d[key])
        elif not key.startswith("cond_stage_model."):
            assert _bytes_equal(t, m[key])


def test_sd1_donor_into_sdxl_is_refused_naming_both(tmp_path: Path, pairs) -> None:
    model, donor = pairs("sdxl")[0], pairs("sd1")[1]
    out = tmp_path / "o.safetensors"
    with pytest.raises(SdtuneError) as e:
        override_te(TeOverrideConfig(str(model), str(donor), str(out)))
    msg = str(e.value)
    assert str(model) in msg and str(donor) in msg and "sdxl" in msg and "sd1" in msg
    assert not out.exists()


def test_sd2_donor_with_other_layers_is_refused(tmp_path: Path, pairs) -> None:
    from lib_sdtune.io.safetensors_io import save_safetensors

    model, donor = pairs("sd2")
    d = _tensors(donor)
    short = {k: v for k, v in d.items() if "resblocks.1." not in k}  # a TE missing a layer (WD-style)
    cut = save_safetensors(short, tmp_path / "short.safetensors")
    with pytest.raises(SdtuneError, match="not the same architecture"):
        override_te(TeOverrideConfig(str(model), str(cut), str(tmp_path / "o.safetensors")))


def test_output_equal_to_input_is_refused(pairs) -> None:
    model, donor = pairs("sd1")
    with pytest.raises(SdtuneError, match="also an input"):
        override_te(TeOverrideConfig(str(model), str(donor), str(model)))


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_blend_is_the_formula_and_keeps_position_ids(tmp_path: Path, pairs, arch: str) -> None:
    model, donor = pairs(arch, torch.float32)
    alpha = 0.3
    out = blend_te(TeBlendConfig(str(model), str(donor), str(tmp_path / "o.safetensors"), alpha=alpha)).output
    m, d, o = _tensors(model), _tensors(donor), _tensors(out)
    prefixes = TE_PREFIXES[arch]
    for key, t in o.items():
        if key.endswith(".position_ids"):
            assert t.dtype == torch.int64 and _bytes_equal(t, m[key])
        elif key.startswith(prefixes) and not key.endswith("logit_scale"):
            assert torch.equal(t, (1 - alpha) * m[key] + alpha * d[key]), key
        else:
            assert _bytes_equal(t, m[key]), key


def test_blend_per_layer_alphas(tmp_path: Path, pairs) -> None:
    model, donor = pairs("sd1", torch.float32)
    m = _tensors(model)
    n_layers = len({k.split("encoder.layers.")[1].split(".")[0] for k in m if "encoder.layers." in k})
    layers = tuple(float(i % 2) for i in range(n_layers))
    out = blend_te(TeBlendConfig(str(model), str(donor), str(tmp_path / "o.safetensors"), alpha=0.5,
                                 layers=(layers,))).output
    d, o = _tensors(donor), _tensors(out)
    for key, t in o.items():
        if "encoder.layers." in key:
            i = int(key.split("encoder.layers.")[1].split(".")[0])
            assert torch.equal(t, (d if layers[i] else m)[key]), key
        elif key.startswith("cond_stage_model.") and not key.endswith(".position_ids"):
            assert torch.equal(t, 0.5 * m[key] + 0.5 * d[key]), key
    with pytest.raises(SdtuneError, match="layers"):
        blend_te(TeBlendConfig(str(model), str(donor), str(tmp_path / "p.safetensors"), layers=((0.5,) * 5,)))


def test_override_output_loads_without_missing_keys(tmp_path: Path, pairs) -> None:
    from lib_sdtune.models.loader import load_checkpoint

    model, donor = pairs("sdxl")
    out = override_te(TeOverrideConfig(str(model), str(donor), str(tmp_path / "o.safetensors"), te="2")).output
    loaded = load_checkpoint(out)
    assert loaded.report.missing_keys == [] and loaded.report.unexpected_keys == []
