"""The training planner: rules with reasons, sd-scripts' steps math, VRAM presets, warnings, a valid config."""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import pytest
from PIL import Image

from lib_sdtune.errors import SdtuneError
from lib_sdtune.train.planner import plan_training
from lib_sdtune.train.planner_rules import FAMILIES, METHODS, RULES, PlanFacts, decide, keys_in_order
from lib_sdtune.train.planner_toml import to_toml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Every argument of sd-scripts' train_network.py parser (setup_parser at kohya-ss/sd-scripts 48d368f:
# add_logging_arguments, add_sd_models_arguments, add_model_spec_arguments, add_dataset_arguments(True, True, True),
# add_training_arguments(True), add_masked_loss_arguments, add_deepspeed_arguments, add_optimizer_arguments,
# add_config_arguments, add_custom_train_arguments and train_network.py's own), extracted from the source.
SD_SCRIPTS_ARGS = frozenset("""
adaptive_noise_scale alpha_mask async_upload base_weights base_weights_multiplier bucket_no_upscale bucket_reso_steps
cache_info cache_latents cache_latents_to_disk caption_dropout_every_n_epochs caption_dropout_rate
caption_extension caption_extention caption_prefix caption_separator caption_suffix caption_tag_dropout_rate clip_skip
color_aug conditioning_data_dir config_file console_log_file console_log_level console_log_simple
cpu_offload_checkpointing dataset_class dataset_config dataset_repeats ddp_gradient_as_bucket_view ddp_static_graph
ddp_timeout debiased_estimation_loss debug_dataset deepspeed dim_from_weights disable_mmap_load_safetensors
dynamo_backend enable_bucket enable_wildcard face_crop_aug_range flip_aug fp16_master_weights_and_gradients fp8_base
fp8_base_unet full_bf16 full_fp16 fused_backward_pass gradient_accumulation_steps gradient_checkpointing highvram
huber_c huber_scale huber_schedule huggingface_path_in_repo huggingface_repo_id huggingface_repo_type
huggingface_repo_visibility huggingface_token in_json initial_epoch initial_step ip_noise_gamma
ip_noise_gamma_random_strength keep_tokens keep_tokens_separator learning_rate log_config log_prefix
log_tracker_config log_tracker_name log_with logging_dir loss_type lowram lr_decay_steps lr_scheduler
lr_scheduler_args lr_scheduler_min_lr_ratio lr_scheduler_num_cycles lr_scheduler_power lr_scheduler_timescale
lr_scheduler_type lr_warmup_steps masked_loss max_bucket_reso max_data_loader_n_workers max_grad_norm max_timestep
max_token_length max_train_epochs max_train_steps max_validation_steps mem_eff_attn metadata_author
metadata_description metadata_is_negative_embedding metadata_license metadata_merged_from metadata_preprocessor
metadata_tags metadata_thumbnail metadata_title metadata_trigger_phrase metadata_usage_hint min_bucket_reso
min_snr_gamma min_timestep mixed_precision multires_noise_discount multires_noise_iterations network_alpha
network_args network_dim network_dropout network_module network_train_text_encoder_only network_train_unet_only
network_weights no_metadata noise_offset noise_offset_random_strength offload_optimizer_device
offload_optimizer_nvme_path offload_param_device offload_param_nvme_path optimizer_args optimizer_type output_config
output_dir output_name persistent_data_loader_workers pretrained_model_name_or_path prior_loss_weight random_crop
reg_data_dir resize_interpolation resolution resume resume_from_huggingface sample_at_first sample_every_n_epochs
sample_every_n_steps sample_prompts sample_sampler save_every_n_epochs save_every_n_steps save_last_n_epochs
save_last_n_epochs_state save_last_n_steps save_last_n_steps_state save_model_as save_n_epoch_ratio save_precision
save_state save_state_on_train_end save_state_to_huggingface scale_v_pred_loss_like_noise_pred scale_weight_norms sdpa
secondary_separator seed shuffle_caption skip_cache_check skip_until_initial_step text_encoder_lr token_warmup_min
token_warmup_step tokenizer_cache_dir torch_compile train_batch_size train_data_dir training_comment unet_lr
use_8bit_adam use_lion_optimizer v2 v_parameterization v_pred_like_loss vae vae_batch_size validate_every_n_epochs
validate_every_n_steps validation_seed validation_split wandb_api_key wandb_run_name weighted_captions xformers
zero3_init_flag zero3_save_16bit_model zero_stage zero_terminal_snr
""".split())
# sdxl_train_network.py adds these (sdxl_train_util.add_sdxl_training_arguments)
SDXL_ONLY_ARGS = frozenset({"cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk", "no_half_vae"})


