"""The trainer on the tiny real-layout models: runs for each family and algorithm, learns a toy task, writes
files that load, resumes to the same result, and fails early and clearly on bad settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from lib_sdtune.cli import main
from lib_sdtune.errors import SdtuneError
from lib_sdtune.models.loader import load_checkpoint
from lib_sdtune.networks.kohya_file import load_lora
from lib_sdtune.networks.lora_info import inspect_lora
from lib_sdtune.train.config import TrainConfig, apply_overrides, config_from_dict, load_train_config
from lib_sdtune.train.run_log import RunLog
from lib_sdtune.train.sampling import SamplePrompt, read_prompt_file
from lib_sdtune.train.trainer import train


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def _dataset(root: Path, n: int = 4, colour=(200, 30, 30), caption: str = "sdtdemo, red square") -> Path:
    """A kohya folder `root/train/2_sdtdemo` of n small solid images with captions."""
    folder = root / "train" / "2_sdtdemo"
    folder.mkdir(parents=True)
    for i in range(n):
        im = Image.new("RGB", (64, 64), colour)
        im.paste((255, 255, 255), (8 * i, 8, 8 * i + 16, 24))
        im.save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(caption, encoding="utf-8")
    return root / "train"


def _config(ckpt: Path, data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(pretrained_model_name_or_path=str(ckpt), train_data_dir=str(data), output_dir=str(out),
                output_name="tiny", resolution=64, train_batch_size=2, max_train_steps=4, seed=1,
                learning_rate=1e-3, network_dim=4, network_alpha=2.0, max_data_loader_n_workers=0)
    base.update(kw)
    return TrainConfig(**base)


def test_sd1_lora_trains_saves_sd_scripts_files_and_reports_progress(tiny_fp32_checkpoints, tmp_path):
    data = _dataset(tmp_path / "ds")
    seen = []
    cfg = _config(tiny_fp32_checkpoints["sd1"], data, tmp_path / "out", save_every_n_epochs=1)
    result = train(cfg, progress=lambda done, total, info: seen.append((done, total, info["epoch"])))
    # 4 images x 2 repeats / batch 2 = 4 batches per epoch: 4 steps = 1 epoch
    assert result.steps == 4 and result.epochs == 1 and len(result.losses) == 4
    assert seen[-1] == (4, 4, 1) and all(torch.isfinite(torch.tensor(result.losses)))
    final = tmp_path / "out" / "tiny.safetensors"
    assert result.outputs == [final]  # the last epoch is saved once, as the final file
    sd, meta = load_lora(final)
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_steps"] == "4" and meta["ss_epoch"] == "1"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_seed"] == "1"
    assert json.loads(meta["ss_tag_frequency"]) == {"2_sdtdemo": {"sdtdemo": 4, "red square": 4}}
    assert json.loads(meta["sdtune_train_config"])["network_dim"] == 4
    info = inspect_lora(final)
    assert info.rank == 4 and info.te_modules == 72 and info.unet_modules == 192
    assert any(float(t.abs().max()) > 0 for k, t in sd.items() if "lora_up" in k)  # it learned something
    assert json.loads(result.config_path.read_text())["output_name"] == "tiny"
    log_json, log_png = result.log_paths
    logged = json.loads(log_json.read_text())
    assert [e["epoch"] for e in logged["epochs"]] == [1] and len(logged["steps"]) == 4
    assert logged["epochs"][0]["train_loss"] == pytest.approx(sum(result.losses) / 4)
    with Image.open(log_png) as im:
        assert im.format == "PNG" and im.size == (800, 400)


def test_run_log_reports_a_lasting_step_rate_collapse_once(tmp_path):
    log = RunLog(tmp_path, "x")
    assert all(log.add_step(i, 1.0, 1e-4, 0.5) is None for i in range(25))
    assert log.add_step(25, 1.0, 1e-4, 3.0) is None  # one slow step is a hiccup
    warnings = [log.add_step(26 + i, 1.0, 1e-4, 3.0) for i in range(6)]
    assert sum(w is not None for w in warnings) == 1 and "gradient_checkpointing" in next(w for w in warnings if w)


@pytest.mark.parametrize("arch, network_args", [
    ("sd2-v", []), ("sdxl", []), ("sd1", ["algo=loha", "conv_dim=2"]), ("sd1", ["algo=lokr"]),
    ("sd1", ["algo=locon", "dora_wd=True"]), ("sd1", ["conv_dim=2", "rank_dropout=0.1", "module_dropout=0.1"]),
])
def test_each_family_and_algorithm_trains_a_few_steps(tiny_checkpoints, tmp_path, arch, network_args):
    data = _dataset(tmp_path / "ds", n=2)
    module = "lycoris.kohya" if any(a.startswith("algo=") for a in network_args) else "networks.lora"
    cfg = _config(tiny_checkpoints[arch], data, tmp_path / "out", max_train_steps=2, network_module=module,
                  network_args=network_args, resolution=64 if arch != "sdxl" else 64)
    result = train(cfg)
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    sd, meta = load_lora(result.outputs[-1])
    assert meta["ss_network_module"] == module
    if arch == "sdxl":
        assert any(k.startswith("lora_te2_") for k in sd) and meta["ss_base_model_version"] == "sdxl_base_v1-0"
    if arch == "sd2-v":
        assert meta["modelspec.prediction_type"] == "v"


@pytest.mark.parametrize("optimizer, lr, args", [
    ("AdamW", 1e-3, ["weight_decay=0.01", "betas=0.9,0.99"]), ("Lion", 3e-4, []), ("SGDNesterov", 1e-2, []),
    ("Prodigy", 1.0, []), ("DAdaptAdam", 1.0, []), ("AdaFactor", 1e-3, ["relative_step=False"]),
    ("AdamWScheduleFree", 1e-3, []),
])
def test_each_optimizer_that_runs_on_cpu_trains(tiny_checkpoints, tmp_path, optimizer, lr, args):
    pytest.importorskip({"Lion": "lion_pytorch", "Prodigy": "prodigyopt", "DAdaptAdam": "dadaptation",
                         "AdamWScheduleFree": "schedulefree"}.get(optimizer, "torch"))
    data = _dataset(tmp_path / "ds", n=2)
    cfg = _config(tiny_checkpoints["sd1"], data, tmp_path / "out", max_train_steps=3, optimizer_type=optimizer,
                  optimizer_args=args, learning_rate=lr, unet_lr=lr, text_encoder_lr=lr)
    result = train(cfg)
    assert result.steps == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    _, meta = load_lora(result.outputs[-1])
    cls = {"SGDNesterov": "SGD", "AdaFactor": "Adafactor"}.get(optimizer, optimizer)
    assert meta["ss_optimizer"].split("(")[0].endswith("." + cls), meta["ss_optimizer"]


def test_loss_falls_on_a_learnable_toy_task(tiny_fp32_checkpoints, tmp_path):
    """Identical images and captions, half held out: the validation loss (fixed noise and timesteps) drops."""
    data = _dataset(tmp_path / "ds", n=8)
    cfg = _config(tiny_fp32_checkpoints["sd1"], data, tmp_path / "out", max_train_steps=None, max_train_epochs=6,
                  validation_split=0.5, validation_seed=0, learning_rate=3e-3, network_dim=8, network_alpha=8.0,
                  text_encoder_lr=0)
    result = train(cfg)
    first, last = result.validation_losses[0][1], result.validation_losses[-1][1]
    assert len(result.validation_losses) == 6 and last < first * 0.9, result.validation_losses


def test_resume_continues_to_the_same_result_as_an_unbroken_run(tiny_fp32_checkpoints, tmp_path):
    data = _dataset(tmp_path / "ds")
    ckpt = tiny_fp32_checkpoints["sd1"]
    whole = train(_config(ckpt, data, tmp_path / "a", max_train_steps=6, network_dropout=0.1))
    calls = {"n": 0}

    def stop_after_three() -> bool:
        calls["n"] += 1
        return calls["n"] >= 3

    broken = train(_config(ckpt, data, tmp_path / "b", max_train_steps=6, network_dropout=0.1),
                   cancelled=stop_after_three)
    assert broken.cancelled and broken.steps == 3 and not broken.outputs and broken.state_dir.exists()
    # runs go into the hosts' LoRA folders, which list every .safetensors/.pt below them: the state hides
    assert sorted(p.name for p in broken.state_dir.iterdir()) == ["network.state", "optimizer.state",
                                                                  "train_state.json"]
    resumed = train(_config(ckpt, data, tmp_path / "b", max_train_steps=6, network_dropout=0.1,
                            resume=str(broken.state_dir)))
    assert resumed.steps == 6
    a, _ = load_lora(whole.outputs[-1])
    b, _ = load_lora(resumed.outputs[-1])
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SdtuneError, match="different training settings"):
        train(_config(ckpt, data, tmp_path / "c", max_train_steps=6, learning_rate=5e-4,
                      resume=str(broken.state_dir)))


def test_nan_loss_stops_with_a_message_naming_the_step(tiny_checkpoints, tmp_path):
    data = _dataset(tmp_path / "ds", n=2)
    with pytest.raises(SdtuneError, match="loss became nan at step 1"):
        train(_config(tiny_checkpoints["sd1"], data, tmp_path / "out", noise_offset=float("nan")))
    assert not (tmp_path / "out" / "tiny.safetensors").exists()


def test_bad_settings_fail_before_training(tiny_checkpoints, tmp_path):
    data = _dataset(tmp_path / "ds", n=2)
    with pytest.raises(SdtuneError, match="AdamW8bit"):
        train(_config(tiny_checkpoints["sd1"], data, tmp_path / "out", optimizer_type="AdamW8bit"))
    with pytest.raises(SdtuneError, match="unknown setting 'learning_rat'"):
        config_from_dict({"learning_rat": 1e-4})
    with pytest.raises(SdtuneError, match="network_dim"):
        config_from_dict({"network_dim": "four"})
    with pytest.raises(SdtuneError, match="safetensors only"):
        _config(tiny_checkpoints["sd1"], data, tmp_path, save_model_as="ckpt").validate()
    with pytest.raises(SdtuneError, match="train_data_dir"):
        TrainConfig(pretrained_model_name_or_path="x.safetensors").validate()
    with pytest.raises(SdtuneError, match="vae = 'vae.safetensors': no such file"):
        _config(tiny_checkpoints["sd1"], data, tmp_path, vae="vae.safetensors").validate()
    with pytest.raises(SdtuneError, match="max_train_epochs or max_train_steps"):
        _config(tiny_checkpoints["sd1"], data, tmp_path, max_train_steps=0).validate()


def test_toml_sections_flatten_gui_json_maps_and_overrides_apply(tmp_path):
    (tmp_path / "c.toml").write_text('[model]\npretrained_model_name_or_path = "m.safetensors"\n'
                                     '[network]\nnetwork_dim = 16\nnetwork_args = ["conv_dim=4"]\nxformers = true\n'
                                     '[data]\ntrain_data_dir = "ds"\nresolution = "768,512"\n')
    cfg, notes = load_train_config(tmp_path / "c.toml", ["max_train_epochs=3", "unet_lr=2e-4"])
    assert cfg.network_dim == 16 and cfg.network_args == ["conv_dim=4"] and cfg.max_train_epochs == 3
    assert cfg.unet_lr == 2e-4 and cfg.pretrained_model_name_or_path == str(tmp_path / "m.safetensors")
    assert any("xformers" in n for n in notes)
    (tmp_path / "g.json").write_text(json.dumps({
        "LoRA_type": "LyCORIS/LoHa", "optimizer": "Lion", "epoch": 5, "network_dim": 8, "conv_dim": 4,
        "pretrained_model_name_or_path": "m.safetensors", "train_data_dir": "ds", "gui_theme": "dark"}))
    gui, notes = load_train_config(tmp_path / "g.json")
    assert gui.network_module == "lycoris.kohya" and gui.network_args[0] == "algo=loha"
    assert "conv_dim=4" in gui.network_args and gui.optimizer_type == "Lion" and gui.max_train_epochs == 5
    assert any("gui_theme" in n for n in notes)
    with pytest.raises(SdtuneError, match="--set"):
        apply_overrides(gui, ["nonsense=1"])


@pytest.mark.compat
def test_cli_train_writes_files_and_json(tiny_checkpoints, tmp_path, capsys):
    data = _dataset(tmp_path / "ds", n=2)
    (tmp_path / "t.toml").write_text(
        f'pretrained_model_name_or_path = "{tiny_checkpoints["sd1"]}"\ntrain_data_dir = "{data}"\n'
        f'output_dir = "{tmp_path / "out"}"\noutput_name = "cli"\nresolution = 64\nmax_train_steps = 2\n'
        'max_data_loader_n_workers = 0\nseed = 3\n')
    assert main(["train", str(tmp_path / "t.toml"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["steps"] == 2 and out["output"].endswith("cli.safetensors") and Path(out["output"]).exists()
    assert load_checkpoint(tiny_checkpoints["sd1"]).arch.family == "sd1"


def test_sample_prompt_file_is_read_like_sd_scripts(tmp_path):
    (tmp_path / "p.txt").write_text("# comment\n\na red circle --n blurry, low quality --w 96 --h 64 --d 7 --l 5.5 "
                                    "--s 3 --ss euler_a\nsdtdemo\n", encoding="utf-8")
    first, second = read_prompt_file(tmp_path / "p.txt")
    assert first == SamplePrompt("a red circle", "blurry, low quality", 96, 64, 7, 5.5, 3, "euler_a")
    assert second == SamplePrompt("sdtdemo")  # sd-scripts' defaults: 512x512, 30 steps, CFG 7.5
    (tmp_path / "bad.txt").write_text("x --w wide\n")
    with pytest.raises(SdtuneError, match="bad.txt:1: --w"):
        read_prompt_file(tmp_path / "bad.txt")


def test_sample_images_every_epoch_beside_the_outputs(tiny_checkpoints, tmp_path):
    data = _dataset(tmp_path / "ds", n=2)
    (tmp_path / "p.txt").write_text("sdtdemo, red square --w 64 --h 64 --s 2 --d 1\nblue --w 64 --h 64 --s 2 "
                                    "--ss euler_a\n")
    cfg = _config(tiny_checkpoints["sd1"], data, tmp_path / "out", max_train_steps=None, max_train_epochs=2,
                  sample_prompts=str(tmp_path / "p.txt"), sample_every_n_epochs=1, sample_at_first=True,
                  clip_skip=2)
    result = train(cfg)
    names = sorted(p.name.split("_")[1] for p in result.samples)
    assert names == ["e000000"] * 2 + ["e000001"] * 2 + ["e000002"] * 2
    for path in result.samples:
        assert path.parent == tmp_path / "out" / "sample"
        with Image.open(path) as im:
            assert im.size == (64, 64)


def test_fp8_base_stores_the_unet_in_float8_and_trains(tiny_checkpoints, tmp_path):
    data = _dataset(tmp_path / "ds", n=2)
    common = dict(max_train_steps=2, network_args=["conv_dim=2"], mixed_precision="bf16")
    plain = train(_config(tiny_checkpoints["sd1"], data, tmp_path / "plain", **common))
    fp8 = train(_config(tiny_checkpoints["sd1"], data, tmp_path / "fp8", fp8_base=True, **common))
    assert any(n.startswith("fp8_base: the U-Net's Linear/Conv weights are stored in float8") for n in fp8.notes)
    # the adapter starts at zero: step 1 is the base model's loss, fp8-rounded weights move it only a little
    assert fp8.losses[0] == pytest.approx(plain.losses[0], rel=0.05) and fp8.losses[0] != plain.losses[0]
    # LyCORIS rebuilds its weight in the layer's dtype: on an fp8 layer its update is added beside the layer
    loha = train(_config(tiny_checkpoints["sd1"], data, tmp_path / "loha", fp8_base=True, **{
        **common, "network_module": "lycoris.kohya", "network_args": ["algo=loha", "conv_dim=2"]}))
    for run in (fp8, loha):
        assert all(torch.isfinite(torch.tensor(run.losses))) and run.losses[1] != run.losses[0]
        assert load_lora(run.outputs[-1])[0]


def test_fp8_base_needs_mixed_precision_and_refuses_lost_dropouts(tiny_checkpoints, tmp_path):
    data = _dataset(tmp_path / "ds", n=2)
    with pytest.raises(SdtuneError, match="fp8_base needs mixed_precision"):
        _config(tiny_checkpoints["sd1"], data, tmp_path, fp8_base=True).validate()
    with pytest.raises(SdtuneError, match="algo=lokr: rank_dropout/module_dropout are not applied"):
        train(_config(tiny_checkpoints["sd1"], data, tmp_path / "out", fp8_base=True, mixed_precision="bf16",
                      network_module="lycoris.kohya", network_args=["algo=lokr", "module_dropout=0.1"]))


def test_sdxl_samples_with_both_text_encoders_on_an_fp8_unet(tiny_checkpoints, tmp_path):
    data = _dataset(tmp_path / "ds", n=2)
    (tmp_path / "p.txt").write_text("sdtdemo, red square --w 64 --h 64 --s 2 --d 3\n")
    result = train(_config(tiny_checkpoints["sdxl"], data, tmp_path / "out", max_train_steps=2,
                           mixed_precision="bf16", fp8_base=True, sample_prompts=str(tmp_path / "p.txt"),
                           sample_at_first=True, sample_every_n_epochs=1))
    assert [p.name.split("_")[1] for p in result.samples] == ["e000000", "e000001"]
    with Image.open(result.samples[0]) as a, Image.open(result.samples[1]) as b:
        assert a.size == (64, 64) and a.tobytes() != b.tobytes()  # the trained adapter changed the image


def test_a_separate_vae_file_in_any_layout_replaces_the_checkpoints_vae(tiny_checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    from lib_sdtune.models.loader import load_checkpoint
    from lib_sdtune.models.vae_file import load_vae_file

    ckpt = load_file(tiny_checkpoints["sd1"])
    bare = {k[len("first_stage_model."):]: v * 0.9 for k, v in ckpt.items() if k.startswith("first_stage_model.")}
    save_file(bare, tmp_path / "bare.safetensors")  # A1111's models/VAE layout
    save_file({f"first_stage_model.{k}": v for k, v in bare.items()}, tmp_path / "prefixed.safetensors")
    own = load_checkpoint(tiny_checkpoints["sd1"], components=["vae"]).modules["vae"]
    loaded = load_vae_file(tmp_path / "bare.safetensors", own)
    save_file({k: v.contiguous() for k, v in loaded.state_dict().items()}, tmp_path / "diffusers.safetensors")
    for name in ("prefixed", "diffusers"):
        other = load_vae_file(tmp_path / f"{name}.safetensors", own)
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), other.state_dict().values()))
    w, w0 = loaded.encoder.conv_in.weight, own.encoder.conv_in.weight
    assert torch.allclose(w.float(), w0.float() * 0.9, atol=1e-3) and loaded.config == own.config
    with pytest.raises(SdtuneError, match="unet.safetensors: not a VAE file"):
        save_file({k: v for k, v in ckpt.items() if k.startswith("model.")}, tmp_path / "unet.safetensors")
        load_vae_file(tmp_path / "unet.safetensors", own)

    data = _dataset(tmp_path / "ds", n=2)
    plain = train(_config(tiny_checkpoints["sd1"], data, tmp_path / "plain", max_train_steps=1))
    run = train(_config(tiny_checkpoints["sd1"], data, tmp_path / "out", max_train_steps=1,
                        vae=str(tmp_path / "bare.safetensors")))
    assert run.losses[0] != plain.losses[0]  # other latents
    meta = load_lora(run.outputs[-1])[1]
    assert meta["ss_vae_name"] == "bare.safetensors" and len(meta["ss_new_vae_hash"]) == 64


def test_a_datasets_network_multiplier_scales_the_adapter_for_its_batches(tiny_checkpoints, tmp_path):
    data = _dataset(tmp_path / "ds", n=2)
    folder = (data / "2_sdtdemo").as_posix()

    def run(multiplier: float, name: str):
        toml = tmp_path / f"{name}.toml"
        toml.write_text(f'[[datasets]]\nresolution = 64\nbatch_size = 2\nnetwork_multiplier = {multiplier}\n'
                        f'[[datasets.subsets]]\nimage_dir = "{folder}"\nnum_repeats = 2\n')
        return train(_config(tiny_checkpoints["sd1"], None, tmp_path / name, max_train_steps=2,
                             dataset_config=str(toml), train_data_dir=None))

    off, half = run(0.0, "off"), run(0.5, "half")
    ups = [[t for k, t in load_lora(r.outputs[-1])[0].items() if "lora_up" in k] for r in (off, half)]
    assert all(float(t.abs().max()) == 0 for t in ups[0])  # at multiplier 0 the adapter gets no gradient
    assert any(float(t.abs().max()) > 0 for t in ups[1])
