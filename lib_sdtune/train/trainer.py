"""Train a LoRA/LyCORIS adapter on an SD1.x, SD2.x or SDXL checkpoint: sd-scripts' `train_network.py` loop.

Read top to bottom: settings -> data -> model -> network -> optimizer and schedule -> the loop (encode,
noise, predict, loss, step) -> saving. Each piece it calls is small and lives beside it: data/ (scan,
buckets, batches), networks/ (the adapter and its file), train/conditioning.py (text and size
conditioning), train/noise.py, train/loss.py, train/optimizers.py, train/schedulers.py, train/outputs.py
(names and metadata) and train/state.py (resume). Long work reports through `progress(done, total, info)`
and stops cleanly when `cancelled()` returns True (a resumable state is written).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from ..errors import SdtuneError
from ..io.atomic import atomic_write_text
from ..models.loader import load_checkpoint
from ..models.vae_file import load_vae_file
from ..networks.config import from_network_args
from ..networks.kohya_file import load_lora_into, save_lora
from ..networks.max_norm import apply_max_norm
from ..networks.network import LoraNetwork
from ..networks.param_groups import optimizer_param_groups
from .conditioning import Conditioning, TextEncoders, encode_text, size_conditioning
from .config import TrainConfig, config_to_dict
from .distributed import data_parallel_from_env
from .fp8 import cast_to_fp8, check_fp8_base, check_fp8_network
from .loss import diffusion_loss, target_for
from .noise import perturb_noise, sample_noise, sample_timesteps, zero_terminal_snr_betas
from .optimizers import build_optimizer
from .outputs import RunInfo, epoch_file, final_file, prune_old, step_file, training_metadata
from .run_data import RunData, prepare_data
from .run_log import RunLog
from .sampling import generate_samples, read_prompt_file
from .schedulers import build_scheduler
from .state import TrainPosition, config_fingerprint, load_state, save_state

__all__ = ["TrainResult", "train"]

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, dict], None]
VALIDATION_TIMESTEPS = (200, 400, 600, 800)  # sd-scripts: fixed timesteps for validation loss


@dataclass
class TrainResult:
    """What a run produced (the CLI's `train --json` fields come from here)."""

    outputs: list[Path] = field(default_factory=list)
    final_loss: Optional[float] = None
    steps: int = 0
    epochs: int = 0
    cancelled: bool = False
    state_dir: Optional[Path] = None
    losses: list[float] = field(default_factory=list)
    validation_losses: list[tuple[int, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    config_path: Optional[Path] = None
    log_paths: list[Path] = field(default_factory=list)  # <name>-log.json, <name>-loss.png
    samples: list[Path] = field(default_factory=list)  # sample images written


@dataclass
class _Precision:
    weight_dtype: torch.dtype  # frozen U-Net / text encoders
    vae_dtype: torch.dtype
    network_dtype: torch.dtype  # the trained adapter
    autocast: Optional[torch.dtype]  # mixed-precision compute dtype, None = off


def _precision(cfg: TrainConfig, device: torch.device, family: str, notes: list[str]) -> _Precision:
    """Dtypes for weights, VAE, adapter and autocast from mixed_precision/full_fp16/no_half_vae."""
    mp = cfg.mixed_precision
    if mp == "fp16" and device.type == "cpu":
        notes.append("mixed_precision fp16 is not supported on CPU: training in fp32")
        mp = "no"
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mp)
    weight = half or torch.float32
    vae = torch.float32 if (cfg.no_half_vae or family.startswith("sdxl") or half is None) else weight
    network = half if (cfg.full_fp16 or cfg.full_bf16) and half else torch.float32
    return _Precision(weight, vae, network, half)


def _network_config(cfg: TrainConfig):
    """The adapter config from network_dim/alpha/args/dropout; an LR of 0 leaves that side untrained."""
    train_te = cfg.train_text_encoder and cfg.text_encoder_lr != 0
    train_unet = cfg.train_unet and cfg.unet_lr != 0
    net_cfg = from_network_args(cfg.network_dim, cfg.network_alpha, cfg.network_args, dropout=cfg.network_dropout,
                                train_unet=train_unet, train_text_encoder=train_te)
    if cfg.network_module == "lycoris.kohya" and net_cfg.conv_rank is None and net_cfg.algorithm != "full":
        net_cfg.conv_rank, net_cfg.conv_alpha = net_cfg.rank, net_cfg.alpha  # LyCORIS: conv_dim defaults to dim
    return net_cfg


def _rng_state(gen: torch.Generator) -> dict[str, torch.Tensor]:
    state = {"noise": gen.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(gen: torch.Generator, state: dict[str, torch.Tensor]) -> None:
    gen.set_state(state["noise"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def train(cfg: TrainConfig, *, progress: Optional[ProgressFn] = None,
          cancelled: Optional[Callable[[], bool]] = None, device: Optional[str | torch.device] = None,
          notes: Optional[list[str]] = None, save_on_cancel: bool = False) -> TrainResult:
    """Run one training job to the end (or until `cancelled()`), writing LoRA files into `output_dir`.

    A cancel lets the current step finish, writes a resumable state (and, with `save_on_cancel`, the
    adapter as `<name>-step<step>.safetensors`). The GPU memory the run used is given back either way.
    """
    try:
        return _train(cfg, progress, cancelled, device, list(notes or []), save_on_cancel)
    finally:
        gc.collect()  # the run's model, adapter and optimizer state are unreachable now
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _train(cfg: TrainConfig, progress: Optional[ProgressFn], cancelled: Optional[Callable[[], bool]],
           device: Optional[str | torch.device], notes: list[str], save_on_cancel: bool) -> TrainResult:
    """The training run itself (see `train`)."""
    cfg.validate()
    result = TrainResult(notes=notes)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dp = data_parallel_from_env(dev.type)
    if dp.world > 1 and dev.type == "cuda":
        dev = torch.device("cuda", dp.local_rank)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # --- resume or start: the seed and the position come from the state when resuming
    resume = load_state(Path(cfg.resume)) if cfg.resume else None
    fingerprint = config_fingerprint(config_to_dict(cfg))
    if resume is not None and resume[4].fingerprint != fingerprint:
        raise SdtuneError(f"{cfg.resume}: this state was saved with different training settings; resume with the "
                          "same config (only output, saving and metadata settings may change)")
    seed = resume[4].seed if resume else (cfg.seed if cfg.seed is not None else random.randint(0, 2**31 - 1))
    torch.manual_seed(seed)

    # --- model
    model = load_checkpoint(cfg.pretrained_model_name_or_path)
    if cfg.vae:
        model.modules["vae"] = load_vae_file(cfg.vae, model.modules["vae"])
    family = model.arch.family
    if family == "sdxl-refiner":
        raise SdtuneError(f"{cfg.pretrained_model_name_or_path}: an SDXL refiner; LoRAs are trained on the SDXL base")
    v_pred = cfg.v_parameterization if cfg.v_parameterization is not None else \
        model.arch.prediction_type == "v_prediction"
    prec = _precision(cfg, dev, family, result.notes)
    mods = model.modules
    unet, vae = mods["unet"], mods["vae"]
    te_names = [n for n in ("text_encoder", "text_encoder_2") if n in mods]
    for name, m in mods.items():
        m.requires_grad_(False)
        want = prec.vae_dtype if name == "vae" else prec.weight_dtype
        m.to(dev)
        if next(m.parameters()).dtype != want:
            _cast_quietly(m, want)
        m.eval()
    if cfg.fp8_base:
        if prec.autocast is None:
            check_fp8_base("no")
        check_fp8_network(_network_config(cfg))
        saved = cast_to_fp8(unet)
        result.notes.append(f"fp8_base: the U-Net's Linear/Conv weights are stored in float8 ({saved / 2**30:.2f} GiB "
                            "saved); autocast upcasts them at each layer")
    text = _text_encoders(family, [mods[n] for n in te_names])

    # --- data
    run_data: RunData = prepare_data(cfg, seed, vae=vae, notes=result.notes)
    data = run_data.train

    # --- network
    net_cfg = _network_config(cfg)
    network = LoraNetwork(mods, family, net_cfg)
    if cfg.network_weights:
        load_lora_into(network, cfg.network_weights)
    network.to(dev, dtype=prec.network_dtype)
    network.apply_to()
    network.requires_grad_(True)
    network.train()
    trains_te = bool(network.names("text_encoder") or network.names("text_encoder_2"))
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()
        for n in te_names if trains_te else []:
            mods[n].gradient_checkpointing_enable()
            mods[n].train()

    # --- optimizer, steps, schedule
    groups = optimizer_param_groups(network, cfg.text_encoder_lr, cfg.unet_lr, cfg.learning_rate)
    opt = build_optimizer(cfg.optimizer_type, groups.groups, cfg.learning_rate, cfg.optimizer_args,
                          device_type=dev.type)
    result.notes += opt.warnings
    opt.train_mode()  # schedule-free optimizers: eval mode only around saving, sampling and validation
    batches_per_process = math.ceil(data.batches_per_epoch / dp.world)
    steps_per_epoch = math.ceil(batches_per_process / cfg.gradient_accumulation_steps)
    if cfg.max_train_epochs:
        max_steps = cfg.max_train_epochs * steps_per_epoch
    else:
        max_steps = cfg.max_train_steps
    num_epochs = math.ceil(max_steps / steps_per_epoch)
    data.options = dataclasses.replace(data.options, max_train_steps=max_steps)  # token warm-up as a fraction
    sched = build_scheduler(opt.forced_scheduler or cfg.lr_scheduler, opt.optimizer, max_steps,
                            cfg.lr_warmup_steps, cfg.lr_scheduler_num_cycles, cfg.lr_scheduler_power,
                            cfg.lr_scheduler_min_lr_ratio)
    params = [p for g in groups.groups for p in g["params"]]

    # --- noise schedule
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler(**model.scheduler_config)
    snr_table = noise_sched.alphas_cumprod.to(dev)  # sd-scripts weights the loss by the SNR before any rescale
    if cfg.zero_terminal_snr:
        noise_sched = DDPMScheduler(**{**model.scheduler_config, "trained_betas": zero_terminal_snr_betas(
            noise_sched.betas).tolist()})
    alphas_cumprod = noise_sched.alphas_cumprod.to(dev)
    prediction = "v_prediction" if v_pred else "epsilon"
    scaling = float(vae.config.scaling_factor)
    gen = torch.Generator().manual_seed(seed + dp.rank)  # each process draws its own noise for its own batches

    run = RunInfo(cfg, seed, data.batches_per_epoch, num_epochs, max_steps, opt.metadata_name, run_data.metadata)
    run.fill_model_hashes()
    result.config_path = out_dir / f"{cfg.output_name}-config.json"
    if dp.is_main:
        atomic_write_text(result.config_path, json.dumps(config_to_dict(cfg), indent=2, default=str))

    def save_file(path: Path, epoch: int, step: int) -> None:
        if not dp.is_main:
            return
        meta = {} if cfg.no_metadata else training_metadata(run, epoch, step)
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.save_precision or "", torch.float32)
        with _optimizer_eval(opt):
            save_lora(network, path, metadata=meta, dtype=dtype, v_pred=v_pred)
        result.outputs.append(path)

    def write_state(name: str, epoch: int, batch_index: int, step: int) -> Path:
        pos = TrainPosition(epoch, batch_index, step, seed, fingerprint)
        if not dp.is_main:
            return out_dir / name
        folder = save_state(out_dir / name, network.state_dict_kohya(torch.float32), opt.optimizer.state_dict(),
                            sched.state_dict(), _rng_state(gen), pos)
        result.state_dir = folder
        return folder

    prompts = read_prompt_file(cfg.sample_prompts) if cfg.sample_prompts and dp.is_main else []

    def sample(label: str) -> None:
        if not prompts:
            return
        network.set_multiplier(1.0)  # samples show the adapter as a user loads it
        network.eval()
        opt.eval_mode()
        for m in [unet, *(mods[n] for n in te_names)]:
            m.eval()
        try:
            with torch.autocast(dev.type, dtype=prec.autocast, enabled=prec.autocast is not None):
                result.samples += generate_samples(
                    prompts, family, mods, text.tokenizers, model.scheduler_config, out_dir / "sample",
                    f"{cfg.output_name}_{label}", lambda captions: encode_text(text, captions, cfg.clip_skip,
                                                                               cfg.max_token_length),
                    cfg.sample_sampler, seed)
        finally:
            network.train()
            opt.train_mode()
            if cfg.gradient_checkpointing:
                unet.train()
                for n in te_names if trains_te else []:
                    mods[n].train()

    # --- resume: adapter, optimizer, schedule, RNG and position
    step, start_epoch, start_batch = 0, 1, 0
    if resume is not None:
        net_sd, opt_sd, sched_sd, rng, pos = resume
        network.load_kohya_state_dict(net_sd)
        opt.optimizer.load_state_dict(opt_sd)
        sched.load_state_dict(sched_sd)
        _set_rng_state(gen, rng)
        step, start_epoch, start_batch = pos.step, pos.epoch, pos.batch_index

    # --- the loop
    run_log = RunLog(out_dir, cfg.output_name, cfg.logging_dir if dp.is_main else None)
    if resume is not None:
        run_log.continue_from(step)
    if cfg.sample_at_first and resume is None:
        sample("e000000")
    started, last_loss = time.time(), None
    step_started = time.perf_counter()
    recent: list[float] = []
    stop = False
    for epoch in range(start_epoch, num_epochs + 1):
        first = start_batch if epoch == start_epoch else 0
        first_step = step - first // cfg.gradient_accumulation_steps
        batches = data.iter_epoch(epoch, first_step=first_step, start_index=first, rank=dp.rank, world=dp.world)
        batch_index = first
        for batch in batches:
            if batch.skipped:
                result.notes += [f"{p}: skipped ({why})" for p, why in batch.skipped]
            _use_multiplier(network, batch)
            latents = _latents(batch, vae, dev, prec.vae_dtype, scaling, gen)
            cond = _conditioning(text, batch, cfg, trains_te, run_data, dev)
            noise = sample_noise(latents, gen, cfg.noise_offset, cfg.noise_offset_random_strength,
                                 cfg.adaptive_noise_scale, cfg.multires_noise_iterations, cfg.multires_noise_discount)
            timesteps = sample_timesteps(latents.shape[0], cfg.min_timestep, cfg.max_timestep, gen, dev)
            input_noise = perturb_noise(noise, cfg.ip_noise_gamma, cfg.ip_noise_gamma_random_strength, gen) \
                if cfg.ip_noise_gamma else noise
            noisy = noise_sched.add_noise(latents, input_noise, timesteps)
            pred = _predict(unet, noisy, timesteps, cond, prec, dev)
            target = target_for(prediction, latents, noise, timesteps, alphas_cumprod)
            loss = diffusion_loss(pred, target, timesteps, alphas_cumprod, loss_type=cfg.loss_type,
                                  huber_c=cfg.huber_c, huber_schedule=cfg.huber_schedule, huber_scale=cfg.huber_scale,
                                  loss_weights=batch.loss_weights.to(dev), min_snr_gamma=cfg.min_snr_gamma,
                                  v_prediction=v_pred,
                                  scale_v_pred_loss_like_noise_pred=cfg.scale_v_pred_loss_like_noise_pred,
                                  v_pred_like_loss=cfg.v_pred_like_loss,
                                  debiased_estimation=cfg.debiased_estimation_loss, snr_alphas_cumprod=snr_table)
            if not torch.isfinite(loss):
                raise SdtuneError(
                    f"the loss became {loss.item()} at step {step + 1} (epoch {epoch}); nothing was saved after "
                    f"the last good file. Likely causes: fp16 overflow (use mixed_precision bf16, or no_half_vae "
                    f"for SDXL), or a learning rate too high for {cfg.optimizer_type} (try a tenth)")
            if loss.requires_grad:  # a dataset with network_multiplier 0 bypasses the adapter: nothing to learn
                (loss / cfg.gradient_accumulation_steps).backward()
            batch_index += 1
            last_loss = float(loss.detach())
            if batch_index % cfg.gradient_accumulation_steps and batch_index < batches_per_process:
                continue
            dp.average_gradients(params)
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.optimizer.step()
            sched.step()
            opt.optimizer.zero_grad(set_to_none=True)
            step += 1
            if cfg.scale_weight_norms:
                apply_max_norm(network, cfg.scale_weight_norms)
            result.losses.append(last_loss)
            recent = (recent + [last_loss])[-max(1, steps_per_epoch):]
            now = time.perf_counter()
            slow = run_log.add_step(step, last_loss, sched.get_last_lr()[0], now - step_started)
            step_started = now
            if slow:
                result.notes.append(slow)
                log.warning(slow)
            if progress is not None:
                rate = (step - (resume[4].step if resume else 0)) / max(1e-9, time.time() - started)
                progress(step, max_steps, {"epoch": epoch, "epochs": num_epochs, "loss": last_loss,
                                           "avg_loss": sum(recent) / len(recent), "lr": sched.get_last_lr()[0],
                                           "it_per_s": rate, "eta_s": (max_steps - step) / rate if rate else None,
                                           "peak_vram_gb": _peak_vram_gb(dev), "warning": slow})
            if cfg.save_every_n_steps and step % cfg.save_every_n_steps == 0 and step < max_steps:
                save_file(step_file(out_dir, cfg.output_name, step), epoch, step)
                prune_old(out_dir, cfg.output_name, None, cfg.save_last_n_steps, epoch, step, None,
                          cfg.save_every_n_steps)
            if cfg.sample_every_n_steps and step % cfg.sample_every_n_steps == 0:
                sample(f"{step:06d}")
            if step >= max_steps:
                stop = True
                break
            if dp.any_true(cancelled is not None and cancelled(), dev):
                write_state(f"{cfg.output_name}-state", epoch, batch_index, step)
                if save_on_cancel:
                    save_file(step_file(out_dir, cfg.output_name, step), epoch, step)
                result.cancelled = True
                break
        if result.cancelled:
            break
        val = None
        if run_data.validation is not None and _validate_now(cfg, epoch, num_epochs):
            with _optimizer_eval(opt):
                val = _validation_loss(run_data, vae, text, unet, network, noise_sched, cfg, prediction, prec, dev,
                                       scaling)
            result.validation_losses.append((epoch, val))
        if dp.is_main:
            run_log.end_epoch(epoch, val)
        if cfg.sample_every_n_epochs and epoch % cfg.sample_every_n_epochs == 0:
            sample(f"e{epoch:06d}")
        if cfg.save_every_n_epochs and epoch % cfg.save_every_n_epochs == 0 and epoch < num_epochs and not stop:
            save_file(epoch_file(out_dir, cfg.output_name, epoch), epoch, step)
            prune_old(out_dir, cfg.output_name, cfg.save_last_n_epochs, None, epoch, step, cfg.save_every_n_epochs,
                      None)
            if cfg.save_state:
                write_state(f"{cfg.output_name}-{epoch:06d}-state", epoch + 1, 0, step)
        if stop:
            break
    result.steps, result.final_loss = step, last_loss
    result.epochs = min(epoch, num_epochs) if num_epochs else 0
    if not result.cancelled:
        save_file(final_file(out_dir, cfg.output_name), result.epochs, step)
        if cfg.save_state or cfg.save_state_on_train_end:
            write_state(f"{cfg.output_name}-state", result.epochs + 1, 0, step)
    if result.cancelled and dp.is_main and run_log.steps:
        run_log.write()  # the partial epoch too, so the curve shows where the run stopped
    run_log.close()
    if dp.is_main and run_log.steps:
        result.log_paths = [run_log.json_path, run_log.png_path]
    checksum = dp.check_identical(network.state_dict_kohya(torch.float32))
    if dp.world > 1:
        result.notes.append(f"{dp.world} data-parallel processes ended with identical adapter weights "
                            f"(checksum {checksum})")
    network.remove()
    return result


@contextmanager
def _optimizer_eval(opt: Any) -> Iterator[None]:
    """Schedule-free optimizers hold the averaged weights only in eval mode: use them for files and checks."""
    opt.eval_mode()
    try:
        yield
    finally:
        opt.train_mode()


def _cast_quietly(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast a loaded module (diffusers warns about `to(dtype)` on models it did not load itself)."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        module.to(dtype=dtype)
    finally:
        diffusers_logging.set_verbosity(level)


def _text_encoders(family: str, encoders: list) -> TextEncoders:
    from ..models.tokenizer import load_clip_tokenizer

    if family.startswith("sdxl"):
        return TextEncoders(family, encoders, [load_clip_tokenizer("clip_l"), load_clip_tokenizer("open_clip")])
    return TextEncoders(family, encoders, [load_clip_tokenizer("open_clip" if family == "sd2" else "clip_l")])


@torch.no_grad()
def _latents(batch: Any, vae: torch.nn.Module, dev: torch.device, dtype: torch.dtype, scaling: float,
             gen: torch.Generator) -> torch.Tensor:
    """Scaled latents of a batch: from the cache, or the VAE's posterior sampled with the run's generator."""
    if batch.latents is not None:
        return (batch.latents.to(dev, torch.float32)) * scaling
    dist = vae.encode(batch.pixels.to(dev, dtype)).latent_dist
    noise = torch.randn(dist.mean.shape, generator=gen, dtype=torch.float32).to(dev)
    latents = dist.mean.float() + dist.std.float() * noise
    if not torch.isfinite(latents).all():
        raise SdtuneError("the VAE produced NaN latents (the SDXL VAE overflows in fp16): set no_half_vae = true")
    return latents * scaling


def _conditioning(text: TextEncoders, batch: Any, cfg: TrainConfig, trains_te: bool, run_data: RunData,
                  dev: torch.device) -> Conditioning:
    """Text conditioning for a batch (from the TE-output cache when allowed) plus SDXL's size ids."""
    cache = run_data.te_cache if not trains_te else None
    if cache is not None:
        cond = cache.encode(text, batch.captions, cfg.clip_skip, cfg.max_token_length)
    else:
        with torch.set_grad_enabled(trains_te):
            cond = encode_text(text, batch.captions, cfg.clip_skip, cfg.max_token_length)
    if text.family.startswith("sdxl"):
        cond.time_ids = size_conditioning(batch.original_sizes_hw, batch.crop_top_lefts, batch.target_sizes_hw)
    return Conditioning(cond.hidden_states.to(dev), None if cond.pooled is None else cond.pooled.to(dev),
                        None if cond.time_ids is None else cond.time_ids.to(dev))


def _predict(unet: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
             prec: _Precision, dev: torch.device) -> torch.Tensor:
    """The U-Net's prediction, under autocast when mixed precision is on."""
    kwargs: dict[str, Any] = {}
    if cond.pooled is not None:
        kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
    with torch.autocast(dev.type, dtype=prec.autocast, enabled=prec.autocast is not None):
        return unet(noisy.to(prec.weight_dtype), timesteps, cond.hidden_states.to(prec.weight_dtype), **kwargs).sample


def _peak_vram_gb(dev: torch.device) -> Optional[float]:
    """Peak CUDA memory allocated so far, in GiB (None on the CPU)."""
    if dev.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(dev) / 2**30


def _validate_now(cfg: TrainConfig, epoch: int, num_epochs: int) -> bool:
    every = cfg.validate_every_n_epochs or 1
    return epoch % every == 0 or epoch == num_epochs


@torch.no_grad()
def _use_multiplier(network: LoraNetwork, batch: Any) -> None:
    """The batch's dataset `network_multiplier` (sd-scripts: per dataset; a batch never mixes datasets)."""
    values = batch.network_multipliers
    value = float(values[0]) if len(values) else 1.0
    if len(values) and not bool((values == values[0]).all()):
        raise SdtuneError("a batch mixes datasets with different network_multiplier values; give them the same "
                          "value or separate batch sizes")
    if value != network.config.multiplier:
        network.set_multiplier(value)


@torch.no_grad()
def _validation_loss(run_data: RunData, vae, text: TextEncoders, unet, network: LoraNetwork, noise_sched,
                     cfg: TrainConfig, prediction: str, prec: _Precision, dev: torch.device, scaling: float) -> float:
    """Mean loss of the held-out images at sd-scripts' fixed timesteps with a fixed generator (comparable
    between epochs); no autograd graph is kept (it would hold every activation in VRAM)."""
    data = run_data.validation
    gen = torch.Generator().manual_seed(run_data.validation_seed)
    losses = []
    for batch in data.iter_epoch(1):
        _use_multiplier(network, batch)
        latents = _latents(batch, vae, dev, prec.vae_dtype, scaling, gen)
        cond = _conditioning(text, batch, cfg, False, run_data, dev)
        for t in VALIDATION_TIMESTEPS:
            timesteps = torch.full((latents.shape[0],), t, dtype=torch.long, device=dev)
            noise = torch.randn(latents.shape, generator=gen).to(dev)
            noisy = noise_sched.add_noise(latents, noise, timesteps)
            pred = _predict(unet, noisy, timesteps, cond, prec, dev)
            target = target_for(prediction, latents, noise, timesteps, noise_sched.alphas_cumprod.to(dev))
            losses.append(float(torch.nn.functional.mse_loss(pred.float(), target.float())))
    return sum(losses) / max(1, len(losses))
