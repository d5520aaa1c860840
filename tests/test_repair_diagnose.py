"""`repair diagnose`: an over-fitted text encoder is flagged with its number and `repair te-override` (the verdict's
own command) brings the drift back to zero; SDXL encoders are judged apart; a LoRA's in-memory TE drift equals
that of the checkpoint it bakes into (LoRA/LoCon and LoHa); the suggested `lora-te --scale` is the repair; bad
input is refused naming both files; the CLI writes report.json/txt/png into -o."""

from __future__ import annotations

import dataclasses
import json
import random
import shlex
from pathlib import Path

import pytest
import torch

from lib_sdtune.cli import main
from lib_sdtune.errors import SdtuneError
from lib_sdtune.io.safetensors_io import SafetensorsFile, save_safetensors
from lib_sdtune.repair.diagnose import DiagnoseConfig, Thresholds, diagnose
from lib_sdtune.repair.diagnose_weights import effective_rank

TAGS = ["sks", "1girl", "solo", "long hair", "blue eyes", "smile", "school uniform", "outdoors", "red ribbon"]
CLIP_L = "TE (CLIP-L)"


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with SafetensorsFile(path) as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _overfit_te(base: Path, out: Path) -> Path:
    """The base with its CLIP trained on one caption's tags (shuffled subsets, as kohya's shuffle_caption) toward
    one fixed target at a far too high learning rate until the tags collapse; written back into the ldm layout
    with ss_tag_frequency."""
    from lib_sdtune.models.loader import load_checkpoint
    from lib_sdtune.models.to_ldm import clip_to_ldm
    from lib_sdtune.models.tokenizer import load_clip_tokenizer

    te = load_checkpoint(base, components=["text_encoder"]).modules["text_encoder"].float().train()
    tok = load_clip_tokenizer("clip_l")
    target = torch.randn(1, 77, te.config.hidden_size, generator=torch.Generator().manual_seed(0))
    rng = random.Random(0)
    opt = torch.optim.Adam(te.parameters(), lr=3e-2)
    for _ in range(10):
        captions = [", ".join(rng.sample(TAGS, rng.randint(1, len(TAGS)))) for _ in range(2)]
        ids = tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
        loss = (te(ids).last_hidden_state - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    tensors = _tensors(base)
    for key, value in clip_to_ldm(te.state_dict(), "cond_stage_model.transformer.").items():
        assert key in tensors, key
        tensors[key] = value.detach().contiguous()
    meta = {"ss_tag_frequency": json.dumps({"10_sks": {t: 10 - i for i, t in enumerate(TAGS)}})}
    return save_safetensors(tensors, out, meta)


@pytest.fixture(scope="module")
def overfit(tiny_fp32_checkpoints, tmp_path_factory) -> tuple[Path, Path]:
    """(tiny SD1 base fp32, the same with an over-fitted, collapsed text encoder)."""
    base = tiny_fp32_checkpoints["sd1"]
    return base, _overfit_te(base, tmp_path_factory.mktemp("overfit") / "overfit.safetensors")


def _verdicts(report) -> dict:
    return {v.symptom: v for v in report.verdicts}


def test_overfitted_te_is_flagged_and_its_te_override_command_brings_drift_to_zero(overfit) -> None:
    base, model = overfit
    report = diagnose(DiagnoseConfig(str(base), model=str(model)))
    v = _verdicts(report)
    (enc,) = report.encoders
    drift, collapse = v[f"language drift in {CLIP_L}"], v[f"tags stop working in {CLIP_L}"]
    assert drift.triggered and drift.value == enc.control_cosine and drift.value < 0.5 and drift.threshold == 0.95
    assert collapse.triggered and collapse.value == enc.collapse > 0.5 and collapse.threshold == 0.5
    assert enc.collapse_over == "tags" and set(enc.tags) == set(TAGS) and "ss_tag_frequency" in report.tags_source
    assert enc.similarity_tuned > enc.similarity_base and enc.weight_delta > 0
    unet = v["U-Net over-trained (odd details, thick lines)"]
    assert not unet.triggered and unet.value == 0.0 and set(report.blocks) >= {"IN00", "MID", "OUT11"}
    args = shlex.split(drift.command)
    assert args[:5] == ["python", "-m", "lib_sdtune", "repair", "te-override"] and collapse.command == drift.command
    assert main(args[3:]) == 0  # the command exactly as the report prints it
    repaired = Path(args[args.index("-o") + 1])
    after = diagnose(DiagnoseConfig(str(base), model=str(repaired)))
    (e,) = after.encoders
    assert e.control_cosine == pytest.approx(1.0, abs=1e-6) and e.collapse == pytest.approx(0.0, abs=1e-6)
    assert min(e.tags.values()) == pytest.approx(1.0, abs=1e-6) and e.weight_delta == 0.0
    assert not after.triggered and set(after.blocks.values()) == {0.0}


def test_sdxl_encoders_are_judged_apart(tiny_checkpoints, tmp_path: Path) -> None:
    base = tiny_checkpoints["sdxl"]
    tensors = _tensors(base)
    g = torch.Generator().manual_seed(0)
    for key, t in tensors.items():  # TE2 (bigG) moved by noise as large as its weights; TE1 and U-Net untouched
        if key.startswith("conditioner.embedders.1.model.transformer.") and key.endswith("weight"):
            tensors[key] = (t.float() + torch.randn(t.shape, generator=g) * t.float().std()).to(t.dtype)
    model = save_safetensors(tensors, tmp_path / "m.safetensors")
    calls: list[tuple[int, int, str]] = []
    report = diagnose(DiagnoseConfig(str(base), model=str(model), max_tags=0), progress=lambda *a: calls.append(a))
    assert calls[-1][0] == calls[-1][1] == len(calls) and "TE2 (OpenCLIP bigG)" in calls[-1][2]
    by = {e.encoder: e for e in report.encoders}
    assert by["1"].control_cosine == pytest.approx(1.0, abs=1e-6) and by["1"].weight_delta == 0.0
    assert by["2"].control_cosine < 0.95 and by["2"].weight_delta > 0.5
    v = _verdicts(report)
    assert not v["language drift in TE1 (CLIP-L)"].triggered
    te2 = v["language drift in TE2 (OpenCLIP bigG)"]
    assert te2.triggered and "--te 2" in te2.command and report.tags_source.startswith("none")
    assert not v["U-Net over-trained (odd details, thick lines)"].triggered and set(report.blocks.values()) == {0.0}


def _random_lora(models, folder: Path, name: str, config, te_scale: float, unet_scale: float, seed: int,
                 tags: bool = False) -> Path:
    from lib_sdtune.networks.kohya_file import save_lora
    from lib_sdtune.networks.network import LoraNetwork

    model = models("sd1")
    net = LoraNetwork(model.modules, model.arch.family, dataclasses.replace(config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net:
            scale = te_scale if m.lora_name.startswith("lora_te") else unet_scale
            for _, p in (m.lyco if hasattr(m, "lyco") else m).named_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    meta = {"ss_tag_frequency": json.dumps({"5_x": {"sks": 5, "1girl": 3, "smile": 2}})} if tags else None
    return save_lora(net, folder / f"{name}.safetensors", meta, dtype=torch.float32)


@pytest.fixture(scope="module")
def loras(tiny_fp32_models, tmp_path_factory):
    """kind -> LoRA file on the tiny SD1: a LoCon (conv rank 2) and a LoHa with random factors."""
    from lib_sdtune.networks.network import LoraConfig

    root = tmp_path_factory.mktemp("diagnose_loras")
    return {"locon": _random_lora(tiny_fp32_models, root, "locon", LoraConfig(rank=4, alpha=2.0, conv_rank=2,
                                                                              conv_alpha=2.0), 0.15, 0.1, 1),
            "loha": _random_lora(tiny_fp32_models, root, "loha", LoraConfig(rank=4, alpha=2.0, algorithm="loha"),
                                 0.35, 0.35, 2)}


@pytest.mark.parametrize("kind", ["locon", "loha"])
def test_lora_diagnosis_matches_the_checkpoint_it_bakes_into(tiny_fp32_checkpoints, loras, tmp_path: Path,
                                                             kind: str) -> None:
    """TE drift of the LoRA added in memory = TE drift of the baked checkpoint, at the same strength; per-module
    numbers = those of the dense ΔW; the U-Net verdict's strength brings the largest block to the threshold."""
    from lib_sdtune.merge.lora_bake import BakeConfig, LoraInput, bake_loras
    from lib_sdtune.merge.lora_delta import group_modules
    from lib_sdtune.networks.kohya_file import load_lora

    base, lora, strength = tiny_fp32_checkpoints["sd1"], loras[kind], 1.5
    limits = Thresholds(control_cosine=0.0, collapse=1.0, unet_block_delta=0.05)  # only the U-Net verdict fires
    report = diagnose(DiagnoseConfig(str(base), lora=str(lora), max_tags=0, lora_strength=strength,
                                     thresholds=limits))
    baked = bake_loras(BakeConfig(str(base), (LoraInput(str(lora), strength),), str(tmp_path / "b.safetensors"),
                                  dtype="fp32")).output
    reference = diagnose(DiagnoseConfig(str(base), model=str(baked), max_tags=0, thresholds=limits))
    (e,), (r,) = report.encoders, reference.encoders
    assert e.control_cosine < 0.999  # a real drift, so the comparison means something
    for prompt, cosine in e.controls.items():
        assert cosine == pytest.approx(r.controls[prompt], abs=2e-5), prompt
    assert e.collapse == pytest.approx(r.collapse, abs=1e-4) and not e.scale_trials
    stats = report.lora
    modules = group_modules(str(lora), load_lora(lora)[0])
    assert len(stats.modules) == len(modules) and not stats.unmatched and 0 < stats.te_share < 1
    assert stats.algorithm == {"locon": "locon", "loha": "loha"}[kind]
    assert {m.group for m in stats.modules} >= {"text_encoder", "IN01", "MID", "OUT11"}
    assert stats.groups["text_encoder"].relative == e.weight_delta
    m = next(s for s in stats.modules if s.group == "OUT11")
    w = _tensors(base)[m.key].float()
    delta = modules[m.name].delta(w, strength).reshape(w.shape[0], -1)
    assert m.delta_norm == pytest.approx(float(delta.norm()), rel=1e-4)
    assert m.relative == pytest.approx(float(delta.norm() / w.norm()), rel=1e-4)
    assert m.effective_rank == pytest.approx(effective_rank(torch.linalg.svdvals(delta.double())), rel=1e-3)
    if kind == "locon":
        assert all(s.effective_rank <= s.rank + 1e-6 for s in stats.modules)
    unet = _verdicts(report)["U-Net over-trained (odd details, thick lines)"]
    slot, value = max(report.blocks.items(), key=lambda kv: kv[1])
    assert unet.triggered and unet.value == value and slot in unet.measure and unet.command is None
    suggested = float(unet.advice.split("strength ")[1].split(" ")[0])  # ΔW is linear in the strength
    assert value / strength * suggested <= 0.05 < value / strength * (suggested + 0.05)


def test_every_other_kind_sdtune_writes_is_measured(tiny_fp32_checkpoints, tiny_fp32_models, tmp_path: Path) -> None:
    """LoKr, full diffs and DoRA: every module matched, its ‖ΔW‖ that of the dense update, the TE part applied."""
    from lib_sdtune.merge.lora_delta import group_modules
    from lib_sdtune.networks.kohya_file import load_lora
    from lib_sdtune.networks.network import LoraConfig

    base = tiny_fp32_checkpoints["sd1"]
    weights = _tensors(base)
    limits = Thresholds(control_cosine=0.0, collapse=1.0)
    for kind, config in (("lokr", LoraConfig(rank=4, alpha=8.0, algorithm="lokr", factor=4)),
                         ("full", LoraConfig(algorithm="full")), ("dora", LoraConfig(rank=4, algorithm="dora"))):
        lora = _random_lora(tiny_fp32_models, tmp_path, kind, config, 0.05, 0.05, 4)
        report = diagnose(DiagnoseConfig(str(base), lora=str(lora), max_tags=0, thresholds=limits))
        modules = group_modules(str(lora), load_lora(lora)[0])
        stats = report.lora
        assert len(stats.modules) == len(modules) and report.encoders[0].control_cosine < 1.0, kind
        assert report.blocks and 0 < stats.te_share < 1 and stats.algorithm.startswith(kind.replace("dora", "lora"))
        for m in stats.modules[::40]:
            w = weights[m.key].float()
            delta = modules[m.name].delta(w, 1.0)
            assert m.delta_norm == pytest.approx(float(delta.norm()), rel=1e-4), (kind, m.name)


def _te_only_lora(layers: int, scale: float) -> dict[str, torch.Tensor]:
    """A random rank-4 LoRA on every attention/MLP layer of a 64-wide tiny text encoder (kohya names)."""
    parts = {"self_attn_q_proj": (64, 64), "self_attn_k_proj": (64, 64), "self_attn_v_proj": (64, 64),
             "self_attn_out_proj": (64, 64), "mlp_fc1": (64, 256), "mlp_fc2": (256, 64)}
    g = torch.Generator().manual_seed(0)
    out = {}
    for layer in range(layers):
        for part, (n_in, n_out) in parts.items():
            name = f"lora_te_text_model_encoder_layers_{layer}_{part}"
            out[f"{name}.lora_down.weight"] = torch.randn(4, n_in, generator=g) * scale
            out[f"{name}.lora_up.weight"] = torch.randn(n_out, 4, generator=g) * scale
            out[f"{name}.alpha"] = torch.tensor(4.0)
    return out


def test_sd2_fused_qkv_lora_matches_the_bake_and_the_base_comes_back_bit_exact(tiny_fp32_checkpoints,
                                                                              tmp_path: Path) -> None:
    """OpenCLIP keeps q/k/v in one in_proj tensor: the LoRA lands on its rows, and restoring re-reads them."""
    from lib_sdtune.merge.lora_bake import BakeConfig, LoraInput, bake_loras
    from lib_sdtune.merge.lora_delta import group_modules
    from lib_sdtune.repair.diagnose import LoraBase
    from lib_sdtune.repair.diagnose_te import LoraTePatch

    base = str(tiny_fp32_checkpoints["sd2"])
    state = _te_only_lora(23, 0.08)  # SD2 uses the penultimate layer: 23 of the file's 24 blocks
    lora = save_safetensors(state, tmp_path / "sd2.safetensors", {"ss_base_model_version": "sd_v2"})
    limits = Thresholds(control_cosine=0.0, collapse=1.0)
    report = diagnose(DiagnoseConfig(base, lora=str(lora), max_tags=0, thresholds=limits))
    baked = bake_loras(BakeConfig(base, (LoraInput(str(lora)),), str(tmp_path / "b.safetensors"), dtype="fp32"))
    reference = diagnose(DiagnoseConfig(base, model=str(baked.output), max_tags=0, thresholds=limits))
    (e,), (r,) = report.encoders, reference.encoders
    assert e.label == "TE (OpenCLIP-H)" and e.control_cosine < 0.999 and not report.blocks
    assert list(e.controls.values()) == pytest.approx(list(r.controls.values()), abs=2e-5)
    lb = LoraBase(base, "cpu")
    te = lb.encoders(["text_encoder"])
    before = {k: v.clone() for k, v in te["text_encoder"].state_dict().items()}
    parts = [(lb.names[n], m) for n, m in group_modules(str(lora), state).items()]
    patch = LoraTePatch(te, parts, lb.source, base)
    patch.apply({"text_encoder": 1.0})
    after = te["text_encoder"].state_dict()
    assert any(not torch.equal(after[k], v) for k, v in before.items() if "q_proj" in k)
    patch.restore()
    assert all(torch.equal(te["text_encoder"].state_dict()[k], v) for k, v in before.items())


def test_lora_te_scale_suggested_is_the_repair(tiny_fp32_checkpoints, tiny_fp32_models, tmp_path: Path) -> None:
    from lib_sdtune.networks.network import LoraConfig

    base = tiny_fp32_checkpoints["sd1"]
    lora = _random_lora(tiny_fp32_models, tmp_path, "strong", LoraConfig(rank=4, alpha=4.0), 0.09, 0.05, 3,
                        tags=True)
    report = diagnose(DiagnoseConfig(str(base), lora=str(lora)))
    (e,) = report.encoders
    drift = _verdicts(report)[f"language drift in {CLIP_L}"]
    assert drift.triggered and drift.value == e.control_cosine and list(e.tags) == ["sks", "1girl", "smile"]
    assert list(e.scale_trials) == [0.75, 0.5] and e.suggested_scale == 0.5
    assert e.scale_trials[0.75][0] < 0.95 <= e.scale_trials[0.5][0]
    args = shlex.split(drift.command)
    assert args[3:5] == ["repair", "lora-te"] and args[args.index("--scale") + 1] == "0.5"
    assert main(args[3:]) == 0
    fixed = diagnose(DiagnoseConfig(str(base), lora=args[args.index("-o") + 1]))
    (f,) = fixed.encoders
    assert f.control_cosine == pytest.approx(e.scale_trials[0.5][0], abs=1e-5)
    assert f.collapse == pytest.approx(e.scale_trials[0.5][1], abs=1e-4)
    assert not any(v.triggered for v in fixed.verdicts if v.symptom.startswith(("language", "tags")))
    assert fixed.lora.groups["IN01"].relative == pytest.approx(report.lora.groups["IN01"].relative, rel=1e-6)


def test_bad_input_is_refused_naming_the_files(tiny_fp32_checkpoints, tmp_path: Path) -> None:
    base = tiny_fp32_checkpoints["sd1"]
    xl = save_safetensors({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(2, 64),
                           "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.ones(64, 2)},
                          tmp_path / "xl.safetensors", {"ss_base_model_version": "sdxl_base_v1-0"})
    with pytest.raises(SdtuneError) as e:
        diagnose(DiagnoseConfig(str(base), lora=str(xl)))
    assert str(xl) in str(e.value) and str(base) in str(e.value) and "SDXL" in str(e.value)
    stray = save_safetensors({"lora_unet_nowhere.lora_down.weight": torch.ones(2, 8),
                              "lora_unet_nowhere.lora_up.weight": torch.ones(8, 2)}, tmp_path / "s.safetensors")
    with pytest.raises(SdtuneError, match="none of the 1 modules") as e:
        diagnose(DiagnoseConfig(str(base), lora=str(stray)))
    assert str(stray) in str(e.value) and str(base) in str(e.value)
    with pytest.raises(SdtuneError, match="exactly one of model"):
        diagnose(DiagnoseConfig(str(base), model=str(base), lora=str(stray)))
    with pytest.raises(SdtuneError, match="does not exist"):
        diagnose(DiagnoseConfig(str(tmp_path / "missing.safetensors"), model=str(base)))
    with pytest.raises(SdtuneError, match="diagnose cancelled"):
        diagnose(DiagnoseConfig(str(base), model=str(base)), cancelled=lambda: True)


def test_cli_writes_the_three_reports_and_refuses_like_the_other_repair_tools(overfit, tmp_path: Path,
                                                                              capsys) -> None:
    from PIL import Image

    base, model = overfit
    dataset = tmp_path / "dataset" / "10_sks"
    dataset.mkdir(parents=True)
    for i, caption in enumerate(["sks, smile, outdoors", "sks, smile", "sks"]):
        (dataset / f"{i}.png").write_bytes(b"")  # only the captions are read
        (dataset / f"{i}.txt").write_text(caption)
    out = tmp_path / "report"
    argv = ["repair", "diagnose", "--model", str(model), "--base", str(base), "-o", str(out), "--no-progress"]
    assert main([*argv, "--dataset", str(dataset.parent), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["output"] == str(out) and data["triggered"] >= 2 and data["kind"] == "checkpoint"
    assert list(data["encoders"][0]["tags"]) == ["sks", "smile", "outdoors"] and "dataset" in data["tags_source"]
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.png", "report.txt"]  # no temp files
    stored = json.loads((out / "report.json").read_text())
    assert stored["verdicts"] == data["verdicts"] and stored["thresholds"][0]["why"]
    text = (out / "report.txt").read_text()
    assert "[!!] language drift in TE (CLIP-L)" in text and "repair te-override" in text
    with Image.open(out / "report.png") as im:
        assert im.format == "PNG" and im.width == 1000
    assert main(argv) == 1 and "already holds report.json" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0 and "wrote" in capsys.readouterr().out
    xl = save_safetensors({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(2, 64),
                           "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.ones(64, 2)},
                          tmp_path / "xl.safetensors", {"ss_base_model_version": "sdxl_base_v1-0"})
    assert main(["repair", "diagnose", "--lora", str(xl), "--base", str(base), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sdtune repair: error:") and str(xl) in err and str(base) in err
    for bad in (["--base", str(base)], ["--model", str(model), "--lora", str(model), "--base", str(base)]):
        with pytest.raises(SystemExit) as exit_:
            main(["repair", "diagnose", *bad])
        assert exit_.value.code == 2