def _image(path: Path, size=(64, 64), seed=0) -> None:
    """A random-noise image: no two seeds look alike to a perceptual hash."""
    rng = random.Random(seed)
    img = Image.new("RGB", size)
    img.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(size[0] * size[1])])
    img.save(path)


def make_dataset(root: Path, folders: dict[str, int], size=(64, 64), caption="trig, {i}tag, red, blue",
                 seed=0) -> Path:
    """root/<folder>/NNNN.png + .txt for each folder name -> image count; returns root."""
    for f_i, (name, count) in enumerate(folders.items()):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            _image(d / f"{i:04d}.png", size, seed * 100000 + f_i * 1000 + i)
            if caption is not None:
                (d / f"{i:04d}.txt").write_text(caption.format(i=i), encoding="utf-8")
    return root


def plan(ds: Path, **kw):
    kw.setdefault("family", "sd1")
    kw.setdefault("vram_gb", 12)
    return plan_training(ds, **kw)


# --- steps math --------------------------------------------------------------------------------------------------

def test_steps_math_equals_sd_scripts_formula(tmp_path):
    """batches/epoch = sum over buckets of ceil(samples/batch) (train_util.py:1077), steps = epochs x that."""
    ds = make_dataset(tmp_path / "ds", {"3_trig": 7})
    for i in range(5):  # 2:1 images land in another bucket than the squares
        _image(ds / "3_trig" / f"w{i}.png", (128, 64), 500 + i)
        (ds / "3_trig" / f"w{i}.txt").write_text("trig, wide", encoding="utf-8")
    p = plan(ds, vram_gb=12)  # SD1 12 GB: batch 4
    assert p.config["train_batch_size"] == 4
    per_epoch = math.ceil(7 * 3 / 4) + math.ceil(5 * 3 / 4)  # 6 + 4 = 10, not ceil(36/4) = 9
    assert p.steps.batches_per_epoch == per_epoch == 10
    assert sorted(b.samples for b in p.steps.buckets) == [15, 21]
    assert p.steps.total_steps == p.config["max_train_epochs"] * per_epoch
    # sd-scripts: max_train_steps = max_train_epochs * ceil(len(dataloader) / num_processes / grad_accum)
    assert p.steps.total_steps == p.config["max_train_epochs"] * math.ceil(per_epoch / 1 / 1)
    assert p.config["lr_warmup_steps"] == round(0.1 * p.steps.total_steps)


def test_reg_images_double_the_samples_but_not_the_epochs(tmp_path):
    ds = make_dataset(tmp_path / "train", {"5_trig": 12})
    reg = make_dataset(tmp_path / "reg", {"1_thing": 12}, caption="thing", seed=7)
    with_reg, without = plan(ds, reg_data_dir=reg), plan(ds)
    assert with_reg.steps.samples_per_epoch == 2 * with_reg.steps.train_samples_per_epoch == 120
    assert with_reg.config["max_train_epochs"] == without.config["max_train_epochs"]
    assert with_reg.steps.batches_per_epoch == 2 * without.steps.batches_per_epoch
    assert with_reg.config["reg_data_dir"] == str(reg.resolve())


def test_total_steps_scale_with_dataset_size_and_resolution(tmp_path):
    small = plan(make_dataset(tmp_path / "s", {"10_trig": 20}), vram_gb=24, check_duplicates=False)
    big = plan(make_dataset(tmp_path / "b", {"2_trig": 200}), vram_gb=24, check_duplicates=False)
    assert 1 <= small.config["max_train_epochs"] <= 20 and 1 <= big.config["max_train_epochs"] <= 20
    assert small.steps.target_samples == 2012  # 450 x sqrt(20): each image ~100 times at 512 px
    assert big.steps.target_samples > small.steps.target_samples  # more images: more samples in all ...
    per_image = [p.steps.target_samples / p.dataset_facts.n_images for p in (small, big)]
    assert per_image[1] < per_image[0] / 2  # ... but each image seen fewer times
    assert big.steps.train_samples_per_epoch == 180 * 2  # 10% held out for validation (>= 20 images)
    assert big.config["max_train_epochs"] * 360 == pytest.approx(big.steps.target_samples, rel=0.1)
    xl = plan(tmp_path / "s", family="sdxl", vram_gb=24, check_duplicates=False)
    assert xl.steps.target_samples < small.steps.target_samples  # 1024 px: fewer samples
    assert small.config["validation_split"] == 0.1 and small.config["validate_every_n_epochs"] >= 1


