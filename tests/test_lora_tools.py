"""`lora bake`: a LoRA/LyCORIS baked into a tiny real-layout checkpoint gives exactly base + strength·ΔW of the
network that wrote the file (SD1, SD2 with OpenCLIP's fused q/k/v, SDXL with both text encoders), other
tensors byte-identical; wrong architectures and unmatched modules are refused or reported."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from lib_sdtune.errors import SdtuneError
from lib_sdtune.io.safetensors_io import SafetensorsFile, save_safetensors
from lib_sdtune.merge.lora_bake import BAKED_KEY, BakeConfig, LoraInput, bake_loras
from lib_sdtune.merge.lora_common import block_weights, parse_weighted, target_slot
from lib_sdtune.merge.plan import SCHEDULE_KEY
from lib_sdtune.models.loader import load_checkpoint
from lib_sdtune.networks.kohya_file import load_lora, save_lora
from lib_sdtune.networks.network import LoraConfig, LoraNetwork

PLAIN = LoraConfig(rank=4, alpha=2.0)
LOCON = LoraConfig(rank=4, alpha=2.0, conv_rank=2, conv_alpha=3.0)
FAMILY = {"sd1": "sd1", "sd2": "sd2", "sdxl": "sdxl"}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def models(tiny_fp32_models):
    """arch -> the fp32 tiny checkpoint loaded once (networks wrap it without changing its weights)."""
    return tiny_fp32_models


def _network(model, config: LoraConfig, seed: int) -> LoraNetwork:
    """A network with every factor random (fresh ones are no-ops), as its file will hold."""
    net = LoraNetwork(model.modules, model.arch.family, dataclasses.replace(config))  # set_multiplier writes it
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net:
            params = (m.lyco if hasattr(m, "lyco") else m).named_parameters()
            for name, p in params:
                if name.startswith("lora_down") and not hasattr(m, "lyco"):
                    continue
                noise = torch.randn(p.shape, generator=g)
                p.copy_(p * (1 + 0.1 * noise) if name == "dora_scale" else noise * 0.1)
    return net


def _save(net: LoraNetwork, path: Path) -> Path:
    save_lora(net, path, dtype=torch.float32)
    net.load_kohya_state_dict(load_lora(path)[0])  # the network now holds exactly what the file holds
    return path


def _weights(model, net: LoraNetwork) -> dict[str, torch.Tensor]:
    """Every targeted layer's weight in a loaded model (or, given a path, in the file by original key and rows)."""
    if isinstance(model, Path):
        f = SafetensorsFile(model)
        out = {}
        for n, t in net.targets.items():
            w = f.get_tensor(t.original_key).float()
            out[n] = w if t.original_rows is None else w[t.original_rows[0]:t.original_rows[1]]
        return out
    return {n: model.modules[t.component].get_submodule(t.module_path).weight.detach().float().clone()
            for n, t in net.targets.items()}


