"""Trainer benchmark: time per optimizer step of sdtune's trainer vs a bare diffusers + peft loop, one run.

Both train a rank-R LoRA on the same checkpoint at the same resolution and batch size with AdamW, encoding
images with the VAE and captions with the text encoder(s) every step. The bare loop gets its pixels as ready
tensors (no image decoding); sdtune decodes its PNGs in its loader threads. Steps after the first `--warmup`
are timed; each variant runs in its own process so its peak RSS (and peak VRAM on a GPU) is its own.

`--size tiny` (default) uses the tiny real-layout SD1 model; `--size sd15` / `--size sdxl` write a full-size
checkpoint with random weights in the real key layout (2.1 / 6.9 GB) and train it as the planner would on a
GPU (`--device cuda --precision bf16 --checkpointing`; SDXL trains the U-Net only). Usage:
    python bench/train_step.py [--steps 30] [--warmup 5] [--rank 8] [--resolution 256] [--batch 2]
    python bench/train_step.py --size sd15 --device cuda --precision bf16 --resolution 512 --batch 1 --rank 32
    python bench/train_step.py --size sdxl --device cuda --precision bf16 --resolution 1024 --batch 1 \
        --rank 32 --checkpointing
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PEAK = r"""
peak_vram = torch.cuda.max_memory_allocated() / 2**20 if DEVICE.startswith("cuda") else None
print(json.dumps({"stamps": stamps, "peak_vram_mib": peak_vram}))
"""

SDTUNE = r"""
import json, time, torch
from lib_sdtune.train.config import TrainConfig
from lib_sdtune.train.trainer import train
stamps = []
cfg = TrainConfig(pretrained_model_name_or_path=CKPT, train_data_dir=DATA, output_dir=OUT, output_name="bench",
                  resolution=RES, train_batch_size=BATCH, max_train_steps=STEPS, seed=0, network_dim=RANK,
                  network_alpha=RANK, learning_rate=1e-4, max_data_loader_n_workers=2, max_grad_norm=0,
                  mixed_precision=PREC, gradient_checkpointing=CKPT_GRAD, network_train_unet_only=not TRAIN_TE)
train(cfg, progress=lambda done, total, info: stamps.append(time.perf_counter()), device=DEVICE)
""" + PEAK

BARE = r"""
import json, time, torch
from diffusers import DDPMScheduler
from peft import LoraConfig, inject_adapter_in_model
from lib_sdtune.models.loader import load_checkpoint
from lib_sdtune.models.tokenizer import load_clip_tokenizer
torch.manual_seed(0)
half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(PREC)
m = load_checkpoint(CKPT, dtype=half or torch.float32)
unet, vae = m.modules["unet"], m.modules["vae"].float()
tes = [m.modules[n] for n in ("text_encoder", "text_encoder_2") if n in m.modules]
for mod in (unet, vae, *tes):
    mod.requires_grad_(False).to(DEVICE)
unet_cfg = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in",
                                                                  "proj_out", "ff.net.0.proj", "ff.net.2"])
te_cfg = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
unet = inject_adapter_in_model(unet_cfg, unet)
if TRAIN_TE:
    tes = [inject_adapter_in_model(te_cfg, te) for te in tes]
trained = [unet, *(tes if TRAIN_TE else [])]
groups = [{"params": [p for n, p in mod.named_parameters() if "lora_" in n], "lr": lr}
          for mod, lr in zip(trained, [1e-4, 1e-5, 1e-5])]
for g in groups:
    for p in g["params"]:
        p.data = p.data.float()
        p.requires_grad_(True)
opt = torch.optim.AdamW(groups)
if CKPT_GRAD:
    unet.enable_gradient_checkpointing()