def test_repeats_advice_when_the_folders_repeats_miss_the_epoch_range(tmp_path):
    low = plan(make_dataset(tmp_path / "low", {"1_trig": 12}))  # 12 samples/epoch for ~1500: 125 epochs
    assert low.config["max_train_epochs"] == 20
    assert [w for w in low.warnings if w.kind == "repeats"]
    assert low.repeats_advice and low.repeats_advice[0].suggested > 1
    high = plan(make_dataset(tmp_path / "high", {"100_trig": 12}))
    assert high.config["max_train_epochs"] == 1 and high.repeats_advice[0].suggested < 100


# --- broken and odd datasets ---------------------------------------------------------------------------------------

def test_one_image_dataset_plans_with_warnings(tmp_path):
    p = plan(make_dataset(tmp_path / "one", {"10_trig": 1}), vram_gb=24)
    kinds = {w.kind for w in p.warnings}
    assert "too_few_images" in kinds
    assert p.config["train_batch_size"] == 1  # capped at the number of images
    assert p.config["network_train_unet_only"] is True and "text_encoder_lr" not in p.config
    assert p.config["flip_aug"] is True
    assert p.steps.total_steps >= 1


def test_pointing_at_the_concept_folder_uses_its_parent(tmp_path):
    ds = make_dataset(tmp_path / "ds", {"10_trig": 3})
    p = plan(ds / "10_trig")
    assert p.config["train_data_dir"] == str(ds.resolve())
    assert any(w.kind == "wrong_level" and "parent" in w.message for w in p.warnings)


def test_a_plain_image_folder_is_refused_with_the_fix(tmp_path):
    make_dataset(tmp_path / "ds", {"pics": 3})
    with pytest.raises(SdtuneError, match="parent folder"):
        plan(tmp_path / "ds" / "pics")


def test_broken_files_are_skipped_and_reported(tmp_path):
    ds = make_dataset(tmp_path / "ds", {"10_trig": 6})
    folder = ds / "10_trig"
    (folder / "0000.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")  # corrupt image
    (folder / "0001.txt").write_text("", encoding="utf-8")  # empty caption
    (folder / "0002.txt").write_bytes("trig, caf\xe9".encode("latin-1"))  # not UTF-8
    p = plan(ds)
    scan_msgs = " | ".join(w.message for w in p.warnings if w.kind == "scan")
    assert "0000.png" in scan_msgs and "0002.txt" in scan_msgs and "UTF-8" in scan_msgs
    assert p.dataset_facts.n_images == 4  # the corrupt image and the one with an unreadable caption are out
    untagged = [w for w in p.warnings if w.kind == "untagged"]
    assert untagged and "0001.png" in untagged[0].message and "0.35" in untagged[0].message


def test_untagged_dataset_says_how_to_tag(tmp_path):
    p = plan(make_dataset(tmp_path / "ds", {"10_trig": 4}, caption=None))
    w = next(w for w in p.warnings if w.kind == "untagged")
    assert "4 of 4" in w.message and "wd14" in w.message
    assert "shuffle_caption" not in p.config  # no tag captions to shuffle


def test_near_duplicates_are_found(tmp_path):
    ds = make_dataset(tmp_path / "ds", {"10_trig": 5})
    Image.open(ds / "10_trig" / "0000.png").resize((96, 96)).save(ds / "10_trig" / "copy.png")
    (ds / "10_trig" / "copy.txt").write_text("trig, copy", encoding="utf-8")
    p = plan(ds)
    dup = [w for w in p.warnings if w.kind == "near_duplicates"]
    assert len(dup) == 1 and "0000.png" in dup[0].message and "copy.png" in dup[0].message
    assert not [w for w in plan(ds, check_duplicates=False).warnings if w.kind == "near_duplicates"]


