"""Trainer benchmark: time per optimizer step of sdtune's trainer vs a bare diffusers + peft loop, one run.

Both train a rank-R LoRA on the U-Net and text encoder of the same tiny real-layout SD1 checkpoint, at the
same resolution and batch size, with AdamW, encoding images with the VAE and captions with the text encoder
every step. The bare loop gets its pixels as ready tensors (no image decoding); sdtune decodes its PNGs
in its loader threads. Steps after the first `--warmup` are timed; each variant runs in its own process
so its peak RSS is its own. Usage:
    python bench/train_step.py [--steps 30] [--warmup 5] [--rank 8] [--resolution 256] [--batch 2]
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

SDTUNE = r"""
import json, time, torch
from lib_sdtune.train.config import TrainConfig
from lib_sdtune.train.trainer import train
stamps = []
cfg = TrainConfig(pretrained_model_name_or_path=CKPT, train_data_dir=DATA, output_dir=OUT, output_name="bench",
                  resolution=RES, train_batch_size=BATCH, max_train_steps=STEPS, seed=0, network_dim=RANK,
                  network_alpha=RANK, learning_rate=1e-4, max_data_loader_n_workers=2, max_grad_norm=0)
train(cfg, progress=lambda done, total, info: stamps.append(time.perf_counter()), device="cpu")
print(json.dumps({"stamps": stamps}))
"""

BARE = r"""
import json, time, torch
from diffusers import DDPMScheduler
from peft import LoraConfig, inject_adapter_in_model
from lib_sdtune.models.loader import load_checkpoint
from lib_sdtune.models.tokenizer import load_clip_tokenizer
torch.manual_seed(0)
m = load_checkpoint(CKPT, dtype=torch.float32)
unet, vae, te = m.modules["unet"], m.modules["vae"], m.modules["text_encoder"]
for mod in (unet, vae, te):
    mod.requires_grad_(False)
unet_cfg = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in",
                                                                  "proj_out", "ff.net.0.proj", "ff.net.2"])
te_cfg = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
unet = inject_adapter_in_model(unet_cfg, unet)
te = inject_adapter_in_model(te_cfg, te)
params = [p for mod in (unet, te) for n, p in mod.named_parameters() if "lora_" in n]
for p in params:
    p.requires_grad_(True)
opt = torch.optim.AdamW([{"params": [p for n, p in unet.named_parameters() if "lora_" in n], "lr": 1e-4},
                         {"params": [p for n, p in te.named_parameters() if "lora_" in n], "lr": 1e-5}])
sched = DDPMScheduler(**m.scheduler_config)
tok = load_clip_tokenizer("clip_l")
pixels = torch.rand(BATCH, 3, RES, RES) * 2 - 1
captions = ["sdtdemo, a red circle, solo"] * BATCH
stamps = []
for step in range(STEPS):
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
    ids = tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    hidden = te(ids).last_hidden_state
    noise = torch.randn_like(latents)
    t = torch.randint(0, 1000, (BATCH,))
    pred = unet(sched.add_noise(latents, noise, t), t, hidden).sample
    loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    stamps.append(time.perf_counter())
print(json.dumps({"stamps": stamps}))
"""


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
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()
    from lib_sdtune.demo.dataset import DemoDatasetSpec, write_demo_dataset
    from lib_sdtune.demo.tiny_models import write_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_tiny_checkpoint("sd1", tmp)
        ds = write_demo_dataset(Path(tmp) / "ds", DemoDatasetSpec(resolution=args.resolution, images_per_concept=8))
        values = {"CKPT": str(ckpt), "DATA": str(ds.train_dir), "OUT": str(Path(tmp) / "out"), "RES": args.resolution,
                  "BATCH": args.batch, "STEPS": args.steps + args.warmup, "RANK": args.rank}
        bare = _run(BARE, values)
        ours = _run(SDTUNE, values)
    base, mine = _per_step(bare["stamps"], args.warmup), _per_step(ours["stamps"], args.warmup)
    print(f"tiny SD1, {args.resolution}px, batch {args.batch}, rank {args.rank}, {args.steps} timed steps, "
          f"CPU threads {os.cpu_count()}")
    print(f"{'variant':<44} {'s/step':>8} {'ratio':>7} {'peak RSS MiB':>13}")
    print(f"{'baseline: bare diffusers + peft loop':<44} {base:>8.3f} {1.0:>7.2f} {bare['rss_mib']:>13.0f}")
    print(f"{'sdtune trainer (loader, metadata, checks)':<44} {mine:>8.3f} {mine / base:>7.2f} "
          f"{ours['rss_mib']:>13.0f}")


if __name__ == "__main__":
    main()