sched = DDPMScheduler(**m.scheduler_config)
sdxl = len(tes) == 2
toks = [load_clip_tokenizer("clip_l")] + ([load_clip_tokenizer("open_clip")] if sdxl else [])
pixels = (torch.rand(BATCH, 3, RES, RES) * 2 - 1).to(DEVICE)
captions = ["sdtdemo, a red circle, solo"] * BATCH
time_ids = torch.tensor([[RES, RES, 0, 0, RES, RES]] * BATCH, dtype=torch.float32, device=DEVICE)
stamps = []
for step in range(STEPS):
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
    with torch.autocast(DEVICE.split(":")[0], dtype=half or torch.float32, enabled=half is not None):
        with torch.set_grad_enabled(TRAIN_TE):
            outs = [te(tok(captions, padding="max_length", max_length=77, truncation=True,
                           return_tensors="pt").input_ids.to(DEVICE), output_hidden_states=True)
                    for te, tok in zip(tes, toks)]
        if sdxl:
            hidden = torch.cat([outs[0].hidden_states[-2], outs[1].hidden_states[-2]], dim=-1)
            extra = {"added_cond_kwargs": {"text_embeds": outs[1].text_embeds, "time_ids": time_ids}}
        else:
            hidden, extra = outs[0].last_hidden_state, {}
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (BATCH,), device=DEVICE)
        pred = unet(sched.add_noise(latents, noise, t), t, hidden, **extra).sample
    loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()
    stamps.append(time.perf_counter())
""" + PEAK


def _run(code: str, values: dict) -> dict:
    """One variant in a fresh process: its step timestamps and its peak RSS."""
    prelude = "".join(f"{k} = {v!r}\n" for k, v in values.items())
    wrapper = prelude + code + "\nimport resource, sys\nprint(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, " \
                               "file=sys.stderr)\n"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, env=env, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["rss_mib"] = int(out.stderr.strip().splitlines()[-1]) / 1024
    return result


def _per_step(stamps: list[float], warmup: int) -> float:
    timed = stamps[warmup:]
    return (timed[-1] - timed[0]) / max(1, len(timed) - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["tiny", "sd15", "sdxl"], default="tiny")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--precision", choices=["no", "fp16", "bf16"], default="no")
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in both variants")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()
    from full_size import write_random_checkpoint

    from lib_sdtune.demo.dataset import DemoDatasetSpec, write_demo_dataset
    from lib_sdtune.demo.tiny_models import write_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        if args.size == "tiny":
            ckpt = write_tiny_checkpoint("sd1", tmp)
        else:
            ckpt = write_random_checkpoint(args.size, Path(tmp) / f"{args.size}_random.safetensors")
        ds = write_demo_dataset(Path(tmp) / "ds", DemoDatasetSpec(resolution=args.resolution, images_per_concept=8))
        values = {"CKPT": str(ckpt), "DATA": str(ds.train_dir), "OUT": str(Path(tmp) / "out"), "RES": args.resolution,
                  "BATCH": args.batch, "STEPS": args.steps + args.warmup, "RANK": args.rank, "DEVICE": args.device,
                  "PREC": args.precision, "CKPT_GRAD": args.checkpointing, "TRAIN_TE": args.size != "sdxl"}
        bare = _run(BARE, values)
        ours = _run(SDTUNE, values)
    base, mine = _per_step(bare["stamps"], args.warmup), _per_step(ours["stamps"], args.warmup)
    where = args.device if args.device != "cpu" else f"CPU threads {os.cpu_count()}"
    print(f"{args.size} ({'random weights' if args.size != 'tiny' else 'tiny SD1'}), {args.resolution}px, batch "
          f"{args.batch}, rank {args.rank}, precision {args.precision}, checkpointing {args.checkpointing}, "
          f"{'U-Net only' if args.size == 'sdxl' else 'U-Net + TE'}, {args.steps} timed steps, {where}")
    vram = lambda r: f"{r['peak_vram_mib']:>10.0f}" if r.get("peak_vram_mib") else f"{'-':>10}"  # noqa: E731
    print(f"{'variant':<44} {'s/step':>8} {'it/s':>6} {'ratio':>7} {'peak RSS MiB':>13} {'VRAM MiB':>10}")
    print(f"{'baseline: bare diffusers + peft loop':<44} {base:>8.3f} {1 / base:>6.2f} {1.0:>7.2f} "
          f"{bare['rss_mib']:>13.0f} {vram(bare)}")
    print(f"{'sdtune trainer (loader, metadata, checks)':<44} {mine:>8.3f} {1 / mine:>6.2f} {mine / base:>7.2f} "
          f"{ours['rss_mib']:>13.0f} {vram(ours)}")


if __name__ == "__main__":
    main()