def _expected(nets: list[tuple[LoraNetwork, float]], base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {n: w.clone() for n, w in base.items()}
    for net, strength in nets:
        net.set_multiplier(strength)
        for n in net.names():
            out[n] += net.lora(n).delta_weight()
    return out


def _assert_close(got: dict, want: dict, tol: float = 1e-5) -> None:
    assert set(got) == set(want)
    worst = max((got[n] - want[n]).abs().max().item() for n in got)
    assert worst < tol, worst


def _same_shape(got: dict, want: dict) -> dict:
    return {n: got[n].reshape(want[n].shape) for n in got}


@pytest.mark.parametrize("arch,config", [("sd1", LOCON), ("sd2", PLAIN), ("sdxl", LOCON)], ids=["sd1", "sd2", "sdxl"])
def test_bake_equals_base_plus_strength_delta_and_leaves_other_tensors_byte_identical(
        tiny_fp32_checkpoints, models, tmp_path, arch, config):
    ckpt = tiny_fp32_checkpoints[arch]
    net = _network(models(arch), config, seed=1)
    lora = _save(net, tmp_path / "a.safetensors")
    base = _weights(models(arch), net)
    out = tmp_path / "baked.safetensors"
    result = bake_loras(BakeConfig(str(ckpt), (LoraInput(str(lora), 0.7),), str(out)))
    assert result.output == out and result.unmatched == {} and result.applied == {str(lora): len(net.names())}
    components = {t.component for t in net.targets.values()}
    assert components == ({"unet", "text_encoder", "text_encoder_2"} if arch == "sdxl" else {"unet", "text_encoder"})
    _assert_close(_weights(load_checkpoint(out), net), _expected([(net, 0.7)], base))
    # OpenCLIP's q/k/v live in one fused tensor: the three rows of each were updated in place
    if arch != "sd1":
        assert any(t.original_rows is not None for t in net.targets.values())
    src, dst = SafetensorsFile(ckpt), SafetensorsFile(out)
    targeted = {t.original_key for t in net.targets.values()}
    assert set(src.keys()) == set(dst.keys()) and result.changed == len(targeted)
    for key in src.keys():
        if key not in targeted:
            a, b = src.get_tensor(key), dst.get_tensor(key)
            assert a.dtype == b.dtype and torch.equal(a, b), key
    assert json.loads(dst.metadata[BAKED_KEY])["loras"][0]["strength"] == 0.7


LYCORIS = {
    "loha": LoraConfig(rank=4, alpha=2.0, conv_rank=2, conv_alpha=3.0, algorithm="loha"),
    "lokr": LoraConfig(rank=4, alpha=8.0, conv_rank=2, conv_alpha=3.0, algorithm="lokr", factor=4),
    "dora": LoraConfig(rank=4, alpha=2.0, algorithm="dora"),
    "locon_tucker": LoraConfig(rank=4, alpha=2.0, conv_rank=3, conv_alpha=1.0, use_tucker=True),
    "loha_tucker": LoraConfig(rank=4, alpha=2.0, conv_rank=3, conv_alpha=5.0, algorithm="loha", use_tucker=True),
    "full": LoraConfig(algorithm="full", conv_rank=1),
}


def test_lycoris_files_loha_lokr_dora_tucker_full_bake_to_their_network_deltas(
        tiny_fp32_checkpoints, models, tmp_path):
    """All six baked together (each ΔW taken against the input weight, as hosts apply several networks)."""
    ckpt, model = tiny_fp32_checkpoints["sd1"], models("sd1")
    nets = {k: _network(model, c, seed=2 + i) for i, (k, c) in enumerate(LYCORIS.items())}
    strengths = {k: 0.5 + 0.1 * i for i, k in enumerate(nets)}
    files = {k: _save(net, tmp_path / f"{k}.safetensors") for k, net in nets.items()}
    out = tmp_path / "baked.safetensors"
    result = bake_loras(BakeConfig(str(ckpt), tuple(LoraInput(str(files[k]), strengths[k]) for k in nets), str(out)))
    assert result.unmatched == {}
    full = nets["full"]  # targets every layer; the others a subset
    want = _expected([(nets[k], strengths[k]) for k in nets], _weights(model, full))
    _assert_close(_same_shape(_weights(out, full), want), want)
    name = full.names("unet")[0]  # diff_b lands on the biases
    bias_key = full.targets[name].original_key[:-len("weight")] + "bias"
    before = model.modules["unet"].get_submodule(full.targets[name].module_path).bias
    got = SafetensorsFile(out).get_tensor(bias_key) - before
    assert torch.allclose(got, full.lora(name).delta_bias(), atol=1e-6)


def test_two_loras_with_strengths_and_block_weights_sum_their_deltas(tiny_fp32_checkpoints, models, tmp_path):
    ckpt = tiny_fp32_checkpoints["sd1"]
    a, b = _network(models("sd1"), LOCON, seed=3), _network(models("sd1"), PLAIN, seed=4)
    pa, pb = _save(a, tmp_path / "a.safetensors"), _save(b, tmp_path / "b.safetensors")
    base = _weights(models("sd1"), a)
    blocks = [0.0] + [1.0] * 12 + [0.5] + [0.25] * 12  # BASE (TE) off, OUT blocks at a quarter, MID half
    out = tmp_path / "baked.safetensors"
    bake_loras(BakeConfig(str(ckpt), (LoraInput(str(pa), 1.0), LoraInput(str(pb), -0.5, tuple(blocks))), str(out)))
    want = _expected([(a, 1.0)], base)
    slots = block_weights(blocks, "sd1", "blocks")
    for n in b.names():
        want[n] += b.lora(n).raw_delta() * -0.5 * slots[target_slot(b.targets[n], "sd1")]
    _assert_close(_same_shape(_weights(out, a), want), want)


def test_dtype_option_casts_float_weights_and_keeps_schedule_buffers(tiny_fp32_checkpoints, models, tmp_path):
    ckpt = tiny_fp32_checkpoints["sd1"]
    net = _network(models("sd1"), PLAIN, seed=5)
    lora = _save(net, tmp_path / "a.safetensors")
    out = tmp_path / "half.safetensors"
    bake_loras(BakeConfig(str(ckpt), (LoraInput(str(lora)),), str(out), dtype="fp16"))
    f = SafetensorsFile(out)
    dtypes = {k: f.dtype(k) for k in f.keys()}
    assert dtypes["model.diffusion_model.input_blocks.1.1.proj_in.weight"] == torch.float16
    assert {k for k, d in dtypes.items() if d == torch.float32} == {k for k in dtypes if SCHEDULE_KEY.match(k)}


def test_lora_for_another_architecture_is_refused_naming_both(tiny_fp32_checkpoints, models, tmp_path):
    net = _network(models("sdxl"), PLAIN, seed=6)
    lora = _save(net, tmp_path / "xl.safetensors")
    with pytest.raises(SdtuneError, match="made for SDXL.*model is SD 1.x"):
        bake_loras(BakeConfig(str(tiny_fp32_checkpoints["sd1"]), (LoraInput(str(lora)),),
                              str(tmp_path / "o.safetensors")))
    assert not (tmp_path / "o.safetensors").exists()


def test_unmatched_modules_are_reported_and_a_lora_matching_nothing_is_refused(tiny_fp32_checkpoints, models,
                                                                              tmp_path):
    ckpt = tiny_fp32_checkpoints["sd1"]
    net = _network(models("sd1"), PLAIN, seed=7)
    lora = _save(net, tmp_path / "a.safetensors")
    state, meta = load_lora(lora)
    stray = {"lora_unet_nowhere_proj.lora_down.weight": torch.zeros(2, 8),
             "lora_unet_nowhere_proj.lora_up.weight": torch.zeros(8, 2)}
    save_safetensors({**state, **stray}, tmp_path / "extra.safetensors", meta)
    result = bake_loras(BakeConfig(str(ckpt), (LoraInput(str(tmp_path / "extra.safetensors")),),
                                   str(tmp_path / "o.safetensors")))
    assert result.unmatched == {str(tmp_path / "extra.safetensors"): ["lora_unet_nowhere_proj"]}
    save_safetensors(stray, tmp_path / "none.safetensors", meta)
    with pytest.raises(SdtuneError, match="none of its 1 modules"):
        bake_loras(BakeConfig(str(ckpt), (LoraInput(str(tmp_path / "none.safetensors")),),
                              str(tmp_path / "o2.safetensors")))


def test_existing_output_needs_overwrite_and_inputs_are_never_outputs(tiny_fp32_checkpoints, models, tmp_path):
    ckpt = tiny_fp32_checkpoints["sd1"]
    lora = _save(_network(models("sd1"), PLAIN, seed=8), tmp_path / "a.safetensors")
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"x")
    cfg = BakeConfig(str(ckpt), (LoraInput(str(lora)),), str(out))
    with pytest.raises(SdtuneError, match="already exists.*--overwrite"):
        bake_loras(cfg)
    assert out.read_bytes() == b"x"
    bake_loras(BakeConfig(str(ckpt), (LoraInput(str(lora)),), str(out), overwrite=True))
    assert SafetensorsFile(out).keys()
    with pytest.raises(SdtuneError, match="also an input"):
        bake_loras(BakeConfig(str(ckpt), (LoraInput(str(lora)),), str(lora), overwrite=True))


