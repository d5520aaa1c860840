"""The planner's rules in one table: for each setting, the first rule whose condition holds gives its value.

Every number a plan recommends comes from a row below, with the reason it is shown with and its source,
so a reader can audit (and argue with) each one. Sources:

- seed 001: the user's seed article (bilibili LoRA lecture notes): batch size first, then LR; LoRA with
  AdamW8bit: U-Net 1-1.5e-4, TE 1e-5, batch not too big, 0-20 epochs; Lion about 1/3 of the LR; adaptive
  optimizers take more VRAM; not training the TE is the first cure for over-fitting; auto-tag at >= 0.35;
  varied images, no near-identical variants.
- seed 003: the user's seed article (WOT2023 talk): the maximum steps must follow the dataset size and the
  image size; transparent backgrounds onto white.
- seed 004: the user's seed article (fine-tuning pitfalls): LoRA LR 1e-4..5e-5 with a warm-up; over-fitting
  comes from too little data.
- research §N: /work/shared/research/kohya_lycoris.md, which cites sd-scripts, kohya_ss and their issues.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from ..errors import SdtuneError

OPTIMIZER_FAMILIES: Mapping[str, str] = {
    "adamw": "adamw", "adamw8bit": "adamw", "pagedadamw": "adamw", "pagedadamw8bit": "adamw",
    "pagedadamw32bit": "adamw",
    "lion": "lion", "lion8bit": "lion", "pagedlion8bit": "lion",
    "prodigy": "adaptive", "dadaptation": "adaptive", "dadaptadam": "adaptive", "dadaptadamprepint": "adaptive",
    "dadaptadagrad": "adaptive", "dadaptadan": "adaptive", "dadaptlion": "adaptive", "dadaptsgd": "adaptive",
}
METHODS = ("lora", "locon", "loha", "lokr")
FAMILIES = ("sd1", "sd2", "sdxl")


@dataclass(frozen=True)
class PlanFacts:
    """What the rules look at: the model, the machine, the method and the dataset."""

    family: str  # sd1 | sd2 | sdxl
    v_pred: bool
    method: str  # lora | locon | loha | lokr
    optimizer_family: str  # adamw | lion | adaptive
    vram_gb: Optional[float]  # None or 0: no CUDA GPU (CPU training)
    bf16: bool  # the GPU is known to run bf16 (Ampere or newer)
    n_images: int  # distinct training images (no repeats, no reg)
    tag_captions: bool  # captions are comma-separated tag lists
    shared_first_tag: bool  # every caption starts with the same tag (a trigger word)
    long_captions: bool  # some caption is longer than CLIP's 75 tokens
    caption_extension: str = ".txt"  # what most caption files end with

    @property
    def cuda(self) -> bool:
        """True when training runs on a CUDA GPU."""
        return bool(self.vram_gb)

    @property
    def tier(self) -> int:
        """The VRAM preset this GPU falls in: 8, 12, 16 or 24 GB (0 = CPU)."""
        if not self.cuda:
            return 0
        return next(t for limit, t in ((10, 8), (14, 12), (20, 16), (float("inf"), 24)) if self.vram_gb < limit)


Condition = Callable[[PlanFacts, Mapping[str, Any]], bool]


@dataclass(frozen=True)
class Rule:
    """One row: for `key`, when `test(facts, chosen)` holds (described by `when`), use `value`."""

    key: str
    when: str
    test: Condition
    value: Any  # a constant, or a function (facts, chosen) -> value for values computed from the facts
    reason: str
    source: str

    def resolve(self, facts: PlanFacts, chosen: Mapping[str, Any]) -> Any:
        """This row's value for these facts."""
        return self.value(facts, chosen) if callable(self.value) else self.value


def _always(f: PlanFacts, c: Mapping[str, Any]) -> bool:
    return True


def _lora_dim(f: PlanFacts, c: Mapping[str, Any]) -> int:
    return c["network_dim"]