def test_tags_on_every_image_name_the_trigger_word(tmp_path):
    p = plan(make_dataset(tmp_path / "ds", {"10_trig": 12}, caption="mytrig, {i}x, solo, red"))
    assert p.dataset_facts.shared_tags == ("mytrig", "solo", "red")
    assert p.config["output_name"] == "mytrig"
    assert p.config["shuffle_caption"] is True and p.config["keep_tokens"] == 1
    assert any(w.kind == "trigger_word" and "mytrig" in w.message for w in p.warnings)
    shared = next(w for w in p.warnings if w.kind == "shared_tags")
    assert "'solo'" in shared.message and "'mytrig'" not in shared.message


def test_dataset_config_input_keeps_its_own_batch_size(tmp_path):
    ds = make_dataset(tmp_path / "ds", {"img": 8})
    cfg = tmp_path / "data.toml"
    cfg.write_text(f'[[datasets]]\nbatch_size = 3\n[[datasets.subsets]]\nimage_dir = "{(ds / "img").as_posix()}"\n'
                   'num_repeats = 4\n', encoding="utf-8")
    p = plan(cfg)
    assert p.config["dataset_config"] == str(cfg.resolve()) and "train_data_dir" not in p.config
    assert p.steps.batch_size == 3 and p.steps.batches_per_epoch == math.ceil(32 / 3)
    assert any(w.kind == "dataset_config" for w in p.warnings)


# --- VRAM presets, optimizers, methods -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ds12(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("ds12"), {"10_trig": 12})


def test_sd1_and_sdxl_at_8gb_differ_sensibly(ds12):
    sd1 = plan(ds12, family="sd1", vram_gb=8)
    xl = plan(ds12, family="sdxl", vram_gb=8)
    assert sd1.config["resolution"] == "512,512" and xl.config["resolution"] == "1024,1024"
    assert sd1.config["train_batch_size"] == 2 and xl.config["train_batch_size"] == 1
    assert xl.config["gradient_checkpointing"] is True and xl.config["network_train_unet_only"] is True
    assert xl.config["cache_text_encoder_outputs"] is True
    assert xl.config["shuffle_caption"] is False  # forbidden with cached TE outputs
    assert xl.config["network_dim"] == 8 < sd1.config["network_dim"]
    assert xl.config["no_half_vae"] is True and xl.config["mixed_precision"] == "fp16"
    assert sd1.config["network_train_unet_only"] is False and "cache_text_encoder_outputs" not in sd1.config
    assert sd1.config["shuffle_caption"] is True
    assert "no_half_vae" not in sd1.config and "noise_offset" not in sd1.config
    assert sd1.config["clip_skip"] == 2 and "clip_skip" not in xl.config  # tag captions on SD1: an anime base
    for p in (sd1, xl):
        assert p.config["optimizer_type"] == "AdamW8bit" and p.config["cache_latents"] is True
        assert all(v.reason and v.source for v in p.values if v.value is not None)


@pytest.mark.parametrize("vram,batch,ckpt,unet_only", [(8, 1, True, True), (12, 1, True, True),
                                                       (16, 2, True, False), (24, 4, True, False)])
def test_sdxl_presets_by_vram(ds12, vram, batch, ckpt, unet_only):
    p = plan(ds12, family="sdxl", vram_gb=vram, bf16=True)
    assert p.config["train_batch_size"] == batch and p.config["gradient_checkpointing"] is ckpt
    assert p.config["network_train_unet_only"] is unet_only
    assert p.config["mixed_precision"] == "bf16" and "no_half_vae" not in p.config


@pytest.mark.parametrize("vram,batch,ckpt", [(8, 2, True), (12, 4, False), (16, 4, False), (24, 4, False)])
def test_sd1_presets_by_vram(ds12, vram, batch, ckpt):
    p = plan(ds12, family="sd1", vram_gb=vram)
    assert p.config["train_batch_size"] == batch and p.config["gradient_checkpointing"] is ckpt


def test_cpu_only_plan(ds12):
    p = plan(ds12, family="sdxl", vram_gb=0)
    assert p.config["optimizer_type"] == "AdamW" and p.config["mixed_precision"] == "no"
    assert p.config["train_batch_size"] == 1 and p.config["gradient_checkpointing"] is False
    assert any(w.kind == "device" for w in p.warnings)
    p8 = plan(ds12, vram_gb=0, optimizer="AdamW8bit")
    assert any(w.kind == "optimizer" for w in p8.warnings)