def test_strength_and_lbw_parsing():
    assert parse_weighted("a.safetensors:0.8") == ("a.safetensors", 0.8)
    assert parse_weighted(r"C:\x\a.safetensors") == (r"C:\x\a.safetensors", 1.0)
    assert parse_weighted(r"C:\x\a.safetensors:-1") == (r"C:\x\a.safetensors", -1.0)
    w17 = block_weights([0.5] * 17, "sd1", "blocks")
    assert w17["IN01"] == 0.5 and w17["IN00"] == 1.0 and w17["OUT00"] == 1.0 and w17["OUT11"] == 0.5
    w12 = block_weights([0.0] * 12, "sdxl", "blocks")
    assert w12["IN04"] == 0.0 and w12["IN00"] == 1.0 and w12["OUT05"] == 0.0 and w12["OUT06"] == 1.0
    with pytest.raises(SdtuneError, match="blocks"):
        block_weights([1.0] * 5, "sd1", "blocks")


def test_ldm_named_sd1_lora_bakes_like_its_sd_scripts_named_twin(tiny_fp32_checkpoints, models, tmp_path):
    """Older tools name SD1 U-Net modules by the LDM keys (`lora_unet_input_blocks_1_1_proj_in`); A1111 loads them."""
    ckpt = tiny_fp32_checkpoints["sd1"]
    net = _network(models("sd1"), LOCON, seed=9)
    lora = _save(net, tmp_path / "a.safetensors")
    state, meta = load_lora(lora)
    renamed = {}
    for key, t in state.items():
        name, _, suffix = key.partition(".")
        target = net.targets[name]
        if target.component == "unet":
            name = "lora_unet_" + target.original_key[len("model.diffusion_model."):-len(".weight")].replace(".", "_")
        renamed[f"{name}.{suffix}"] = t
    assert any(k.startswith("lora_unet_input_blocks_") for k in renamed)
    save_safetensors(renamed, tmp_path / "ldm.safetensors", meta)
    outs = []
    for src in (lora, tmp_path / "ldm.safetensors"):
        outs.append(tmp_path / f"baked-{src.stem}.safetensors")
        result = bake_loras(BakeConfig(str(ckpt), (LoraInput(str(src)),), str(outs[-1])))
        assert result.unmatched == {} and result.applied[str(src)] == len(net.names())
    a, b = SafetensorsFile(outs[0]), SafetensorsFile(outs[1])
    assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def test_diffusers_named_sdxl_unet_modules_map_to_the_sgm_layers(tiny_fp32_checkpoints):
    from lib_sdtune.io.checkpoint import open_checkpoint
    from lib_sdtune.io.detect import detect_architecture
    from lib_sdtune.merge.lora_bake import _with_aliases
    from lib_sdtune.merge.lora_common import checkpoint_name_map

    ckpt = tiny_fp32_checkpoints["sdxl"]
    shapes = open_checkpoint(ckpt).shapes()
    names = checkpoint_name_map(shapes, detect_architecture(shapes), ckpt)
    both = _with_aliases(names)
    sgm = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert both["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"] is names[sgm]
    assert names[sgm].original_key == "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