R = Rule
# Order matters: keys are decided top to bottom (later rules may read earlier choices in `c`), and
# within one key the first matching row wins.
RULES: tuple[Rule, ...] = (
    # --- resolution: the base model's native size
    R("resolution", "SDXL", lambda f, c: f.family == "sdxl", "1024,1024",
      "SDXL was trained at 1024x1024", "research §9 (SDXL presets: 1024 px)"),
    R("resolution", "SD2 768-v", lambda f, c: f.family == "sd2" and f.v_pred, "768,768",
      "SD2 768-v was trained at 768x768", "research §3.4 (v_parameterization, SD2-768-v)"),
    R("resolution", "SD1 / SD2-base", _always, "512,512",
      "SD1.x and SD2-base were trained at 512x512", "research §9 (SD1.5 presets: 512 px)"),
    # --- aspect-ratio buckets
    R("enable_bucket", "always", _always, True,
      "images keep their aspect ratio instead of being cropped square", "research §2.4, §9 (kohya_ss: buckets on)"),
    R("min_bucket_reso", "always", _always, 256, "kohya_ss's bucket range starts at 256", "research §9"),
    R("max_bucket_reso", "always", _always, lambda f, c: 2 * int(str(c["resolution"]).split(",")[0]),
      "twice the resolution's side: tall and wide images keep their shape", "research §2.4, §9 (256..2048)"),
    R("bucket_reso_steps", "always", _always, 64,
      "64 works for every model (SDXL needs a multiple of 32)", "research §2.4 (sdxl_train_network.py:43-45)"),
    # --- batch size first (seed 001: 'BatchSize should be the first hyper-parameter decided')
    R("train_batch_size", "no CUDA GPU", lambda f, c: not f.cuda, 1,
      "on the CPU a larger batch only makes each step slower", "seed 001 (batch first; not too big)"),
    R("train_batch_size", "SDXL with an adaptive optimizer", lambda f, c: f.family == "sdxl"
      and f.optimizer_family == "adaptive", 1,
      "Prodigy/DAdaptation keep extra state; SDXL at batch 4 ran out of 32 GB with one",
      "research §7 (kohya_ss #3296: advice batch 1); seed 001 (adaptive optimizers take more VRAM)"),
    R("train_batch_size", "SDXL, <= 12 GB", lambda f, c: f.family == "sdxl" and f.tier <= 12, 1,
      "SDXL at 1024 px fits 8-12 GB only at batch 1", "research §7 (sd-scripts train_SDXL-en: 8 GB; kohya_ss #1288)"),
    R("train_batch_size", "SDXL, 16 GB", lambda f, c: f.family == "sdxl" and f.tier == 16, 2,
      "room for two 1024 px samples with gradient checkpointing", "research §7 (kohya_ss #1288, #3296)"),
    R("train_batch_size", "SDXL, 24 GB", lambda f, c: f.family == "sdxl", 4,
      "the kohya_ss SDXL AdamW preset's batch on a 24 GB card", "research §9 (SDXL - LoRA AI_Now AdamW: batch 4)"),
    R("train_batch_size", "SD2 768, 8 GB", lambda f, c: f.family == "sd2" and f.v_pred and f.tier == 8, 1,
      "768 px samples are 2.25x the pixels of 512 px ones", "research §7 (SD1.5 11 GB: batch 4 at 512 px)"),
    R("train_batch_size", "SD1/SD2, 8 GB", lambda f, c: f.tier == 8, 2,
      "two 512 px samples fit 8 GB with gradient checkpointing", "research §7 (SD1.5 11 GB: batch 4 at 512 px)"),
    R("train_batch_size", "SD2 768, 12 GB", lambda f, c: f.family == "sd2" and f.v_pred and f.tier == 12, 2,
      "768 px samples are 2.25x the pixels of 512 px ones", "research §7 (SD1.5 11 GB: batch 4 at 512 px)"),
    R("train_batch_size", "SD1/SD2, >= 12 GB", _always, 4,
      "11 GB handles SD1.5 at 512 px with batch 4; larger batches are not advised for LoRA",
      "research §7 (kohya_ss #1730); seed 001 (batch: not too big)"),
    R("train_batch_size_cap", "fewer images than the batch", lambda f, c: f.n_images < c["train_batch_size"],
      lambda f, c: max(1, f.n_images), "a batch larger than the number of distinct images repeats images within it",
      "sdtune"),
    R("train_batch_size_cap", "otherwise", _always, None, "", ""),
    # --- optimizer (when the user did not choose one)
    R("optimizer_type", "no CUDA GPU", lambda f, c: not f.cuda, "AdamW",
      "8-bit optimizers (bitsandbytes) need CUDA", "research §3.2 (AdamW8bit = bitsandbytes)"),
    R("optimizer_type", "CUDA GPU", _always, "AdamW8bit",
      "the common LoRA optimizer: AdamW's results with a quarter of its state memory (needs bitsandbytes)",
      "seed 001 (AdamW8bit, commonly used); research §9 (kohya_ss default)"),
    # --- learning rates, by optimizer family (seed 001: LR is decided after the batch size)
    R("unet_lr", "AdamW family", lambda f, c: f.optimizer_family == "adamw", 1e-4,
      "the standard LoRA U-Net LR", "seed 001 (U-Net 1-1.5e-4); seed 004 (1e-4..5e-5); research §9"),
    R("unet_lr", "Lion family", lambda f, c: f.optimizer_family == "lion", 3e-5,
      "Lion over-fits more easily: about a third of AdamW's LR", "seed 001 (Lion LR about 1/3)"),
    R("unet_lr", "Prodigy / DAdaptation", _always, 1.0,
      "adaptive optimizers find the step size themselves; lr is a multiplier, ~1.0",
      "research §3.2 (sd-scripts warns below 0.1: 'set ~1.0')"),
    R("text_encoder_lr", "AdamW family", lambda f, c: f.optimizer_family == "adamw", 1e-5,
      "the text encoder over-fits fast: a tenth of the U-Net LR", "seed 001 (TE 1e-5); research §9 (SDXL TE 1e-5)"),
    R("text_encoder_lr", "Lion family", lambda f, c: f.optimizer_family == "lion", 3e-6,
      "a third of AdamW's TE LR, as for the U-Net", "seed 001 (Lion LR about 1/3)"),
    R("text_encoder_lr", "Prodigy / DAdaptation", _always, 1.0,
      "with several LRs only the first group's counts for D-Adaptation; keep them equal",
      "research §3.2 (DAdaptation: only the first LR is effective)"),
    R("learning_rate", "always", _always, lambda f, c: c["unet_lr"],
      "the fallback LR sd-scripts uses for any group without its own: the U-Net LR", "research §3.1"),
    # --- network size
    R("network_module", "LoHa / LoKr", lambda f, c: f.method in ("loha", "lokr"), "lycoris.kohya",
      "LyCORIS algorithms are saved as lycoris.kohya files", "research §3.1, §5"),
    R("network_module", "LoRA / LoCon", _always, "networks.lora",
      "sd-scripts' own module: LoRA, and LoCon with conv_dim", "research §3.1"),
    R("network_dim", "LoKr", lambda f, c: f.method == "lokr", 64,
      "LoKr's Kronecker factors need a larger dim than LoRA for the same capacity",
      "research §9 (kohya_ss 'SDXL - LoKR v1.0': 64)"),
    R("network_dim", "LoHa", lambda f, c: f.method == "loha", 32,
      "LoHa's effective rank is dim squared: 32 is plenty", "research §9 (kohya_ss 'loha-sd15': 32/16)"),
    R("network_dim", "SDXL, 8 GB", lambda f, c: f.family == "sdxl" and f.tier == 8, 8,
      "dim 4-8 keeps SDXL inside 8 GB; dim 32 spilled into shared memory on 10 GB cards",
      "research §7 (sd-scripts train_SDXL-en; kohya_ss #1524)"),
    R("network_dim", "SDXL", lambda f, c: f.family == "sdxl", 16,
      "SDXL LoRAs are usually rank 16-32; 16 keeps the file and VRAM small", "research §9 (SDXL rank 16-32)"),
    R("network_dim", "SD1 / SD2", _always, 32,
      "SD1.5 LoRAs are usually rank 16-64", "research §9 (SD1.5 rank 16-64)"),
    R("network_alpha", "always", _always, lambda f, c: c["network_dim"] // 2,
      "alpha = dim/2 (scale 0.5), the common choice; the LRs above assume it",
      "research §9 (alpha = rank or rank/2)"),
    R("network_args", "LoCon", lambda f, c: f.method == "locon",
      lambda f, c: [f"conv_dim={max(1, _lora_dim(f, c) // 2)}", f"conv_alpha={max(1, _lora_dim(f, c) // 4)}"],
      "LoCon also trains the 3x3 ResNet convs, at half the linear dim", "research §3.1, §9 (LoCon presets)"),
    R("network_args", "LoHa", lambda f, c: f.method == "loha", ["algo=loha", "conv_dim=8", "conv_alpha=4"],
      "LoHa on linear layers and convs", "research §9 (kohya_ss 'loha-sd15': conv 8/4)"),
    R("network_args", "LoKr", lambda f, c: f.method == "lokr", ["algo=lokr"],
      "LoKr with LyCORIS's balanced factor (factor=-1)", "research §5, §9"),
    R("network_args", "LoRA", _always, None, "plain LoRA needs no network_args", "research §3.1"),
    # --- text encoder and memory
    R("network_train_unet_only", "SDXL on <= 12 GB or the CPU", lambda f, c: f.family == "sdxl" and f.tier <= 12, True,
      "freezing both SDXL text encoders saves their gradients and lets their outputs be cached",
      "research §7 (sd-scripts train_SDXL-en: 8 GB needs U-Net only); research §8 (SDXL OOM, kohya_ss #3329)"),
    R("network_train_unet_only", "fewer than 10 images", lambda f, c: f.n_images < 10, True,
      "with few images the text encoder over-fits first (tags stop working)",
      "seed 001 (not training the TE is the first cure for over-fitting)"),
    R("network_train_unet_only", "otherwise", _always, False,
      "training the text encoder too, at a tenth of the U-Net LR, helps the trigger word take",
      "seed 001 (TE 1e-5)"),
    R("cache_text_encoder_outputs", "SDXL, U-Net only", lambda f, c: f.family == "sdxl"
      and c["network_train_unet_only"], True,
      "frozen text encoders: encode each caption once and move the encoders off the GPU",
      "research §2.5, §7 (sd-scripts train_SDXL-en: 8 GB)"),
    R("cache_text_encoder_outputs", "otherwise", _always, None, "the text encoders run every step", "research §2.5"),
    R("mixed_precision", "no CUDA GPU", lambda f, c: not f.cuda, "no",
      "half precision on the CPU is slow or unsupported: train in fp32", "research §3.5"),
    R("mixed_precision", "GPU known to run bf16", lambda f, c: f.bf16, "bf16",
      "bf16 has fp32's range: no NaNs from the SDXL VAE or high LRs", "research §8 (NaN loss: use bf16)"),
    R("mixed_precision", "other GPUs", _always, "fp16",
      "fp16 runs on every CUDA GPU (use bf16 on RTX 30xx or newer)", "research §3.5, §9 (kohya_ss default fp16)"),
    R("no_half_vae", "SDXL in fp16", lambda f, c: f.family == "sdxl" and c["mixed_precision"] == "fp16", True,
      "the SDXL VAE overflows in fp16 (NaN latents, black images): keep it in fp32",
      "research §3.5, §8 (NaN loss with fp16 SDXL)"),
    R("no_half_vae", "otherwise", _always, None, "", ""),
    R("gradient_checkpointing", "no CUDA GPU", lambda f, c: not f.cuda, False,
      "RAM is not the limit on the CPU; checkpointing would only cost time", "research §3.5"),
    R("gradient_checkpointing", "SDXL", lambda f, c: f.family == "sdxl", True,
      "SDXL activations are the top cause of OOM and shared-memory spilling (40-200 s/it)",
      "research §7, §8 (kohya_ss #3329: 'turn on gradient checkpointing')"),
    R("gradient_checkpointing", "SD2 768 <= 12 GB", lambda f, c: f.family == "sd2" and f.v_pred and f.tier <= 12, True,
      "768 px activations need it below 16 GB", "research §3.5, §7"),
    R("gradient_checkpointing", "SD1/SD2 on 8 GB", lambda f, c: f.tier == 8, True,
      "keeps 512 px training with batch 2 inside 8 GB", "research §3.5, §7"),
    R("gradient_checkpointing", "otherwise", _always, False,
      "memory is enough; checkpointing costs ~20% speed", "research §7 (~17-22% speed cost)"),
    R("cache_latents", "always", _always, True,
      "encode each image once instead of every step (no colour augmentation or random crop is used)",
      "research §2.5, §9 (kohya_ss default on)"),
    # --- schedule
    R("lr_scheduler", "Prodigy / DAdaptation", lambda f, c: f.optimizer_family == "adaptive", "constant",
      "adaptive optimizers set the step size themselves", "research §9 (kohya_ss Prodigy presets: constant)"),
    R("lr_scheduler", "otherwise", _always, "cosine",
      "warm up, then decay: the last epochs refine instead of overshooting",
      "research §9 (kohya_ss default cosine, 10% warm-up); seed 004 (warm-up)"),
    R("lr_warmup_ratio", "cosine", lambda f, c: c["lr_scheduler"] == "cosine", 0.1,
      "10% of the steps warm up from 0", "research §9 (kohya_ss default 10%); seed 004"),
    R("lr_warmup_ratio", "constant", _always, 0.0,
      "sd-scripts refuses 'constant' with a warm-up", "research §3.3"),
    R("max_grad_norm", "always", _always, 1.0, "sd-scripts' default gradient clipping", "research §3.2"),
    R("min_snr_gamma", "always", _always, 5.0,
      "Min-SNR weighting (gamma 5) converges faster and more evenly", "research §9 (common denominator: 5)"),
    R("noise_offset", "SDXL", lambda f, c: f.family == "sdxl", 0.0357,
      "SDXL was trained with this noise offset; matching it keeps its dark/bright range",
      "research §9 (SDXL presets: ~0.0357)"),
    R("noise_offset", "otherwise", _always, None, "", ""),
    # --- dataset handling
    R("shuffle_caption", "tag captions, TE outputs not cached", lambda f, c: f.tag_captions
      and not c["cache_text_encoder_outputs"], True,
      "shuffled tags keep the model from tying meaning to tag order", "research §2.3, §9 (presets: shuffle)"),
    R("shuffle_caption", "TE outputs cached", lambda f, c: f.tag_captions, False,
      "cached text-encoder outputs forbid shuffling (each caption is encoded once)",
      "research §2.5 (incompatible with shuffle_caption)"),
    R("shuffle_caption", "sentence captions", _always, None, "sentences lose meaning when shuffled", "research §2.3"),
    R("keep_tokens", "shuffled, every caption starts with the same tag", lambda f, c: bool(c["shuffle_caption"])
      and f.shared_first_tag, 1,
      "keep the trigger word first while the other tags shuffle", "research §2.3, §9 (presets: keep_tokens 1)"),
    R("keep_tokens", "otherwise", _always, None, "", ""),
    R("max_token_length", "captions over 75 tokens", lambda f, c: f.long_captions, 225,
      "CLIP reads 75 tokens; longer captions are cut unless extended to 225", "research §3.5"),
    R("max_token_length", "otherwise", _always, None, "", ""),
    R("clip_skip", "SD1 with tag captions", lambda f, c: f.family == "sd1" and f.tag_captions, 2,
      "tag captions suggest an anime (NAI-derived) SD1 base, trained with clip skip 2; use 1 for photo bases",
      "research §3.5 (SD1 anime models usually 2), §9 (EDG SD1.5 presets: clip_skip 2)"),
    R("clip_skip", "otherwise", _always, None, "SD2/SDXL ignore it; SD1 photo bases use the last layer",
      "research §3.5"),
    R("flip_aug", "fewer than 10 images", lambda f, c: f.n_images < 10, True,
      "mirrored copies add variety to a small set (turn off for asymmetric subjects: side parting, text, logos)",
      "seed 001 (augmentation when data are short)"),
    R("flip_aug", "otherwise", _always, None, "", ""),
    R("caption_extension", "always", _always, lambda f, c: f.caption_extension,
      "the extension your caption files use (sd-scripts' default is .caption)", "research §2.1"),
    R("validation_split", ">= 20 images", lambda f, c: f.n_images >= 20, 0.1,
      "hold out 10% to watch the validation loss: when it rises, stop", "research §3.6; seed 003 (watch the loss)"),
    R("validation_split", "fewer images", _always, None,
      "too few images to hold any out: judge by sample images instead", "research §3.6"),
    R("save_precision", "always", _always, "fp16", "fp16 files load in every host", "research §10"),
    R("seed", "always", _always, 42, "a fixed seed makes a run repeatable", "sdtune"),
    # --- how long: total samples grow with the square root of the dataset, shrink with resolution
    R("total_samples", "always", _always,
      lambda f, c: 450.0 * f.n_images ** 0.5 * (512 * 512 / _area(c["resolution"])) ** 0.25,
      "450 x sqrt(images) x (512^2/area)^0.25: 20 images -> 2000 samples at 512 px (each image seen 100 times), "
      "200 images -> 40 times each; fewer at 1024 px",
      "research §2.6 (20 images x 10 repeats x 10 epochs); seed 003 (steps follow dataset and image size); "
      "research §9 (SDXL presets train fewer samples)"),
    R("max_epochs", "LoRA", _always, 20, "LoRA needs at most ~20 epochs", "seed 001 (0-20 epochs)"),
    R("target_epochs", "LoRA", _always, 10,
      "about 10 epochs gives 10 checkpoints to pick the best from", "seed 003 (when to stop)"),
    R("save_every_n_epochs", "<= 10 epochs", lambda f, c: c["max_train_epochs"] <= 10, 1,
      "save every epoch and compare them: the best is often before the last", "seed 003 (when to stop)"),
    R("save_every_n_epochs", "more epochs", _always, 2, "about 10 files to compare", "seed 003"),
)


def _area(resolution: str) -> int:
    w, _, h = str(resolution).partition(",")
    return int(w) * int(h or w)


def keys_in_order() -> list[str]:
    """Every key the table decides, in the order they are decided."""
    seen: list[str] = []
    for rule in RULES:
        if rule.key not in seen:
            seen.append(rule.key)
    return seen


def decide(key: str, facts: PlanFacts, chosen: Mapping[str, Any]) -> tuple[Any, Rule]:
    """The value of `key` for these facts and earlier choices, and the row that gave it."""
    for rule in RULES:
        if rule.key == key and rule.test(facts, chosen):
            return rule.resolve(facts, chosen), rule
    raise SdtuneError(f"planner rules: no rule for {key!r} matches (the table needs a catch-all row)")


def optimizer_family(name: str) -> str:
    """adamw | lion | adaptive for an sd-scripts optimizer_type, or an error listing the supported ones."""
    fam = OPTIMIZER_FAMILIES.get(name.strip().lower())
    if fam is None:
        raise SdtuneError(f"optimizer {name!r}: the planner knows AdamW, AdamW8bit, PagedAdamW8bit, Lion, Lion8bit, "
                          f"Prodigy and DAdaptation (DAdaptAdam, ...); pick one of those")
    return fam