@pytest.mark.parametrize("optimizer,unet,te,scheduler", [
    ("AdamW", 1e-4, 1e-5, "cosine"), ("AdamW8bit", 1e-4, 1e-5, "cosine"), ("Lion", 3e-5, 3e-6, "cosine"),
    ("Lion8bit", 3e-5, 3e-6, "cosine"), ("Prodigy", 1.0, 1.0, "constant"), ("DAdaptAdam", 1.0, 1.0, "constant")])
def test_learning_rates_follow_the_optimizer_family(ds12, optimizer, unet, te, scheduler):
    p = plan(ds12, optimizer=optimizer, vram_gb=24)
    assert p.config["optimizer_type"] == optimizer
    assert p.config["unet_lr"] == unet and p.config["text_encoder_lr"] == te and p.config["learning_rate"] == unet
    assert p.config["lr_scheduler"] == scheduler
    assert ("lr_warmup_steps" in p.config) is (scheduler == "cosine")  # sd-scripts refuses constant + warm-up


def test_unknown_optimizer_is_refused(ds12):
    with pytest.raises(SdtuneError, match="optimizer 'Adam9000'"):
        plan(ds12, optimizer="Adam9000")


@pytest.mark.parametrize("method,module,algo", [("lora", "networks.lora", None), ("locon", "networks.lora", None),
                                                ("loha", "lycoris.kohya", "loha"), ("lokr", "lycoris.kohya", "lokr")])
def test_methods_give_network_settings_the_network_layer_accepts(ds12, method, module, algo):
    from lib_sdtune.networks.config import from_network_args

    p = plan(ds12, method=method)
    assert p.config["network_module"] == module
    args = p.config.get("network_args")
    cfg = from_network_args(p.config["network_dim"], p.config["network_alpha"], args)
    assert cfg.network_module == module
    if algo:
        assert f"algo={algo}" in args and cfg.algorithm == algo
    if method == "locon":
        assert cfg.conv_rank == p.config["network_dim"] // 2
    if method == "lora":
        assert args is None and cfg.conv_rank is None


def test_model_family_comes_from_the_checkpoint(ds12, tiny_checkpoints):
    sd2v = plan(ds12, model_path=tiny_checkpoints["sd2-v"], family=None)
    assert sd2v.model.architecture == "sd2-v" and sd2v.config["v2"] is True
    assert sd2v.config["v_parameterization"] is True and sd2v.config["resolution"] == "768,768"
    assert sd2v.config["pretrained_model_name_or_path"] == str(Path(tiny_checkpoints["sd2-v"]).resolve())
    sd2 = plan(ds12, family="sd2")
    assert sd2.config["v2"] is True and "v_parameterization" not in sd2.config
    assert sd2.config["resolution"] == "512,512" and "clip_skip" not in sd2.config
    xl = plan(ds12, model_path=tiny_checkpoints["sdxl"], family="sd1")
    assert xl.model.family == "sdxl" and any(w.kind == "model" for w in xl.warnings)
    assert "v2" not in xl.config and "v_parameterization" not in xl.config
    with pytest.raises(SdtuneError, match="refiner"):
        plan(ds12, model_path=tiny_checkpoints["sdxl-refiner"])


# --- the rules table ------------------------------------------------------------------------------------------------

def test_every_rule_row_explains_itself_and_every_key_has_a_catch_all():
    for rule in RULES:
        if rule.value is not None:
            assert rule.reason and rule.source and rule.when, rule
    grid = [PlanFacts(fam, v, m, opt, vram, bf16, n, tags, tags, long_, ".txt")
            for fam in FAMILIES for v in (False, True) for m in METHODS for opt in ("adamw", "lion", "adaptive")
            for vram in (None, 0, 6, 8, 12, 16, 24, 80) for bf16 in (False, True) for n in (1, 9, 50)
            for tags in (False, True) for long_ in (False,)]
    for facts in grid:
        chosen: dict = {"max_train_epochs": 10}
        for key in keys_in_order():
            chosen[key] = decide(key, facts, chosen)[0]
        assert chosen["train_batch_size"] >= 1 and chosen["network_alpha"] >= 1
        if chosen["cache_text_encoder_outputs"]:
            assert chosen["network_train_unet_only"] and not chosen["shuffle_caption"]


# --- the config file ------------------------------------------------------------------------------------------------

def test_written_toml_uses_only_sd_scripts_argument_names(ds12, tmp_path, tiny_checkpoints):
    plans = [plan(ds12, family=fam, method=m, vram_gb=vram, optimizer=opt)
             for fam, m, vram, opt in (("sd1", "lora", 8, None), ("sd2-v", "locon", 12, "Lion"),
                                       ("sdxl", "loha", 8, None), ("sdxl", "lokr", 24, "Prodigy"),
                                       ("sd1", "lora", 0, None))]
    plans.append(plan(ds12, model_path=tiny_checkpoints["sd1"]))
    for i, p in enumerate(plans):
        out = p.write(tmp_path / f"c{i}.toml")
        parsed = tomllib.loads(out.read_text(encoding="utf-8"))
        assert parsed == p.config
        unknown = set(parsed) - SD_SCRIPTS_ARGS - SDXL_ONLY_ARGS
        assert not unknown, f"not sd-scripts arguments: {unknown}"
        if p.model.family != "sdxl":
            assert not set(parsed) & SDXL_ONLY_ARGS
        assert isinstance(parsed["resolution"], str) and "," in parsed["resolution"]  # sd-scripts splits on ","


def test_the_trainer_config_loader_accepts_the_plan(ds12, tmp_path, tiny_checkpoints):
    config = pytest.importorskip("lib_sdtune.train.config")
    if not hasattr(config, "load_train_config"):
        pytest.skip("the trainer's config loader is not built yet")
    p = plan(ds12, model_path=tiny_checkpoints["sd1"], method="loha")
    loaded = config.load_train_config(p.write(tmp_path / "plan.toml"))
    cfg = loaded[0] if isinstance(loaded, tuple) else loaded
    cfg.validate()
    assert cfg.max_train_epochs == p.config["max_train_epochs"] and cfg.network_args == p.config["network_args"]


def test_toml_writer_round_trips_awkward_values():
    values = {"a": 'quote " back\\slash', "b": "C:\\data\\10_x", "c": "ü ☃\ttab", "d": 1e-5, "e": 2.0, "f": 3,
              "g": True, "h": ["x=1", "y=\"2\""], "i": None}
    parsed = tomllib.loads(to_toml(values, {"a": "a comment\nover lines"}, header="head\nline"))
    assert parsed == {k: v for k, v in values.items() if v is not None}
    with pytest.raises(SdtuneError, match="inf"):
        to_toml({"x": float("inf")})


# --- the command line -----------------------------------------------------------------------------------------------

def test_cli_plan_json_and_config(ds12, tmp_path, capsys):
    from lib_sdtune.cli import main

    out = tmp_path / "cfg" / "train.toml"
    rc = main(["plan", str(ds12), "--family", "sdxl", "--vram", "12", "--method", "locon", "-o", str(out), "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["output"] == str(out) and out.is_file()
    assert result["config"] == tomllib.loads(out.read_text(encoding="utf-8"))
    assert result["config"]["output_dir"] == str(out.parent.resolve() / "output")
    assert result["values"]["train_batch_size"]["reason"] and result["values"]["unet_lr"]["source"]
    assert result["steps"]["total_steps"] == result["steps"]["epochs"] * result["steps"]["batches_per_epoch"]
    assert any(w["kind"] == "trigger_word" for w in result["warnings"])
    rc = main(["plan", str(ds12), "--family", "sd1", "--vram", "8"])
    text = capsys.readouterr().out
    assert rc == 0 and "train_batch_size = 2" in text and "[seed 001" in text and "steps:" in text


def test_cli_plan_error_is_one_paragraph(tmp_path, capsys):
    from lib_sdtune.cli import main

    assert main(["plan", str(tmp_path / "missing"), "--vram", "8"]) == 1
    err = capsys.readouterr().err
    assert "no such folder" in err and err.count("\n") == 1


def test_a_face_turns_the_plan_into_a_train_config_with_its_choices_on_top(ds12):
    p = plan(ds12, family="sd1", vram_gb=8)
    cfg, _ = p.train_config({"network_dim": 4, "max_train_epochs": 2}, "the Train tab")
    assert cfg.network_dim == 4 and cfg.max_train_epochs == 2
    assert cfg.train_batch_size == p.config["train_batch_size"] and cfg.optimizer_type == "AdamW8bit"
    with pytest.raises(SdtuneError, match="the Train tab: unknown setting 'rank'"):
        p.train_config({"rank": 4}, "the Train tab")
